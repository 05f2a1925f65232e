"""The LXD provider against the REAL test daemon (scripts/lxd-test-daemon.sh), no mocks.

VMs cannot start on this machine (docs/design.md §9), so these check VM records, volumes and devices, read
back through pylxd and `lxc` as an operator would. Each session uses a fresh project of its own, so the
project-creation path is exercised and gc can never touch anything outside the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from vmhost.model import Allocation, ComposePlan, DiskAllocation, HugepageAllocation, NicAllocation
from vmhost.providers import lxd_config as cfg
from vmhost.providers.base import STATE_COMPOSING, STATE_DECOMPOSING, ComposeError, NotFound, ProviderError

pytestmark = pytest.mark.lxd

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024**2
TEST_BRIDGE = "vmhostbr0"  # made by scripts/host-setup.sh; the managed lxdbr0 comes from the daemon script


def lxc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["lxc", *args], capture_output=True, text=True, check=check)


def lxc_json(path: str) -> dict | list:
    return json.loads(lxc("query", path).stdout)


def url_name(url: str) -> str:
    """The object name at the end of an API URL like /1.0/instances/vm-1?project=p."""
    return url.split("?", 1)[0].rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------------------------
# Fixtures (kept here: tests/functional/conftest.py belongs to the libvirt tier)


@pytest.fixture(scope="session")
def lxd_daemon() -> None:
    """The test LXD daemon, started (idempotently) by the same script `make host` runs."""
    if not shutil.which("lxd") or not shutil.which("lxc"):
        pytest.skip("lxd is not installed (scripts/host-setup.sh --lxd installs it)")
    proc = subprocess.run([str(ROOT / "scripts/lxd-test-daemon.sh")], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"scripts/lxd-test-daemon.sh failed: {proc.stderr.strip() or proc.stdout.strip()}")
    if not Path("/sys/class/net", TEST_BRIDGE).exists():
        subprocess.run(["ip", "link", "add", TEST_BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", TEST_BRIDGE, "up"], check=True)


@pytest.fixture(scope="session")
def project(lxd_daemon) -> str:
    """A project used only by this session; whatever is left in it is removed at the end, then the project."""
    name = f"ft-{uuid.uuid4().hex[:8]}"
    yield name
    if lxc("project", "show", name, check=False).returncode != 0:
        return
    for inst in lxc_json(f"/1.0/instances?project={name}"):
        lxc("delete", "--force", url_name(inst), "--project", name, check=False)
    for vol in lxc_json(f"/1.0/storage-pools/default/volumes/custom?project={name}"):
        lxc("storage", "volume", "delete", "default", url_name(vol), "--project", name, check=False)
    lxc("project", "delete", name, check=False)


@pytest.fixture
def provider(project):
    from vmhost.providers.lxd import LxdProvider

    p = LxdProvider(project=project)
    yield p
    p.close()


@pytest.fixture
def names(project):
    """Per-test unique VM names; anything carrying them (VMs, volumes) is removed afterwards, pass or fail."""
    made: list[str] = []

    def new(prefix: str = "ft") -> str:
        made.append(f"{prefix}-{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield new
    for name in made:
        for proj in (project, "default"):
            lxc("delete", "--force", name, "--project", proj, check=False)
        if lxc("project", "show", project, check=False).returncode == 0:
            for vol in lxc_json(f"/1.0/storage-pools/default/volumes/custom?project={project}"):
                vol_name = url_name(vol)
                if vol_name.startswith(f"{name}-"):
                    lxc("storage", "volume", "delete", "default", vol_name, "--project", project, check=False)


def instance_names(project: str) -> set[str]:
    if lxc("project", "show", project, check=False).returncode != 0:
        return set()
    return {url_name(i) for i in lxc_json(f"/1.0/instances?project={project}")}


def volume_names(project: str) -> set[str]:
    if lxc("project", "show", project, check=False).returncode != 0:
        return set()
    return {url_name(v) for v in lxc_json(f"/1.0/storage-pools/default/volumes/custom?project={project}")}


def planned(name: str, **kw) -> Allocation:
    base = {
        "name": name,
        "vcpus": 1,
        "memory": 256 * MIB,
        "pinned": (1,),
        "numa_nodes": (0,),
        "hugepages": HugepageAllocation("2M", {0: 128}),
        "disks": (DiskAllocation("root", 10 * 10**9, "default"), DiskAllocation("data", 2 * 10**9, "default")),
        "nics": (NicAllocation("eth0", "bridge", TEST_BRIDGE, vlan=10), NicAllocation("eth1", "network", "lxdbr0")),
    }
    base.update(kw)
    return Allocation(**base)


# ---------------------------------------------------------------------------------------------
# Compose / decompose


def test_composed_vm_record_has_exactly_the_planned_config_devices_and_volumes(provider, project, names):
    import pylxd

    name = names()
    alloc = planned(name)
    info = provider.compose(ComposePlan(alloc))

    expected_devices = {
        "root": {"type": "disk", "path": "/", "pool": "default", "size": "10GB"},
        "data": {"type": "disk", "pool": "default", "source": f"{name}-data"},
        "eth0": {"type": "nic", "nictype": "bridged", "parent": TEST_BRIDGE, "vlan": "10", "boot.priority": "10"},
        "eth1": {"type": "nic", "network": "lxdbr0"},
    }
    expected_limits = {
        "limits.cpu": "1-1",
        "limits.memory": "256MiB",
        "limits.memory.hugepages": "true",
        "security.secureboot": "false",
        "user.vmhost.state": "ready",
    }

    # Through pylxd, in our project (created on first compose, sharing the default profiles and images).
    client = pylxd.Client(project=project)
    inst = client.instances.get(name)
    assert inst.type == "virtual-machine"
    assert inst.profiles == ["default"]
    assert inst.devices == expected_devices
    ours = {k: v for k, v in inst.config.items() if not k.startswith("volatile.")}
    assert ours == {**expected_limits, cfg.ALLOCATION_KEY: ours[cfg.ALLOCATION_KEY], cfg.UUID_KEY: ours[cfg.UUID_KEY]}
    assert ours[cfg.UUID_KEY] == inst.config["volatile.uuid"]  # the record is bound to this instance
    assert Allocation.from_dict(json.loads(ours[cfg.ALLOCATION_KEY])) == alloc
    proj = client.projects.get(project)
    assert proj.config["features.images"] == "false"
    assert proj.config["features.profiles"] == "false"

    # Through `lxc config show`, as an operator sees it.
    shown = yaml.safe_load(lxc("config", "show", name, "--project", project).stdout)
    assert shown["devices"] == expected_devices
    assert {k: v for k, v in shown["config"].items() if k in expected_limits} == expected_limits

    # Exactly one custom volume, a block volume of the planned size owned by the VM.
    assert volume_names(project) >= {f"{name}-data"}
    assert {v for v in volume_names(project) if v.startswith(name)} == {f"{name}-data"}
    vol = yaml.safe_load(lxc("storage", "volume", "show", "default", f"{name}-data", "--project", project).stdout)
    assert vol["content_type"] == "block"
    assert vol["config"]["size"] == "2GB"
    assert vol["config"][cfg.OWNER_KEY] == name

    # The provider reads back what it made, MACs filled in from LXD.
    assert info.managed and info.name == name and info.state == "stopped"
    listed = {v.name: v for v in provider.list_vms()}
    assert listed[name].allocation.vcpus == 1 and listed[name].allocation.pinned == (1,)
    assert listed[name].allocation.hugepages == HugepageAllocation("2M", {0: 128})
    eth0_mac = shown["config"]["volatile.eth0.hwaddr"]
    assert listed[name].allocation.nics[0].mac == eth0_mac
    assert eth0_mac in listed[name].macs


def test_unpinned_vm_with_cloud_init_and_static_ip(provider, project, names):
    from vmhost.model import CloudInit

    name = names()
    alloc = planned(
        name,
        vcpus=2,
        pinned=None,
        numa_nodes=(),
        hugepages=None,
        disks=(DiskAllocation("root", 5 * 10**9, "default"),),
        nics=(NicAllocation("eth0", "network", "lxdbr0", ip="10.197.42.50"),),
    )
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGXuzinACkSeBrlWwMqzXdLesbcyptFCAOXux58IMPQz test@host"
    vm = provider.compose(ComposePlan(alloc, cloud_init=CloudInit(name, (key,))))
    shown = yaml.safe_load(lxc("config", "show", name, "--project", project).stdout)
    assert shown["config"]["limits.cpu"] == "2"
    assert "limits.memory.hugepages" not in shown["config"]
    user = yaml.safe_load(shown["config"]["cloud-init.user-data"])
    # The login user with the key, and the VM's own host key pair (the guest makes none of its own).
    assert user["users"][0]["name"] == "ubuntu" and user["users"][0]["ssh_authorized_keys"] == [key]
    assert user["ssh_keys"]["ed25519_public"] == vm.host_keys[0].public_key and user["ssh_genkeytypes"] == ["ed25519"]
    # list reports the login user, the public host key and (stopped: nothing learned yet) the static address.
    (listed,) = [v for v in provider.list_vms() if v.name == name]
    assert listed.state == "stopped" and listed.addresses == ("10.197.42.50",)
    assert listed.login_user == "ubuntu" and listed.host_keys == vm.host_keys
    assert "PRIVATE KEY" not in shown["config"][cfg.HOST_KEYS_KEY]
    net = yaml.safe_load(shown["config"]["cloud-init.network-config"])
    mac = shown["devices"]["eth0"]["hwaddr"]
    # The prefix comes from the host's own address on lxdbr0 (10.197.42.1/24).
    assert net["ethernets"]["eth0"] == {
        "set-name": "eth0",
        "match": {"macaddress": mac},
        "addresses": ["10.197.42.50/24"],
    }
    assert volume_names(project) & {f"{name}-root"} == set()


def test_a_stopped_dhcp_vm_is_listed_with_no_address(provider, project, names):
    """LXD VMs cannot start here: list still works, reading no address for a stopped VM (nothing is guessed)."""
    name = names()
    alloc = planned(name, disks=(), nics=(NicAllocation("eth0", "network", "lxdbr0"),))
    provider.compose(ComposePlan(alloc))
    (listed,) = [v for v in provider.list_vms() if v.name == name]
    assert listed.state == "stopped" and listed.addresses == () and listed.login_user is None


def test_configured_profile_is_used_and_a_missing_one_is_refused(project, names):
    from vmhost.providers.lxd import LxdProvider

    profile = f"ft-{uuid.uuid4().hex[:6]}"
    lxc("profile", "copy", "default", profile)
    try:
        name = names()
        LxdProvider(project=project, profile=profile).compose(ComposePlan(planned(name, disks=(), nics=())))
        assert yaml.safe_load(lxc("config", "show", name, "--project", project).stdout)["profiles"] == [profile]
        other = names()
        with pytest.raises(ProviderError, match="profile 'no-such-profile' does not exist"):
            LxdProvider(project=project, profile="no-such-profile").compose(ComposePlan(planned(other)))
        assert other not in instance_names(project)
        assert not {v for v in volume_names(project) if v.startswith(other)}
    finally:
        for inst in instance_names(project):
            shown = yaml.safe_load(lxc("config", "show", inst, "--project", project).stdout)
            if profile in shown["profiles"]:
                lxc("delete", "--force", inst, "--project", project)
        lxc("profile", "delete", profile, check=False)


def _expanded_nics(name: str, project: str) -> dict:
    devices = yaml.safe_load(lxc("config", "show", name, "--expanded", "--project", project).stdout)["devices"]
    return {k: v for k, v in devices.items() if v.get("type") == "nic"}


def test_vm_gets_exactly_its_allocations_nics_not_also_the_profiles(provider, project, names):
    """The default profile's eth0 (on lxdbr0) must not ride along with a VM asking for net0."""
    name = names()
    alloc = planned(name, nics=(NicAllocation("net0", "bridge", TEST_BRIDGE),), owner="m-uuid/app/req-0")
    provider.compose(ComposePlan(alloc))
    assert _expanded_nics(name, project) == {
        "net0": {"type": "nic", "nictype": "bridged", "parent": TEST_BRIDGE, "boot.priority": "10"}
    }
    vm = {v.name: v for v in provider.list_vms()}[name]
    mac = yaml.safe_load(lxc("config", "show", name, "--project", project).stdout)["config"]["volatile.net0.hwaddr"]
    assert vm.macs == (mac,)
    assert [(n.label, n.mac) for n in vm.allocation.nics] == [("net0", mac)]


