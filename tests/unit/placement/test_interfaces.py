"""Interfaces (docs/design.md §4 "Interfaces"): MAAS constraints matched against the host's own NICs;
bridge (or a hypervisor network) first, then an SR-IOV VF (counted, never past sriov_max_vfs), then
macvlan; static addresses no one else has. Refusals in rule 7's form."""

from __future__ import annotations

import pytest

from tests.unit.hosts import synthetic_host
from tests.unit.placement.common import req, run, sriov_host
from vmhost.model import Nic, Policy, VmRequest
from vmhost.parse import ParseError
from vmhost.placement import PlacementError, compute_usage, place


def net_host():
    nics = (
        Nic(name="enp1s0", kind="physical", bridge="br0"),
        Nic(name="br0", kind="bridge", addresses=("10.0.0.5/24",), space="public"),
        Nic(name="enp2s0", kind="physical", addresses=("10.30.0.5/24",), space="storage"),
        Nic(name="enp2s0.100", kind="vlan", vlan=100, addresses=("10.100.0.5/24",)),
        Nic(name="enp3s0", kind="physical", numa_node=1, sriov_max_vfs=4, addresses=("10.20.0.5/24",)),
    )
    return synthetic_host(nodes=2, cores_per_node=2, nics=nics)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("eth0:space=public", ("bridge", "br0", None)),
        ("eth0:name=enp1s0", ("bridge", "br0", None)),  # a bridge port attaches through its bridge
        ("eth0:subnet=10.30.0.0/24", ("macvlan", "enp2s0", None)),
        ("eth0:vlan=100", ("macvlan", "enp2s0.100", 100)),
        ("eth0:subnet=10.20.0.0/24", ("sriov", "enp3s0", None)),
        ("eth0:subnet=10.20.0.0/24,type=macvlan", ("macvlan", "enp3s0", None)),
        ("eth0:not_space=public,not_space=storage,not_vlan=100", ("sriov", "enp3s0", None)),
    ],
)
def test_interface_resolution(spec, expected):
    a = place(net_host(), [], req(cores=1, interfaces=spec), Policy())
    nic = a.nics[0]
    assert (nic.type, nic.parent, nic.vlan) == expected
    assert nic.label == "eth0"


def test_interface_static_ip_is_checked_and_copied():
    a = place(net_host(), [], req(cores=1, interfaces="eth0:space=public,ip=10.0.0.50"), Policy())
    assert a.nics[0].ip == "10.0.0.50" and a.nics[0].parent == "br0"
    with pytest.raises(PlacementError, match=r"^interface eth0: no host interface matches space=public,ip=10.9.9.9"):
        place(net_host(), [], req(cores=1, interfaces="eth0:space=public,ip=10.9.9.9"), Policy())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("eth0:space=nowhere", "interface eth0: no host interface matches space=nowhere; host interfaces: "),
        (
            "eth0:space=storage,attach=bridge",
            "interface eth0: no bridge matches space=storage,attach=bridge; matching: enp2s0",
        ),
        (  # type= is MAAS's host interface kind: enp2s0 is physical, not a bridge
            "eth0:space=storage,type=bridge",
            "interface eth0: no host interface matches space=storage,type=bridge; host interfaces: ",
        ),
        (
            "eth0:space=public,type=sriov",
            "interface eth0: sriov needs a free VF on a NIC matching space=public,attach=sriov; ",
        ),
    ],
)
def test_interface_errors(spec, message):
    with pytest.raises(PlacementError) as e:
        place(net_host(), [], req(cores=1, interfaces=spec), Policy())
    assert str(e.value).startswith(message)


def test_no_interface_spec_means_no_nics():
    assert place(net_host(), [], req(cores=1), Policy()).nics == ()


def test_several_interfaces_keep_their_labels():
    a = place(net_host(), [], req(cores=1, interfaces="eth0:space=public;eth1:vlan=100"), Policy())
    assert [(n.label, n.parent) for n in a.nics] == [("eth0", "br0"), ("eth1", "enp2s0.100")]


