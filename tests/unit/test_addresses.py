"""Static addresses (`ip=`) are checked on the plan itself: inside the subnet, and no one else's.

Not the network or broadcast address, not the host's own, not a gateway, not another VM's (made by the
CLI, an action or any remote model alike), not twice in one VM. The check is in placement, so
VmHost.compose makes it under the host lock on exactly the plan it creates.
"""

from __future__ import annotations

import pytest

from tests.unit.fakes import FakeProvider
from tests.unit.hosts import GiB, synthetic_host
from vmhost.model import Allocation, Nic, NicAllocation, Policy, VmRequest
from vmhost.placement import PlacementError, place
from vmhost.service import VmHost

NICS = (
    Nic(name="br0", kind="bridge", addresses=("10.0.0.1/24", "fd00::1/64"), gateways=("10.0.0.254",)),
    Nic(name="eth1", kind="physical", addresses=("192.168.1.5/24",)),
    Nic(name="p2p", kind="physical", addresses=("172.16.0.0/31",)),
)
HOST = synthetic_host(nodes=1, memory_per_node=16 * GiB, nics=NICS)


def req(interfaces: str, **kw) -> VmRequest:
    return VmRequest.from_dict({"cores": 1, "memory": "1G", "interfaces": interfaces, **kw})


def relation_vm(ip: str) -> Allocation:
    """A VM another model asked for over the relation (only its owner key tells it apart)."""
    nic = NicAllocation(label="eth0", type="bridge", parent="br0", ip=ip)
    return Allocation(name="vm-1a2b3c4d", vcpus=1, memory=GiB, nics=(nic,), owner="uuid-b/app/req-1")


@pytest.mark.parametrize(
    ("interfaces", "says"),
    [
        ("eth0:ip=10.0.0.1", "interface eth0: ip 10.0.0.1 is an address of this host (br0); choose another address"),
        ("eth0:ip=10.0.0.0", "interface eth0: ip 10.0.0.0 is the network address of 10.0.0.0/24"),
        ("eth0:ip=10.0.0.255", "interface eth0: ip 10.0.0.255 is the broadcast address of 10.0.0.0/24"),
        ("eth0:ip=10.0.0.254", "interface eth0: ip 10.0.0.254 is the gateway on br0"),
        ("eth0:ip=192.168.1.5", "interface eth0: ip 192.168.1.5 is an address of this host (eth1)"),
        ("eth0:ip=fd00::", "interface eth0: ip fd00:: is the network address of fd00::/64"),
        ("eth0:ip=fd00::1", "ip fd00::1 is an address of this host (br0)"),
        ("eth0:ip=10.0.0.7;eth1:ip=10.0.0.7", "interface eth1: ip 10.0.0.7 is already given to interface eth0"),
        ("eth0:ip=10.0.1.5", "no host interface matches"),  # outside every subnet: refused as before
    ],
)
def test_static_addresses_no_one_else_has(interfaces, says):
    with pytest.raises(PlacementError) as e:
        place(HOST, [], req(interfaces), Policy())
    assert says in str(e.value)


def test_an_address_another_vm_holds_is_refused_whoever_made_that_vm():
    with pytest.raises(PlacementError, match=r"ip 10\.0\.0\.7 is already given to VM vm-1a2b3c4d"):
        place(HOST, [relation_vm("10.0.0.7")], req("eth0:ip=10.0.0.7"), Policy())
    # Recorded with a prefix, or on a NUMA-bound VM request: the same.
    with pytest.raises(PlacementError, match="already given to VM vm-1a2b3c4d"):
        place(HOST, [relation_vm("10.0.0.7/24")], req("eth0:ip=10.0.0.7", pinned_cores="auto"), Policy())
    a = place(HOST, [relation_vm("10.0.0.7")], req("eth0:ip=10.0.0.8"), Policy())
    assert a.nics[0].ip == "10.0.0.8"


def test_a_point_to_point_link_has_no_network_or_broadcast_address_to_refuse():
    a = place(HOST, [], req("eth0:name=p2p,ip=172.16.0.1,type=macvlan"), Policy())
    assert a.nics[0].ip == "172.16.0.1"


def test_compose_refuses_a_second_vm_on_the_same_address_and_creates_nothing(tmp_path):
    provider = FakeProvider(HOST)
    host = VmHost(provider, Policy(), lock_path=str(tmp_path / "lock"))
    first = host.compose(req("eth0:ip=10.0.0.7"))
    with pytest.raises(PlacementError, match=f"already given to VM {first.name}"):
        host.compose(req("eth0:ip=10.0.0.7", name="second"))
    assert list(provider.vms) == [first.name]
    host.decompose(first.name)
    assert host.compose(req("eth0:ip=10.0.0.7", name="third")).allocation.nics[0].ip == "10.0.0.7"


def test_image_boot_without_a_hostname_still_gets_its_static_address_in_the_seed(tmp_path):
    """Issue 10: on LXD an image boot with ip= but no hostname wrote no network-config at all."""
    from vmhost.providers import lxd_config

    provider = FakeProvider(HOST)
    host = VmHost(provider, Policy(), lock_path=str(tmp_path / "lock"))
    vm = host.compose(req("eth0:ip=10.0.0.7"), boot="image", image="jammy")
    plan = provider.plans[vm.name]
    assert plan.cloud_init is not None and plan.cloud_init.hostname == vm.name
    config = lxd_config.instance_config(plan, prefixes={"eth0": 24})
    assert "10.0.0.7/24" in config["cloud-init.network-config"]