def test_relation_vm_without_nics_gets_none_and_operator_vm_keeps_the_profiles(provider, project, names):
    relation_vm, operator_vm = names(), names()
    provider.compose(ComposePlan(planned(relation_vm, nics=(), owner="m-uuid/app/req-1")))
    provider.compose(ComposePlan(planned(operator_vm, nics=())))
    assert _expanded_nics(relation_vm, project) == {}
    assert _expanded_nics(operator_vm, project) == {"eth0": {"type": "nic", "network": "lxdbr0", "name": "eth0"}}


def test_decompose_leaves_no_instance_and_no_volume(provider, project, names):
    name = names()
    provider.compose(ComposePlan(planned(name)))
    assert name in instance_names(project) and f"{name}-data" in volume_names(project)
    provider.decompose(name)
    assert name not in instance_names(project)
    assert not {v for v in volume_names(project) if v.startswith(name)}
    assert name not in {v.name for v in provider.list_vms()}
    with pytest.raises(NotFound, match=name):
        provider.decompose(name)


def test_compose_failing_after_its_volumes_leaves_nothing(provider, project, names):
    name = names()
    alloc = planned(
        name,
        disks=(
            DiskAllocation("root", 10 * 10**9, "default"),
            DiskAllocation("data", 2 * 10**9, "default"),
            DiskAllocation("logs", 10**9, "default"),
        ),
        nics=(NicAllocation("eth0", "bridge", "nosuchbr0"),),
    )
    with pytest.raises(ComposeError) as err:
        provider.compose(ComposePlan(alloc))
    assert err.value.step == f"create VM {name}"
    assert "nosuchbr0" in str(err.value)
    assert name not in instance_names(project)
    assert not {v for v in volume_names(project) if v.startswith(name)}