def test_a_hypervisor_network_is_attached_when_no_bridge_matches():
    host = synthetic_host(1, 2, 1, nics=[Nic(name="default", kind="network", addresses=("192.168.122.1/24",))])
    got = place(
        host, [], VmRequest.from_dict({"cores": 1, "memory": "1G", "interfaces": "eth0:name=default"}), Policy()
    )
    assert [(n.type, n.parent) for n in got.nics] == [("network", "default")]
    got = place(
        host,
        [],
        VmRequest.from_dict({"cores": 1, "memory": "1G", "interfaces": "eth0:subnet=192.168.122.0/24"}),
        Policy(),
    )
    assert [(n.type, n.parent) for n in got.nics] == [("network", "default")]


def test_sriov_vfs_are_counted_and_never_exceeded():
    host = sriov_host(max_vfs=1)
    r = req(cores=1, interfaces="eth0:subnet=10.20.0.0/24,type=sriov")
    allocs = run(host, [r, r])
    assert sorted(a.nics[0].parent for a in allocs) == ["pf0", "pf1"]
    assert compute_usage(host, allocs, Policy()).vfs_used == {"pf0": 1, "pf1": 1}
    with pytest.raises(PlacementError) as e:
        place(host, allocs, r, Policy())
    assert str(e.value) == (
        "interface eth0: sriov needs a free VF on a NIC matching subnet=10.20.0.0/24,attach=sriov; "
        "all VFs are in use (pf0 1/1, pf1 1/1)"
    )


def _vf_host(vfs: int = 1):
    nics = [
        Nic(name="enp65s0f0", numa_node=1, sriov_max_vfs=vfs),
        Nic(name="eno1", kind="physical", numa_node=0),
    ]
    return synthetic_host(2, 4, 2, nics=nics)


def test_two_forced_sriov_interfaces_on_one_vf_are_refused_with_the_vf_count():
    req = VmRequest.from_dict({"cores": 1, "memory": "1G", "interfaces": "eth0:type=sriov;eth1:type=sriov"})
    with pytest.raises(PlacementError) as err:
        place(_vf_host(1), [], req, Policy())
    assert str(err.value) == "sriov: need 2 VFs at once, enp65s0f0 has 1 free"


def test_preferred_sriov_beyond_the_free_vfs_falls_back_to_macvlan():
    req = VmRequest.from_dict({"cores": 1, "memory": "1G", "interfaces": "eth0:name=enp65s0f0;eth1:name=enp65s0f0"})
    got = place(_vf_host(1), [], req, Policy())
    assert sorted(n.type for n in got.nics) == ["macvlan", "macvlan"] or sorted(n.type for n in got.nics) == [
        "macvlan",
        "sriov",
    ]
    assert sum(1 for n in got.nics if n.type == "sriov") <= 1


_IFACE_TOKENS = [
    "type=sriov",
    "type=bridge",
    "type=macvlan",
    "name=enp65s0f0",
    "name=eno1",
    "name=br0",
    "space=public",
    "vlan=10",
    "subnet=10.20.0.0/24",
    "ip=10.20.0.7",
]


def test_place_is_total_over_interface_constraints():
    """Any interface mix on a host with a bridge, a VLAN, a physical NIC and SR-IOV: an Allocation or a PlacementError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    nics = [
        Nic(name="br0", kind="bridge", addresses=("10.20.0.1/24",), space="public"),
        Nic(name="eno1", kind="physical", numa_node=0, bridge="br0"),
        Nic(name="eno2.10", kind="vlan", vlan=10, numa_node=0),
        Nic(name="enp65s0f0", kind="physical", numa_node=1, sriov_max_vfs=2),
    ]
    host = synthetic_host(2, 2, 2, hugepages={"2M": 1024}, nics=nics)
    iface = st.lists(st.sampled_from(_IFACE_TOKENS), min_size=0, max_size=3, unique=True).map(",".join)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(iface, min_size=1, max_size=4), st.sampled_from([None, "auto"]), st.booleans())
    def check(specs, pinned, huge):
        text = ";".join(f"eth{i}:{s}" for i, s in enumerate(specs))
        try:
            req = VmRequest.from_dict(
                {"cores": 2, "memory": "1G", "interfaces": text, "pinned_cores": pinned, "hugepages_backed": huge}
            )
        except ParseError:
            return  # a malformed spec (two types, say) is the parser's to refuse, tested there
        try:
            got = place(host, [], req, Policy())
        except PlacementError:
            return
        assert len(got.nics) == len(specs)
        used = {}
        for n in got.nics:
            if n.type == "sriov":
                used[n.parent] = used.get(n.parent, 0) + 1
        assert all(v <= 2 for v in used.values())

    check()
