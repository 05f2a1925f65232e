"""Static addresses on the real daemons: a taken address or the bridge's own is refused, nothing is made.

Both go through VmHost.compose, so the check runs under the host lock on the plan that would be created.
The bridge is whichever local bridge carries an IPv4 subnet (the test LXD daemon's lxdbr0 here).
"""

from __future__ import annotations

import ipaddress
import random
import shutil
import subprocess
import time
import uuid

import pytest
import yaml

from tests.functional import test_lxd
from vmhost.model import Policy, VmRequest
from vmhost.placement import PlacementError
from vmhost.providers.base import ProviderError
from vmhost.service import VmHost

# The LXD tier's fixtures: its daemon, a project of this session, per-test names cleaned up afterwards.
lxd_daemon, project, names = test_lxd.lxd_daemon, test_lxd.project, test_lxd.names


def _addressed_bridge(host: VmHost) -> tuple[str, ipaddress.IPv4Interface]:
    for nic in host.topology().nics:
        for addr in nic.addresses:
            iface = ipaddress.ip_interface(addr)
            if nic.kind == "bridge" and iface.version == 4 and iface.network.num_addresses >= 16:
                return nic.name, iface
    pytest.skip("no local bridge with an IPv4 subnet to give static addresses on")


def _free_ip(iface: ipaddress.IPv4Interface) -> str:
    """A random address of the subnet, not the bridge's; unlikely to be any other test's."""
    hosts = [h for h in iface.network.hosts() if h != iface.ip]
    return str(random.choice(hosts[len(hosts) // 2 :]))


def _request(name: str, ip: str) -> VmRequest:
    return VmRequest.from_dict({"name": name, "cores": 1, "memory": "256M", "interfaces": f"eth0:ip={ip}"})


def _refuses_taken_and_own_addresses(host: VmHost, new_name, made) -> None:
    """The shared case: a taken address, the bridge's own and its broadcast are refused with nothing made
    (`made()` lists what the daemon holds), and an address is free again once its VM is gone."""
    bridge, iface = _addressed_bridge(host)
    ip = _free_ip(iface)
    first = host.compose(_request(new_name(), ip))
    assert first.allocation.nics[0].ip == ip and first.allocation.nics[0].parent == bridge
    before = made()
    with pytest.raises(PlacementError, match=f"ip {ip} is already given to VM {first.name}; choose another address"):
        host.compose(_request(new_name(), ip))
    with pytest.raises(PlacementError, match=rf"ip {iface.ip} is an address of this host \({bridge}\)"):
        host.compose(_request(new_name(), str(iface.ip)))
    with pytest.raises(PlacementError, match=f"is the broadcast address of {iface.network}"):
        host.compose(_request(new_name(), str(iface.network.broadcast_address)))
    assert made() == before
    host.decompose(first.name)
    assert host.compose(_request(new_name(), ip)).allocation.nics[0].ip == ip  # released with its VM


# --- libvirt -----------------------------------------------------------------------------------------


@pytest.fixture
def libvirt_host(libvirt_uri, tmp_path):
    from vmhost.providers.registry import ProviderSettings, make_provider

    host = VmHost(
        make_provider(ProviderSettings("libvirt", uri=libvirt_uri)), Policy(), lock_path=str(tmp_path / "lock")
    )
    yield host
    host.provider.close()


def test_libvirt_refuses_a_taken_address_and_the_bridges_own_and_makes_nothing(libvirt_host, vm_names, libvirt_conn):
    _refuses_taken_and_own_addresses(
        libvirt_host, lambda: vm_names("addr"), lambda: {d.name() for d in libvirt_conn.listAllDomains()}
    )


def test_libvirt_discovers_the_hosts_gateways_and_refuses_them(libvirt_host, vm_names, libvirt_conn):
    gateways = [(n.name, g) for n in libvirt_host.topology().nics for g in n.gateways if ":" not in g]
    if not gateways:
        pytest.skip("this host routes through no IPv4 gateway on a local interface")
    nic, gateway = gateways[0]
    before = {d.name() for d in libvirt_conn.listAllDomains()}
    with pytest.raises(PlacementError, match=rf"ip {gateway} is the gateway on {nic}; choose another address"):
        libvirt_host.compose(_request(vm_names("addr"), gateway))
    assert {d.name() for d in libvirt_conn.listAllDomains()} == before


# --- LXD ---------------------------------------------------------------------------------------------


@pytest.fixture
def lxd_host(project, tmp_path):
    from vmhost.providers.lxd import LxdProvider

    host = VmHost(LxdProvider(project=project), Policy(), lock_path=str(tmp_path / "lock"))
    yield host
    host.provider.close()


def test_lxd_refuses_a_taken_address_and_the_bridges_own_and_makes_nothing(lxd_host, project, names):
    _refuses_taken_and_own_addresses(lxd_host, lambda: names("addr"), lambda: test_lxd.instance_names(project))


@pytest.fixture(scope="module")
def lxd_vm_image(lxd_daemon, tmp_path_factory):
    """A tiny VM image (100M qcow2 root, no OS) imported under an alias of this session, removed afterwards."""
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img (qemu-utils package) is not installed")
    d = tmp_path_factory.mktemp("lxd-image")
    (d / "metadata.yaml").write_text(
        f"architecture: x86_64\ncreation_date: {int(time.time())}\nproperties:\n  description: vmhost test image\n"
    )
    subprocess.run(["tar", "-czf", str(d / "metadata.tar.gz"), "-C", str(d), "metadata.yaml"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "rootfs.img"), "100M"], check=True)
    alias = f"vmhost-ft-{uuid.uuid4().hex[:8]}"
    test_lxd.lxc("image", "import", str(d / "metadata.tar.gz"), str(d / "rootfs.img"), "--alias", alias)
    yield alias
    test_lxd.lxc("image", "delete", alias, check=False)


def test_lxd_image_boot_without_hostname_writes_its_static_address(lxd_host, project, lxd_vm_image):
    """Issue 10: an image boot with ip= but no hostname wrote no network-config at all on LXD."""
    _, iface = _addressed_bridge(lxd_host)
    ip = _free_ip(iface)
    request = VmRequest.from_dict({"cores": 1, "memory": "256M", "storage": "root:128M", "interfaces": f"eth0:ip={ip}"})
    vm = lxd_host.compose(request, boot="image", image=lxd_vm_image)
    try:
        shown = yaml.safe_load(test_lxd.lxc("config", "show", vm.name, "--project", project).stdout)
        net = yaml.safe_load(shown["config"]["cloud-init.network-config"])
        assert net["ethernets"]["eth0"]["addresses"] == [f"{ip}/{iface.network.prefixlen}"]
        assert f"hostname: {vm.name}" in shown["config"]["cloud-init.user-data"]
    finally:
        lxd_host.decompose(vm.name)


def test_lxd_root_smaller_than_its_image_is_refused_and_nothing_is_made(lxd_host, project, lxd_vm_image):
    before = test_lxd.instance_names(project)
    request = VmRequest.from_dict({"cores": 1, "memory": "256M", "storage": "root:64M"})
    with pytest.raises(ProviderError, match="exceeds specified volume size"):
        lxd_host.compose(request, boot="image", image=lxd_vm_image)
    assert test_lxd.instance_names(project) == before


def test_lxd_an_alias_it_lacks_is_one_sentence_and_nothing_is_made(lxd_host, project, lxd_vm_image):
    before = (
        test_lxd.instance_names(project),
        test_lxd.lxc("storage", "volume", "list", "default", "--project", project).stdout,
    )
    request = VmRequest.from_dict({"cores": 1, "memory": "256M", "storage": "root:128M,data:64M"})
    with pytest.raises(ProviderError, match=f"LXD has no image alias '{lxd_vm_image}-x' for project '{project}'"):
        lxd_host.compose(request, boot="image", image=lxd_vm_image + "-x")
    after = (
        test_lxd.instance_names(project),
        test_lxd.lxc("storage", "volume", "list", "default", "--project", project).stdout,
    )
    assert after == before


def test_lxd_several_ips_and_link_up_reach_the_guests_network_config(lxd_host, project, lxd_vm_image):
    """Issue 16: two ip= on one interface give the guest both; mode=link_up brings a second one up bare."""
    bridge, iface = _addressed_bridge(lxd_host)
    first = _free_ip(iface)
    second = next(str(h) for h in iface.network.hosts() if str(h) not in (first, str(iface.ip)) and int(h) % 7 == 3)
    interfaces = f"0:ip={first},ip={second};1:name={bridge},mode=link_up"
    request = VmRequest.from_dict({"cores": 1, "memory": "256M", "storage": "root:128M", "interfaces": interfaces})
    vm = lxd_host.compose(request, boot="image", image=lxd_vm_image)
    try:
        shown = yaml.safe_load(test_lxd.lxc("config", "show", vm.name, "--project", project).stdout)
        eths = yaml.safe_load(shown["config"]["cloud-init.network-config"])["ethernets"]
        prefix = iface.network.prefixlen
        assert eths["eth0"]["addresses"] == [f"{first}/{prefix}", f"{second}/{prefix}"]
        assert eths["eth1"]["dhcp4"] is False and "addresses" not in eths["eth1"]
    finally:
        lxd_host.decompose(vm.name)


def test_libvirt_link_speed_is_matched_against_the_hosts_interfaces(libvirt_host, vm_names, libvirt_conn):
    """Issue 16: link_speed= needs the kernel's speed; where the host does not know it, the refusal says so."""
    nics = libvirt_host.topology().nics
    unknown = [n.name for n in nics if n.link_speed is None and n.kind != "network"]
    if not unknown:
        pytest.skip("every host interface reports a link speed here")
    before = set(libvirt_conn.listDefinedDomains()) | {d.name() for d in libvirt_conn.listAllDomains()}
    with pytest.raises(PlacementError, match=f"link speed unknown on .*{unknown[0]}"):
        libvirt_host.compose(VmRequest.from_dict({"memory": "128M", "interfaces": f"a:name={unknown[0]},link_speed=1"}))
    assert {d.name() for d in libvirt_conn.listAllDomains()} <= before