def test_compose_failing_at_a_later_volume_undoes_the_earlier_ones(provider, project, names):
    name = names()
    alloc = planned(
        name,
        disks=(
            DiskAllocation("root", 10 * 10**9, "default"),
            DiskAllocation("data", 2 * 10**9, "default"),
            DiskAllocation("more", 10**9, "no-such-pool"),
        ),
    )
    with pytest.raises(ComposeError) as err:
        provider.compose(ComposePlan(alloc))
    assert err.value.step == f"create volume {name}-more in pool no-such-pool"
    assert name not in instance_names(project)
    assert not {v for v in volume_names(project) if v.startswith(name)}


def test_compose_and_decompose_never_repeat_a_request_on_the_real_daemon(provider, project, names, tmp_path):
    """Through the service, as the CLI runs them: one snapshot, then only writes and what they need."""
    from vmhost.model import Policy, VmRequest
    from vmhost.service import VmHost

    sent: list[tuple[str, str, tuple]] = []
    session = provider._connection().session
    request = session.request

    def recording(method, url, **kw):
        sent.append((method, url.split("/1.0", 1)[1], tuple(sorted((kw.get("params") or {}).items()))))
        return request(method, url, **kw)

    session.request = recording
    host = VmHost(provider, Policy(), lock_path=str(tmp_path / "lock"))
    name = names()
    vm = host.compose(VmRequest.from_dict({"name": name, "cores": 1, "memory": "256M", "storage": "root:5,data:1"}))
    assert vm.managed and vm.name == name
    inst = ("GET", f"/instances/{name}", (("project", project),))
    assert sent.count(inst) == 2  # the name is free (404), then the MACs LXD assigned
    repeated = {c for c in sent if sent.count(c) > 1 and c != inst}
    assert repeated == set()
    assert sum(1 for c in sent if c[1] == "/resources") == 1
    sent.clear()
    host.decompose(name)
    assert len(sent) == len(set(sent))
    assert [c[:2] for c in sent if c[0] == "DELETE"] == [
        ("DELETE", f"/instances/{name}"),
        ("DELETE", f"/storage-pools/default/volumes/custom/{name}-data"),
    ]
    assert name not in instance_names(project) and f"{name}-data" not in volume_names(project)


