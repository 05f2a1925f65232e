"""Parsers: good inputs, bad inputs whose error names the offending token, totality, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.hosts import GiB, MiB, hosts, synthetic_host
from vmhost import machine_setup, placement
from vmhost.model import (
    Allocation,
    Cell,
    DiskAllocation,
    HostTopology,
    HugepageAllocation,
    Nic,
    NicAllocation,
    Policy,
    StoragePool,
    VmRequest,
    even_split,
)
from vmhost.parse import (
    DiskSpec,
    InterfaceSpec,
    ParseCache,
    ParseError,
    format_cpuset,
    format_size,
    parse_cpuset,
    parse_hugepage_size,
    parse_interfaces,
    parse_size,
    parse_storage,
    parse_vm_name,
)

TiB = 1024**4

# --- sizes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("8G", 8 * GiB),
        ("512MiB", 512 * MiB),
        ("512 mib", 512 * MiB),
        ("1.5T", 3 * TiB // 2),
        ("20GB", 20 * 10**9),
        ("2048K", 2 * MiB),
        ("1000", 1000),
        ("0", 0),
        (" 4 G ", 4 * GiB),
        (1234, 1234),
        ("99999999999999999999999999.5G", 99999999999999999999999999 * GiB + GiB // 2),
    ],
)
def test_parse_size_good(value, expected):
    assert parse_size(value) == expected


def test_parse_size_default_unit_applies_only_without_a_unit():
    assert parse_size("20", default_unit="GB") == 20 * 10**9
    assert parse_size("20M", default_unit="GB") == 20 * MiB


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("", "''"),
        ("abc", "'abc'"),
        ("8X", "'X'"),
        ("8 GiBs", "'GiBs'"),
        ("-1", "'-1'"),
        ("1.5", "'1.5'"),  # not whole bytes
        ("1e3", "'1e3'"),
        ("٣G", "'٣G'"),
        (-1, "-1"),
        (True, "True"),
        (None, "None"),
        (1.5, "1.5"),
    ],
)
def test_parse_size_bad_names_the_token(value, token):
    with pytest.raises(ParseError) as e:
        parse_size(value)
    assert token in str(e.value)


@pytest.mark.parametrize(
    ("n", "text"), [(8 * GiB, "8G"), (512 * MiB, "512M"), (2 * TiB, "2T"), (1000, "1000"), (0, "0")]
)
def test_format_size(n, text):
    assert format_size(n) == text
    assert parse_size(text) == n


@given(st.integers(0, 2**70))
def test_format_size_round_trips(n):
    assert parse_size(format_size(n)) == n


# --- hugepage sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "label"),
    [("2M", "2M"), ("2MiB", "2M"), ("2048K", "2M"), ("1G", "1G"), ("1GiB", "1G"), (1024**3, "1G"), (2 * MiB, "2M")],
)
def test_parse_hugepage_size_good(value, label):
    assert parse_hugepage_size(value) == label


@pytest.mark.parametrize(("value", "token"), [("3M", "'3M'"), ("huge", "'huge'"), ("2MB", "'2MB'"), ("", "''")])
def test_parse_hugepage_size_bad(value, token):
    with pytest.raises(ParseError) as e:
        parse_hugepage_size(value)
    assert token in str(e.value) and "2M, 1G" in str(e.value)


# --- cpu sets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0-3,8,10-11", (0, 1, 2, 3, 8, 10, 11)),
        (" 5 , 1 ", (1, 5)),
        ("7", (7,)),
        ("2-2", (2,)),
        ([3, 1, 3], (1, 3)),
        ((0,), (0,)),
    ],
)
def test_parse_cpuset_good(value, expected):
    assert parse_cpuset(value) == expected


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("a", "'a'"),
        ("1-", "'1-'"),
        ("3-1", "'3-1'"),
        ("0,,1", "''"),
        ("0-70000", "'0-70000'"),
        ("1;2", "'1;2'"),
        ("-1", "'-1'"),
        ("", "''"),
        ([-1], "-1"),
        ([True], "True"),
        (["1"], "'1'"),
        ([], "empty"),
        (None, "None"),
    ],
)
def test_parse_cpuset_bad_names_the_token(value, token):
    with pytest.raises(ParseError) as e:
        parse_cpuset(value)
    assert token in str(e.value)


@given(st.sets(st.integers(0, 5000), min_size=1))
def test_cpuset_round_trips(cpus):
    text = format_cpuset(cpus)
    assert parse_cpuset(text) == tuple(sorted(cpus))
    assert parse_cpuset(list(cpus)) == tuple(sorted(cpus))


def test_format_cpuset_is_compact():
    assert format_cpuset([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"
    assert format_cpuset({5}) == "5"


# --- storage -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("root:20(ssd),data:100", (DiskSpec("root", 20 * 10**9, ("ssd",)), DiskSpec("data", 100 * 10**9))),
        ("20,50", (DiskSpec("root", 20 * 10**9), DiskSpec("disk1", 50 * 10**9))),
        ("root:20G", (DiskSpec("root", 20 * GiB),)),
        ("root:1.5(ssd, fast)", (DiskSpec("root", 1_500_000_000, ("ssd", "fast")),)),
        (" root : 8 ", (DiskSpec("root", 8 * 10**9),)),
        ("", ()),
        (None, ()),
    ],
)
def test_parse_storage_good(value, expected):
    assert parse_storage(value) == expected


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("root:0", "'0'"),
        ("root:abc", "'abc'"),
        ("root:20(ssd", "'root:20(ssd'"),
        ("root:20)", "'root:20)'"),
        ("root:20(s sd)", "'s sd'"),
        ("root:20(ssd,)", "''"),
        ("ro ot:20", "'ro ot'"),
        ("a:b:20", "'a:b:20'"),
        ("root:20,,data:1", "'root:20,,data:1'"),
        ("root:20(ssd)x", "'root:20(ssd)x'"),
        (42, "42"),
    ],
)
def test_parse_storage_bad_names_the_token(value, token):
    with pytest.raises(ParseError) as e:
        parse_storage(value)
    assert token in str(e.value)


# --- interfaces ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "eth0:space=public;eth1:subnet=10.20.0.0/24,type=sriov",
            (
                InterfaceSpec("eth0", space=("public",)),
                InterfaceSpec("eth1", subnet=("10.20.0.0/24",), attach="sriov"),
            ),
        ),
        ("space=public", (InterfaceSpec("eth0", space=("public",)),)),
        ("eth0:subnet=10.20.0.5/24", (InterfaceSpec("eth0", subnet=("10.20.0.0/24",)),)),
        (
            "eth0:vlan=100,not_vlan=5,not_space=dmz",
            (InterfaceSpec("eth0", vlan=(100,), not_vlan=(5,), not_space=("dmz",)),),
        ),
        (
            "eth0:ip=fe80::1,name=enp1s0,type=MACVLAN",
            (InterfaceSpec("eth0", ip="fe80::1", name="enp1s0", attach="macvlan"),),
        ),
        ("ip=10.0.0.9", (InterfaceSpec("eth0", ip="10.0.0.9"),)),
        ("eth0:", (InterfaceSpec("eth0"),)),
        ("", ()),
        (None, ()),
    ],
)
def test_parse_interfaces_good(value, expected):
    assert parse_interfaces(value) == expected


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("eth0:space", "'space'"),
        ("eth0:foo=1", "'foo'"),
        ("eth0:subnet=10.0.0.0/33", "'10.0.0.0/33'"),
        ("eth0:vlan=5000", "'5000'"),
        ("eth0:vlan=²", "'²'"),
        ("eth0:ip=1.2.3", "'1.2.3'"),
        ("eth0:type=vxlan", "'vxlan'"),
        ("eth0:name=bad name", "'bad name'"),
        ("eth0:space=a b", "'a b'"),
        ("eth0:space=", "'space'"),
        ("eth0:space=a;eth0:space=b", "'eth0'"),
        ("eth0:type=sriov,attach=bridge", "'attach'"),
        ("eth0:space=a;", "'eth0:space=a;'"),
        ("bad label:space=a", "'bad label'"),
        (7, "7"),
    ],
)
def test_parse_interfaces_bad_names_the_token(value, token):
    with pytest.raises(ParseError) as e:
        parse_interfaces(value)
    assert token in str(e.value)


# --- totality: any text gives a value or a ParseError, never another exception ---------------------------------

PUNCT = st.text(alphabet=st.sampled_from("0123456789abcdefgkmtGMKTiB.:,;()=/- _\n²٣"), max_size=40)
ANY = st.one_of(st.text(max_size=40), PUNCT)


@settings(max_examples=300)
@given(ANY)
def test_parse_size_is_total(text):
    try:
        assert parse_size(text) >= 0
    except ParseError as e:
        assert str(e)


@settings(max_examples=300)
@given(ANY)
def test_parse_cpuset_is_total(text):
    try:
        assert parse_cpuset(text)
    except ParseError as e:
        assert str(e)


@settings(max_examples=300)
@given(st.one_of(ANY, st.text(alphabet=st.sampled_from("root:data(ssd),0123456789GMB. "), max_size=40)))
def test_parse_storage_is_total(text):
    try:
        disks = parse_storage(text)
    except ParseError as e:
        assert str(e)
    else:
        assert all(d.size > 0 for d in disks)
        assert parse_storage(",".join(d.to_str() for d in disks)) == disks


IFACE_TEXT = st.lists(
    st.sampled_from(
        [
            "eth0",
            ":",
            ";",
            ",",
            "=",
            "space",
            "subnet",
            "vlan",
            "ip",
            "type",
            "name",
            "not_vlan",
            "10.0.0.1",
            "/24",
            "sriov",
            "bridge",
            "x",
            "100",
            "::1",
            " ",
        ]
    ),
    max_size=14,
).map("".join)


@settings(max_examples=300)
@given(st.one_of(ANY, IFACE_TEXT))
def test_parse_interfaces_is_total(text):
    try:
        specs = parse_interfaces(text)
    except ParseError as e:
        assert str(e)
    else:
        assert parse_interfaces(";".join(s.to_str() for s in specs)) == specs


# --- round trips of the model -------------------------------------------------------------------------------------


@st.composite
def vm_requests(draw) -> VmRequest:
    cores = draw(st.integers(1, 8))
    pinned = draw(st.one_of(st.none(), st.just("auto"), st.sets(st.integers(0, 63), min_size=cores, max_size=cores)))
    size = draw(st.sampled_from([None, "2M", "1G"]))
    return VmRequest.from_dict(
        {
            "cores": cores,
            "memory": draw(st.integers(1, 16)) * GiB,
            "pinned_cores": sorted(pinned) if isinstance(pinned, set) else pinned,
            "hugepages_backed": size is not None or draw(st.booleans()),
            "hugepage_size": size,
            "storage": draw(st.sampled_from(["", "root:20(ssd),data:100", "10,20G"])),
            "interfaces": draw(
                st.sampled_from(["", "eth0:space=public;eth1:subnet=10.0.0.0/24,type=sriov,ip=10.0.0.4"])
            ),
            "name": draw(st.sampled_from([None, "web-1"])),
            "pool": draw(st.sampled_from([None, "prod"])),
        }
    )


@given(vm_requests())
def test_vm_request_round_trips(r):
    assert VmRequest.from_dict(r.to_dict()) == r


def test_vm_request_memory_without_unit_is_mib_and_bad_fields_are_named():
    assert VmRequest.from_dict({"cores": 1, "memory": "512"}).memory == 512 * MiB
    with pytest.raises(ParseError, match="cores 0"):
        VmRequest.from_dict({"cores": 0, "memory": "1G"})
    with pytest.raises(ParseError, match="lists 1 CPUs but cores is 2"):
        VmRequest.from_dict({"cores": 2, "memory": "1G", "pinned_cores": "3"})


@given(hosts())
def test_host_topology_round_trips(host):
    nics = (
        Nic(name="br0", kind="bridge", addresses=("10.0.0.1/24",), space="public"),
        Nic(name="pf0", numa_node=0, sriov_max_vfs=8),
    )
    pools = (StoragePool(name="default", total=10**12, used=10**9),)
    full = HostTopology(nodes=host.nodes, nics=nics, storage_pools=pools)
    assert HostTopology.from_dict(full.to_dict()) == full
    assert HostTopology.from_dict(host.to_dict()) == host


def test_host_topology_from_design_shape():
    d = {
        "nodes": [
            {
                "id": 0,
                "memory": 137438953472,
                "cores": [{"id": 0, "threads": [0, 128]}, {"id": 1, "threads": [1, 129]}],
                "hugepages": {"2M": 16384, "1G": 8},
            }
        ],
        "nics": [
            {
                "name": "enp65s0f0",
                "numa_node": 1,
                "sriov_max_vfs": 64,
                "bridge": None,
                "vlan": None,
                "addresses": ["10.20.0.5/24"],
                "space": None,
            }
        ],
        "storage_pools": [{"name": "default", "driver": "dir", "total": 500000000000, "used": 0}],
    }
    host = HostTopology.from_dict(d)
    assert host.thread_node == {0: 0, 128: 0, 1: 0, 129: 0}
    assert host.siblings[128] == (0, 128)
    assert host.nics[0].sriov_max_vfs == 64 and host.storage_pools[0].free == 500000000000


@given(
    st.builds(
        Allocation,
        name=st.sampled_from(["vm-1", "vm-3f2a"]),
        vcpus=st.integers(1, 8),
        memory=st.integers(1, 64).map(lambda g: g * GiB),
        pinned=st.one_of(st.none(), st.lists(st.integers(0, 63), min_size=1, max_size=8, unique=True).map(tuple)),
        numa_nodes=st.lists(st.integers(0, 3), max_size=3, unique=True).map(lambda x: tuple(sorted(x))),
        hugepages=st.one_of(
            st.none(),
            st.builds(
                HugepageAllocation,
                size=st.sampled_from(["2M", "1G"]),
                per_node=st.dictionaries(st.integers(0, 3), st.integers(1, 4096), min_size=1),
            ),
        ),
        disks=st.lists(
            st.builds(DiskAllocation, label=st.just("root"), size=st.integers(1, 10**12), pool=st.just("default")),
            max_size=1,
        ).map(tuple),
        nics=st.lists(
            st.builds(
                NicAllocation,
                label=st.just("eth0"),
                type=st.sampled_from(["bridge", "macvlan", "sriov"]),
                parent=st.just("br0"),
                vlan=st.one_of(st.none(), st.integers(1, 4094)),
                ip=st.one_of(st.none(), st.just("10.0.0.5")),
                numa_node=st.one_of(st.none(), st.integers(0, 3)),
            ),
            max_size=2,
        ).map(tuple),
        cells=st.lists(
            st.builds(Cell, node=st.integers(0, 3), vcpus=st.just((0, 1)), memory=st.just(GiB)), max_size=2
        ).map(tuple),
        threads_per_core=st.integers(1, 2),
        resource_pool=st.one_of(st.none(), st.just("prod")),
        owner=st.one_of(st.none(), st.just("model/app/1")),
        other=st.booleans(),
    )
)
def test_allocation_round_trips(a):
    assert Allocation.from_dict(a.to_dict()) == a


def test_allocation_writes_resource_pool_and_still_reads_the_old_pool_key():
    """VMs recorded before the rename carry "pool": they keep their resource pool."""
    a = Allocation(name="vm", vcpus=1, memory=GiB, resource_pool="prod")
    d = a.to_dict()
    assert d["resource_pool"] == "prod" and "pool" not in d
    old = {k: v for k, v in d.items() if k != "resource_pool"} | {"pool": "prod"}
    assert Allocation.from_dict(old) == a
    assert Allocation.from_dict(old | {"resource_pool": "dev"}).resource_pool == "dev"  # the new key wins


def test_allocation_to_dict_has_the_design_keys():
    host = synthetic_host(nodes=1, hugepages={"2M": 512})
    from vmhost.model import Policy
    from vmhost.placement import place

    a = place(
        host,
        [],
        VmRequest.from_dict({"cores": 1, "memory": "512M", "pinned_cores": "auto", "hugepage_size": "2M"}),
        Policy(),
    )
    d = a.to_dict()
    assert {"name", "vcpus", "pinned", "numa_nodes", "memory", "hugepages", "disks", "nics"} <= set(d)
    assert d["hugepages"] == {"size": "2M", "per_node": {"0": 256}}


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"cpu_overcommit_ratio": 0}, "cpu_overcommit_ratio 0 must be a number from 0.1 to 64"),
        ({"cpu_overcommit_ratio": float("nan")}, "cpu_overcommit_ratio nan"),
        ({"memory_overcommit_ratio": "lots"}, "memory_overcommit_ratio 'lots'"),
        ({"reserved_cores": "0-x"}, "'0-x'"),
        ({"reserved_memory": "8Q"}, "'8Q'"),
    ],
)
def test_policy_bad_fields_are_named(fields, needle):
    with pytest.raises(ParseError) as err:
        Policy.from_dict(fields)
    assert needle in str(err.value)


def test_vm_request_cores_must_be_ascii_digits():
    with pytest.raises(ParseError, match="cores '²'"):
        VmRequest.from_dict({"cores": "²"})
    assert VmRequest.from_dict({"cores": " 4 "}).cores == 4


def test_policy_reserved_memory_bare_number_is_mib_like_the_charm_option():
    assert Policy.from_dict({"reserved_memory": "2048"}).reserved_memory == 2048 * 1024**2
    assert Policy.from_dict({"reserved_memory": "2G"}).reserved_memory == 2 * 1024**3
    assert Policy.from_dict({"reserved_memory": 4096}).reserved_memory == 4096  # ints are bytes (the API)


@pytest.mark.parametrize("name", ["Bad_Name", "-lead", "trail-", "a" * 64, "a.b", "", "vm 1", "ümlaut"])
def test_vm_names_are_host_names_or_refused_naming_them(name):
    with pytest.raises(ParseError) as err:
        parse_vm_name(name)
    assert repr(name) in str(err.value)


def test_vm_request_name_is_checked_in_the_workload_package():
    assert VmRequest.from_dict({"name": "db-1"}).name == "db-1"
    assert parse_vm_name("a" * 63) == "a" * 63
    with pytest.raises(ParseError, match=r"'x/\.\./y'"):
        VmRequest.from_dict({"name": "x/../y"})


def test_parse_cache_parses_each_text_once_and_forgets_what_a_read_did_not_see():
    calls: list[str] = []

    def parse(text: str) -> dict:
        calls.append(text)
        return {"text": text}

    cache: ParseCache[dict] = ParseCache()
    a = cache.get("".join(["{", "a", "}"]), parse)  # equal texts in distinct string objects
    assert cache.get("{a}", parse) is a and calls == ["{a}"]
    cache.end_read()
    assert cache.get("{a}", parse) is a and cache.get("{b}", parse) == {"text": "{b}"}
    assert calls == ["{a}", "{b}"]
    cache.end_read()
    cache.end_read()  # a read that saw neither: both are forgotten
    cache.get("{a}", parse)
    assert calls == ["{a}", "{b}", "{a}"]


@given(total=st.integers(0, 10**6), parts=st.integers(1, 64), unit=st.sampled_from([1, 2, 1024]))
def test_even_split_is_the_one_rule_for_placement_and_machine_setup(total, parts, unit):
    """Shares sum to the total, differ by at most one unit (one when the total is not whole units), larger first."""
    shares = even_split(total, parts, unit)
    step = unit if total % unit == 0 else 1
    assert sum(shares) == total and len(shares) == parts
    assert shares == sorted(shares, reverse=True) and shares[0] - shares[-1] <= step
    assert all(s % step == 0 for s in shares)
    assert placement.even_split is even_split and machine_setup.even_split is even_split