# ---------------------------------------------------------------------------------------------
# Counting, gc, discovery


def test_vm_made_outside_vmhost_is_listed_as_other(provider, names):
    name = names("other")
    lxc("init", "--empty", "--vm", name, "--project", "default", "-c", "limits.cpu=1", "-c", "limits.memory=300MiB")
    vm = {v.name: v for v in provider.list_vms()}[name]
    assert vm.managed is False
    assert vm.allocation.other is True
    assert (vm.allocation.vcpus, vm.allocation.memory, vm.allocation.pinned) == (1, 300 * MIB, None)
    with pytest.raises((NotFound, ProviderError)):
        provider.decompose(name)
    assert lxc("info", name, "--project", "default", check=False).returncode == 0


def _crashed(project: str, name: str, state: str = STATE_COMPOSING) -> None:
    """What a compose (or decompose) killed midway leaves: our record, bound to the instance's volatile.uuid."""
    uid = str(uuid.uuid4())
    lxc(
        "init", "--empty", "--vm", name, "--project", project, "-c", f"volatile.uuid={uid}", "-c", f"{cfg.UUID_KEY}={uid}",
        "-c", f"{cfg.STATE_KEY}={state}", "-c", f"{cfg.ALLOCATION_KEY}={cfg.encode_allocation(planned(name))}",
    )  # fmt: skip


def test_gc_removes_orphan_volumes_and_unfinished_vms_only(provider, project, names):
    keep = names()
    provider.compose(ComposePlan(planned(keep)))  # makes the project too
    ghost, crashed, undone, foreign, forged = names(), names(), names(), names(), names()
    lxc("storage", "volume", "create", "default", f"{ghost}-data", "size=1GB", "--type=block", "--project", project)
    lxc("storage", "volume", "set", "default", f"{ghost}-data", f"{cfg.OWNER_KEY}={ghost}", "--project", project)
    # Named exactly like ours, without our tag: not provably ours.
    lxc("storage", "volume", "create", "default", f"{foreign}-data", "size=1GB", "--type=block", "--project", project)
    _crashed(project, crashed)
    _crashed(project, undone, STATE_DECOMPOSING)
    # Our record, unfinished, but not bound to this instance (written by hand, or copied): left alone.
    lxc(
        "init", "--empty", "--vm", forged, "--project", project,
        "-c", f"{cfg.STATE_KEY}=composing", "-c", f"{cfg.ALLOCATION_KEY}={cfg.encode_allocation(planned(forged))}",
    )  # fmt: skip
    removed = provider.gc()
    assert sorted(removed) == sorted([crashed, undone, f"default/{ghost}-data"])
    assert not {crashed, undone} & instance_names(project)
    assert f"{ghost}-data" not in volume_names(project)
    # Ours, the untagged look-alike and the unbound record stay.
    assert {keep, forged} <= instance_names(project)
    assert {f"{keep}-data", f"{foreign}-data"} <= volume_names(project)
    assert {v.name: v.managed for v in provider.list_vms()}[forged] is False
    assert provider.gc() == []


def test_lxc_copy_of_a_relation_vm_is_foreign_and_the_original_stays(provider, project, names):
    """Defect 8: a copy carries our record and the relation owner key, but not the original's volatile.uuid."""
    orig, copy = names(), names()
    owner = "model-uuid/app/req-1"
    provider.compose(ComposePlan(planned(orig, owner=owner, disks=(DiskAllocation("root", 10 * 10**9, "default"),))))
    lxc("copy", orig, copy, "--project", project)
    shown = yaml.safe_load(lxc("config", "show", copy, "--project", project).stdout)
    assert shown["config"][cfg.ALLOCATION_KEY]  # the copy does carry our record and owner key...
    vms = {v.name: v for v in provider.list_vms()}
    assert vms[orig].managed and vms[orig].allocation.owner == owner
    assert not vms[copy].managed and vms[copy].allocation.owner is None  # ...but reads as made by others
    assert provider.gc() == []
    with pytest.raises(ProviderError, match="not made by vm-host"):
        provider.decompose(copy)
    assert {orig, copy} <= instance_names(project)


def test_discover_reports_this_hosts_cpus_memory_hugepages_and_pools(provider):
    host = provider.discover()
    online = Path("/sys/devices/system/cpu/online").read_text().strip()
    from vmhost.parse import parse_cpuset

    assert host.threads == parse_cpuset(online)
    resources = lxc_json("/1.0/resources")
    assert sum(n.memory for n in host.nodes) == resources["memory"]["total"]
    mem_total_kb = int(
        next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1]
    )
    assert sum(n.memory for n in host.nodes) >= mem_total_kb * 1024
    for node in host.nodes:
        pages = Path(f"/sys/devices/system/node/node{node.id}/hugepages/hugepages-2048kB/nr_hugepages")
        if pages.exists():
            assert node.hugepages.get("2M", 0) == int(pages.read_text())
    pools = {p.name: p for p in host.storage_pools}
    assert pools["default"].driver == "dir"
    assert 0 < pools["default"].used < pools["default"].total
    nics = {n.name: n for n in host.nics}
    assert nics["lxdbr0"].kind == "bridge" and "10.197.42.1/24" in nics["lxdbr0"].addresses
    assert nics[TEST_BRIDGE].kind == "bridge"
    assert {n.name for n in provider.networks()} == set(nics)


# ---------------------------------------------------------------------------------------------
# Trust and remote use


@pytest.fixture
def client_cert(tmp_path):
    crt, key = tmp_path / "client.crt", tmp_path / "client.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp384r1", "-nodes",
         "-days", "1", "-subj", "/CN=vmhost-ft", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(crt), str(key)


def test_trusted_client_certificate_drives_the_provider_over_https(client_cert, lxd_daemon):
    from vmhost.lxd_setup import add_trusted_client
    from vmhost.providers.lxd import LxdProvider

    name = f"ft-{uuid.uuid4().hex[:6]}"
    pem = Path(client_cert[0]).read_text()
    fingerprint = add_trusted_client(pem, name)
    try:
        trusted = {c["fingerprint"]: c["name"] for c in lxc_json("/1.0/certificates?recursion=1")}
        assert trusted[fingerprint] == name
        assert add_trusted_client(pem, name) == fingerprint  # idempotent
        # The server's own certificate pins it (as `lxc remote add` does after accepting the fingerprint).
        remote = LxdProvider(uri="https://127.0.0.1:8443", cert=client_cert, verify="/var/lib/lxd/server.crt")
        assert remote.discover().threads == LxdProvider().discover().threads
        remote.close()
        # The same from the command line, as an operator would: vmhost --uri https://... with the cert.
        cli = subprocess.run(
            [sys.executable, "-m", "vmhost.cli", "resources", "--backend", "lxd", "--uri", "https://127.0.0.1:8443",
             "--cert", client_cert[0], "--key", client_cert[1], "--server-cert", "/var/lib/lxd/server.crt", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        threads = sum(n["threads"]["total"] for n in json.loads(cli.stdout)["nodes"])
        assert threads == len(LxdProvider().discover().threads)
    finally:
        lxc("config", "trust", "remove", fingerprint, check=False)
    with pytest.raises(ProviderError, match="does not trust this client"):
        LxdProvider(uri="https://127.0.0.1:8443", cert=client_cert, verify="/var/lib/lxd/server.crt").discover()


def test_join_token_is_the_one_lxd_lists(lxd_daemon):
    from vmhost.lxd_setup import create_join_token

    name = f"ft-{uuid.uuid4().hex[:6]}"
    token = create_join_token(name)
    try:
        listed = dict(
            row.split(",")[:2] for row in lxc("config", "trust", "list-tokens", "-f", "csv").stdout.splitlines()
        )
        assert listed[name] == token.token
    finally:
        lxc("config", "trust", "revoke-token", name, check=False)


def _redeem(token: str, conf_dir: Path) -> subprocess.CompletedProcess:
    """`lxc remote add` with the token, as the operator's client would, from a client config of its own."""
    conf_dir.mkdir()
    return subprocess.run(
        ["lxc", "remote", "add", "vmhost-ft", token, "--accept-certificate"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "LXD_CONF": str(conf_dir)},
    )  # fmt: skip


def _fingerprint(conf_dir: Path) -> str:
    from vmhost.lxd_setup import cert_fingerprint

    return cert_fingerprint((conf_dir / "client.crt").read_text())[0]


def test_restricted_certificate_and_expiring_join_token(project, client_cert, tmp_path):
    """LXD 5.0.2: a certificate restricted to our project reaches that project only; a token that has
    expired is refused, one that has not becomes a certificate restricted the same way."""
    from vmhost.lxd_setup import LxdSetupError, add_trusted_client, create_join_token
    from vmhost.providers.lxd import LxdProvider

    LxdProvider(project=project).ensure_project()
    expiry_before = lxc("config", "get", "core.remote_token_expiry").stdout.strip()
    name = f"ft-{uuid.uuid4().hex[:6]}"
    pem = Path(client_cert[0]).read_text()
    fingerprint = add_trusted_client(pem, name, projects=(project,))
    made: list[str] = [fingerprint]
    try:
        cert = lxc_json(f"/1.0/certificates/{fingerprint}")
        assert (cert["restricted"], cert["projects"]) == (True, [project])
        with pytest.raises(LxdSetupError, match=f"already trusted as '{name}' with access to project {project} only"):
            add_trusted_client(pem, name + "-2", projects=(project,))
        # What the certificate may do, asked over HTTPS as the client: its project yes, the default one no.
        import requests

        def get(path: str) -> int:
            return requests.get(
                f"https://127.0.0.1:8443/1.0/{path}", cert=client_cert, verify="/var/lib/lxd/server.crt", timeout=30
            ).status_code

        assert get(f"instances?project={project}") == 200
        assert get("instances?project=default") == 403
        assert get("projects/default") in (403, 404)

        expired = create_join_token(name + "-x", expiry_s=2, projects=(project,))
        fresh = create_join_token(name + "-y", expiry_s=3600, projects=(project,))
        assert lxc("config", "get", "core.remote_token_expiry").stdout.strip() == expiry_before  # put back
        lxd_tokens = {t["metadata"]["request"]["name"]: t["metadata"] for t in lxc_json("/1.0/operations?recursion=1")
                      .get("running", []) if t.get("class") == "token"}  # fmt: skip
        assert lxd_tokens[name + "-y"]["expiresAt"] == fresh.expires_at
        assert lxd_tokens[name + "-y"]["request"]["projects"] == [project]
        time.sleep(4)
        refused = _redeem(expired.token, tmp_path / "expired")
        # LXD says "Token has expired" until its own pruning task drops the expired token's operation,
        # and "No matching certificate add operation found" after (a CI run met the second).
        assert refused.returncode != 0, refused.stderr
        assert "Token has expired" in refused.stderr or "No matching certificate add operation" in refused.stderr
        trusted = {c["name"] for c in lxc_json("/1.0/certificates?recursion=1")}
        assert name + "-x" not in trusted
        ok = _redeem(fresh.token, tmp_path / "fresh")
        assert ok.returncode == 0, ok.stderr
        made.append(_fingerprint(tmp_path / "fresh"))
        redeemed = lxc_json(f"/1.0/certificates/{made[-1]}")
        assert (redeemed["name"], redeemed["restricted"], redeemed["projects"]) == (name + "-y", True, [project])
    finally:
        for fp in made:
            lxc("config", "trust", "remove", fp, check=False)
        for n in (name + "-x", name + "-y"):
            lxc("config", "trust", "revoke-token", n, check=False)


# ---------------------------------------------------------------------------------------------
# Through the service layer: placement + the host lock


def test_explicit_pinned_collision_is_refused_naming_the_vm(provider, project, names, tmp_path):
    from vmhost.model import Policy, VmRequest
    from vmhost.placement import PlacementError
    from vmhost.service import VmHost

    host = VmHost(provider, Policy(), lock_path=str(tmp_path / "lock"))
    first = names()
    vm = host.compose(VmRequest.from_dict({"name": first, "cores": 1, "memory": "256M", "pinned_cores": [1]}))
    assert yaml.safe_load(lxc("config", "show", first, "--project", project).stdout)["config"]["limits.cpu"] == "1-1"
    assert vm.allocation.pinned == (1,)
    before_instances, before_volumes = instance_names(project), volume_names(project)
    second = names()
    with pytest.raises(PlacementError, match=first):
        host.compose(VmRequest.from_dict({"name": second, "cores": 1, "memory": "256M", "pinned_cores": [1]}))
    assert instance_names(project) == before_instances
    assert volume_names(project) == before_volumes


def test_hugepage_size_lxd_cannot_back_is_refused_before_anything_is_made(provider, project, names):
    default = lxc_json("/1.0/resources")["memory"]["hugepages_size"]
    other_size = "1G" if default != 1024**3 else "2M"
    name = names()
    alloc = planned(
        name, hugepages=HugepageAllocation(other_size, {0: 1}), memory=1024**3 if other_size == "1G" else 2 * MIB
    )
    with pytest.raises(ProviderError, match=f"so {other_size} pages cannot be used"):
        provider.compose(ComposePlan(alloc))
    assert name not in instance_names(project)
    assert not {v for v in volume_names(project) if v.startswith(name)}


def test_apply_preseed_creates_what_it_describes_and_reports_lxd_refusals(lxd_daemon):
    from vmhost.lxd_setup import LxdSetupError, apply_preseed

    pool = f"ft-{uuid.uuid4().hex[:6]}"
    try:
        apply_preseed({"storage_pools": [{"name": pool, "driver": "dir", "config": {}}]})
        assert yaml.safe_load(lxc("storage", "show", pool).stdout)["driver"] == "dir"
    finally:
        lxc("storage", "delete", pool, check=False)
    bad = f"ft-{uuid.uuid4().hex[:6]}"
    with pytest.raises(LxdSetupError, match="lxd init --preseed failed"):
        apply_preseed({"storage_pools": [{"name": bad, "driver": "no-such-driver", "config": {}}]})
    assert lxc("storage", "show", bad, check=False).returncode != 0


def _lxc_yaml(*args: str) -> dict:
    return yaml.safe_load(lxc(*args).stdout)


def test_lxd_set_up_twice_changes_nothing_on_a_set_up_daemon(lxd_daemon):
    """The charm runs it every hook: lxdbr0 keeps its subnet, the default profile its devices."""
    from vmhost.lxd_setup import LxdHostConfig, ensure_host

    network, profile = _lxc_yaml("network", "show", "lxdbr0"), _lxc_yaml("profile", "show", "default")
    for _ in range(2):
        report = ensure_host(LxdHostConfig())
        assert report.applied == {} and report.notes == ()
    assert _lxc_yaml("network", "show", "lxdbr0")["config"] == network["config"]
    assert _lxc_yaml("network", "show", "lxdbr0")["config"]["ipv4.address"] == "10.197.42.1/24"
    assert _lxc_yaml("profile", "show", "default")["devices"] == profile["devices"]


def test_lxd_set_up_creates_a_missing_pool_once(lxd_daemon):
    from vmhost.lxd_setup import LxdHostConfig, ensure_host

    pool = f"ft-{uuid.uuid4().hex[:6]}"
    cfg = LxdHostConfig(storage_pool=pool, bridge=TEST_BRIDGE)
    profile = _lxc_yaml("profile", "show", "default")
    try:
        first = ensure_host(cfg)
        assert first.applied == {"storage_pools": [{"name": pool, "driver": "dir", "config": {}}]}
        assert _lxc_yaml("storage", "show", pool)["driver"] == "dir"
        assert ensure_host(cfg).applied == {}
        # The default profile already has a root disk and a NIC: the operator's, left as they are.
        assert _lxc_yaml("profile", "show", "default")["devices"] == profile["devices"]
    finally:
        lxc("storage", "delete", pool, check=False)


def test_changed_storage_driver_is_reported_not_applied(lxd_daemon):
    from vmhost.lxd_setup import LxdHostConfig, ensure_host

    report = ensure_host(LxdHostConfig(storage_driver="btrfs"))
    assert report.applied == {}
    assert report.notes == (
        "storage pool default exists with driver dir; lxd-storage-driver=btrfs only applies at first set-up",
    )
    assert _lxc_yaml("storage", "show", "default")["driver"] == "dir"
