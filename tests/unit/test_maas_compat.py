"""MAAS compose compatibility (issue 16): MAAS's own test cases for compose, as a table.

Each row cites the MAAS test (canonical/maas at 0d716782d, the parent of 08f65b9c1 that removed VM hosts)
or the MAAS code it was read from. Three kinds of rows:
  SAME    MAAS accepts the input; here it means the same disks, tags, NIC constraints, vCPUs and pinning.
  REFUSED MAAS's behaviour was a bug or needs something only MAAS has; here one sentence names the MAAS
          concept and what to use instead (README "Differences from MAAS").
  OURS    our extensions, which MAAS refuses.
"""

from __future__ import annotations

import re

import pytest
import yaml

from charm_config import ComposeParams
from tests.unit.hosts import synthetic_host
from vmhost.cloudinit import seed_documents
from vmhost.model import CloudInit, Nic, NicAllocation, Policy, StoragePool, VmRequest
from vmhost.parse import DiskSpec, InterfaceSpec, ParseError, guest_ifname, parse_interfaces, parse_storage
from vmhost.placement import PlacementError, place

GB = 10**9
MAAS = "canonical/maas@0d716782d:"
PODS = MAAS + "src/maasserver/forms/tests/test_pods.py::TestComposeMachineForm::"
NCFF = MAAS + "src/maasserver/tests/test_node_constraint_filter_forms.py::"
LCM = MAAS + "src/provisioningserver/utils/tests/test_constraints.py::TestGetLabeledConstraintsMap::"
IFNAME = MAAS + "src/provisioningserver/utils/tests/test_network.py::TestGetIfnameForLabel::"
IFACE = MAAS + "src/maasserver/models/tests/test_interface.py::TestInterfaceQueriesMixin::"
CODE = MAAS + "src/"  # read from MAAS's parsing code, no MAAS test of its own


def disks(*spec: tuple) -> tuple[DiskSpec, ...]:
    return tuple(DiskSpec(label, size, tuple(tags)) for label, size, *tags in spec)


# --- storage: (maas source, input, disks MAAS composes: label, bytes, tags...) ------------------------------------
STORAGE_SAME = [
    (
        PODS + "test_get_machine_uses_passed_values",
        "root:12(t1,t2,t3),extra:9(t4,t5,t6)",
        disks(("root", 12 * GB, "t1", "t2", "t3"), ("extra", 9 * GB, "t4", "t5", "t6")),
    ),
    (
        PODS + "test_get_machine_handles_no_tags_in_storage",
        "root:8,extra:16",
        disks(("root", 8 * GB), ("extra", 16 * GB)),
    ),
    (
        NCFF + "TestUtils::test_get_storage_constraints_from_string_returns_size_in_bytes",
        "1.5,3,6.75",
        disks(("root", 1_500_000_000), ("disk1", 3 * GB), ("disk2", 6_750_000_000)),
    ),
    (
        NCFF + "TestUtils::test_get_storage_constraints_from_string_sorts_more_tags_first",
        "1(ssd),1(ssd,sata),1(ssd),1(ssd,sata,removable)",
        disks(
            ("root", GB, "ssd"),
            ("disk3", GB, "ssd", "sata", "removable"),
            ("disk1", GB, "ssd", "sata"),
            ("disk2", GB, "ssd"),
        ),
    ),
    (
        NCFF + "TestFilterNodeForm::test_storage_single_contraint_matches_decimal_size",
        "1.5",
        disks(("root", 1_500_000_000)),
    ),
    (
        NCFF + "TestFilterNodeForm::test_storage_with_named_constraints",
        "root:8(lvm),physical:5(rotary,5400rpm),other:20",
        disks(("root", 8 * GB, "lvm"), ("physical", 5 * GB, "rotary", "5400rpm"), ("other", 20 * GB)),
    ),
    (
        NCFF + "TestFilterNodeForm::test_storage_multi_contraint_matches_on_size_and_tags",
        "3(ssd),3(ssd)",
        disks(("root", 3 * GB, "ssd"), ("disk1", 3 * GB, "ssd")),
    ),
    (
        NCFF + "TestFilterNodeForm::test_storage_first_constraint_matches_blockdevice_with_root",
        "10(ssd),5,20",
        disks(("root", 10 * GB, "ssd"), ("disk1", 5 * GB), ("disk2", 20 * GB)),
    ),
    (
        CODE + "maasserver/node_constraint_filter_forms.py:STORAGE_REGEX (size [0-9.]+)",
        "root:5.,data:.5",
        disks(("root", 5 * GB), ("data", 500_000_000)),
    ),
    (
        CODE + "maasserver/node_constraint_filter_forms.py:STORAGE_REGEX (label optional, may repeat)",
        "data:1,data:2,data:3",
        disks(("data", GB), ("data-2", 2 * GB), ("data-3", 3 * GB)),
    ),
    (
        CODE + "maasserver/node_constraint_filter_forms.py:get_storage_constraints_from_string (int(float * 1000**3))",
        "root:1.0000000005",
        disks(("root", GB)),
    ),
]

STORAGE_REFUSED = [
    # (maas source, input, words the one sentence must hold)
    (
        NCFF + "TestFilterNodeForm::test_storage_matches_disk_with_root_mount_on_disk (size 0)",
        "0",
        ("0-byte disk", "MAAS", "at least 64M"),
    ),
    (
        NCFF + "TestFilterNodeForm::test_storage_multi_contraint_matches_large_disk_count",
        "0,0,0",
        ("0-byte disk", "MAAS"),
    ),
    (
        CODE + "maasserver/node_constraint_filter_forms.py:STORAGE_REGEX ([0-9.]+ lets float() fail: MAAS errors)",
        "root:1.2.3",
        ("not a size",),
    ),
    (NCFF + "TestFilterNodeForm::test_storage_invalid_constraint", "10(ssd,20", ("unmatched",)),
    (NCFF + "TestFilterNodeForm::test_storage_invalid_size_constraint", "abc", ("not a size",)),
]


def test_empty_storage_gives_maas_default_root_disk_where_the_host_has_pools():
    # PODS test_get_machine_uses_all_initial_values: no storage -> root:8(local) (DEFAULT_COMPOSED_STORAGE)
    host = synthetic_host(nodes=1, storage_pools=[StoragePool("default", total=100 * GB)])
    for storage in (None, ""):
        a = place(host, [], VmRequest.from_dict({"storage": storage}), Policy())
        assert [(d.label, d.size, d.tags, d.pool) for d in a.disks] == [("root", 8 * GB, ("local",), "default")]
    local = synthetic_host(
        nodes=1, storage_pools=[StoragePool("default", total=GB), StoragePool("local", total=9 * GB)]
    )
    assert place(local, [], VmRequest.from_dict({}), Policy()).disks[0].pool == "local"  # the tag names the pool


def test_storage_ours_units_and_spaces():
    assert parse_storage("root:20G, data:512M(ssd)") == disks(("root", 20 * 1024**3), ("data", 512 * 1024**2, "ssd"))


# --- interfaces: the labeled constraint map ---------------------------------------------------------------------
IFACE_SAME = [
    (LCM + "test_single_value_map", "a:space=c", (InterfaceSpec("a", space=("c",)),)),
    (LCM + "test_multiple_value_map", "a:space=c,vlan=5", (InterfaceSpec("a", space=("c",), vlan=(5,)),)),
    (
        LCM + "test_multiple_value_map_with_duplicate_keys_appends_to_list",
        "a:space=abc,space=def,space=ghi",
        (InterfaceSpec("a", space=("abc", "def", "ghi")),),
    ),
    (
        LCM + "test_multiple_label_map",
        "foo:space=b;bar:vid=4",
        (InterfaceSpec("foo", space=("b",)), InterfaceSpec("bar", vid=(4,))),
    ),
    (LCM + "test_empty_string_returns_empty_map", "", ()),
    (
        NCFF + "TestFilterNodeForm::test_interfaces_filters_work_with_multiple_labels",
        "label:vid=2;vlan:vid=1",
        (InterfaceSpec("label", vid=(2,)), InterfaceSpec("vlan", vid=(1,))),
    ),
    (
        NCFF + "TestFilterNodeForm::test_interfaces_filters_different_key_treated_as_AND_operation",
        "any:vid=1,vid=2",
        (InterfaceSpec("any", vid=(1, 2)),),
    ),
    (
        PODS + "test_get_machine_with_interfaces_by_subnet (numeric label, as Juju passes)",
        "0:subnet=10.0.0.0/24",
        (InterfaceSpec("eth0", subnet=("10.0.0.0/24",)),),
    ),
    (PODS + "test_get_machine_with_interfaces_by_space", "eth0:space=dmz", (InterfaceSpec("eth0", space=("dmz",)),)),
    (
        PODS + "test_get_machine_with_interfaces_by_spaces",
        "eth0:space=dmz;eth1:space=storage",
        (InterfaceSpec("eth0", space=("dmz",)), InterfaceSpec("eth1", space=("storage",))),
    ),
    (
        PODS + "test_get_machine_with_interfaces_with_unreserved_ip",
        "eth0:ip=10.0.0.9",
        (InterfaceSpec("eth0", ip="10.0.0.9"),),
    ),
    (
        PODS + "test_get_machine_with_interfaces_by_subnet_with_default_mode",
        "eth0:subnet=10.0.0.0/24,mode=auto",
        (InterfaceSpec("eth0", subnet=("10.0.0.0/24",)),),
    ),
    (
        MAAS + "src/maasserver/models/tests/test_bmc.py (ip_mode unconfigured)",
        "maas0:ip=10.0.0.9;maas1:mode=unconfigured",
        (InterfaceSpec("maas0", ip="10.0.0.9"), InterfaceSpec("maas1", mode="unconfigured")),
    ),
    (
        IFACE + "test_filter_by_specifiers_matches_type",
        "a:type=physical;b:type=vlan;c:type=bond;d:type=bridge",
        tuple(InterfaceSpec(x, type=(t,)) for x, t in zip("abcd", ("physical", "vlan", "bond", "bridge"), strict=True)),
    ),
    (IFACE + "test_filter_by_specifiers_matches_vid", "a:vid=1,vid=2", (InterfaceSpec("a", vid=(1, 2)),)),
    (
        IFACE + "test_filter_by_specifiers_matches_subnet_cidr_alias",
        "a:subnet_cidr=10.1.0.0/16",
        (InterfaceSpec("a", subnet_cidr=("10.1.0.0/16",)),),
    ),
    (
        IFACE + "test_filter_by_specifiers_matches_undefined_space",
        "a:space=undefined",
        (InterfaceSpec("a", space=("undefined",)),),
    ),
    (
        IFACE + "test_filter_by_specifiers_matches_unconfigured_mode",
        "a:mode=unconfigured",
        (InterfaceSpec("a", mode="unconfigured"),),
    ),
    (
        CODE + "maasserver/utils/orm.py:_add_vlan_vid_query ('untagged' is 0)",
        "a:vid=untagged,not_vid=5",
        (InterfaceSpec("a", vid=(0,), not_vid=(5,)),),
    ),
    (
        CODE + "maasserver/models/vlan.py:_add_default_query (parse_integer: 0x, 0b)",
        "a:vlan=0x10,vlan=0b11,vlan=untagged",
        (InterfaceSpec("a", vlan=(16, 3, 0)),),
    ),
    (
        CODE + "maasserver/models/vlan.py:get_specifiers_q (vid: specifier)",
        "a:vlan=vid:7",
        (InterfaceSpec("a", vlan=(7,)),),
    ),
    (
        CODE + "maasserver/models/interface.py:get_specifiers_q (link_speed__gte)",
        "a:link_speed=1000,link_speed=10000",
        (InterfaceSpec("a", link_speed=1000),),
    ),
    (
        CODE + "maasserver/models/interface.py:get_specifiers_q (name, not_name)",
        "a:name=eth1,name=eth2,not_name=eth3",
        (InterfaceSpec("a", name_in=("eth1", "eth2"), not_name=("eth3",)),),
    ),
    (
        CODE + "maasserver/node_constraint_filter_forms.py:nodes_by_interface (several ip)",
        "a:ip=10.0.0.9,ip=10.0.0.10",
        (InterfaceSpec("a", ip="10.0.0.9", more_ips=("10.0.0.10",)),),
    ),
    (
        CODE + "maasserver/models/interface.py:get_specifiers_q (not_ip)",
        "a:not_ip=10.0.0.1",
        (InterfaceSpec("a", not_ip=("10.0.0.1",)),),
    ),
    (
        CODE + "maasserver/models/subnet.py (subnet=cidr:)",
        "a:subnet=cidr:10.2.0.0/16",
        (InterfaceSpec("a", subnet=("10.2.0.0/16",)),),
    ),
]

IFACE_REFUSED = [
    # (maas source, input, words the one sentence must hold: the MAAS concept and what to use instead)
    (NCFF + "TestFilterNodeForm::test_interfaces_constraint_validated", "label:fabric=fabric-0", ("fabrics", "vlan=")),
    (
        NCFF + "TestFilterNodeForm::test_interfaces_filters_by_fabric_class",
        "label:fabric_class=10g",
        ("fabric classes", "link_speed="),
    ),
    (
        NCFF + "TestFilterNodeForm::test_interfaces_constraint_with_multiple_labels_and_values_validated",
        "label:fabric=fabric-0,fabric=fabric-1,space=default",
        ("fabrics",),
    ),
    (IFACE + "test_filter_by_specifiers_matches_interface_id", "a:id=42", ("interface ids", "name=")),
    (IFACE + "test_get_matching_node_map_by_tag", "a:tag=sriov", ("MAAS interface tags", "name=")),
    (CODE + "maasserver/models/interface.py:get_specifiers_q (hostname)", "a:hostname=node-1", ("hostnames",)),
    (
        IFACE + "test_filter_by_specifiers_matches_subnet_specifier (a MAAS subnet name)",
        "a:subnet=my-subnet",
        ("MAAS subnet names", "CIDR"),
    ),
    (
        IFACE + "test_filter_by_specifiers_matches_vlan (a MAAS VLAN name)",
        "a:vlan=my-vlan",
        ("MAAS VLAN name", "vlan=100"),
    ),
    (CODE + "maasserver/models/vlan.py:get_specifiers_q (fabric:)", "a:vlan=fabric:f1", ("MAAS VLAN name",)),
    (CODE + "maasserver/models/vlan.py:validate_vid", "a:vid=4095", ("0-4094",)),
    (
        IFACE + "test_filter_by_specifiers_matches_type (unknown)",
        "a:type=unknown",
        ("physical, bond, bridge, vlan", "attach="),
    ),
    (LCM + "test_missing_key_value_pair_raises", "a:bc", ("key=value",)),
    (LCM + "test_duplicate_label_raises", "a:space=c;a:space=e", ("twice",)),
    (LCM + "test_invalid_label_raises", "*:space=c", ("label",)),
    (
        NCFF + "TestFilterNodeForm::test_interfaces_constraint_rejected_if_key_is_invalid",
        "label:chirp_chirp_thing=silenced",
        ("unknown",),
    ),
    (
        CODE + "maasserver/models/bmc.py:_assign_ip_addresses (unconfigured drops the ip=)",
        "a:ip=10.0.0.9,mode=unconfigured",
        ("mode=static",),
    ),
    (
        CODE + "maasserver/node_constraint_filter_forms.py:nodes_by_interface (mode: last one wins)",
        "a:mode=dhcp,mode=static",
        ("twice",),
    ),
]

IFACE_OURS = [
    (
        "unlabeled (MAAS needs a label)",
        "space=public;space=dmz",
        (InterfaceSpec("eth0", space=("public",)), InterfaceSpec("eth1", space=("dmz",))),
    ),
    (
        "a label with no constraints: any host interface (MAAS: test_label_with_no_constraints_raises)",
        "eth0:",
        (InterfaceSpec("eth0"),),
    ),
    ("attach= how the guest NIC attaches", "eth0:attach=sriov", (InterfaceSpec("eth0", attach="sriov"),)),
    (
        "old spelling type=macvlan|sriov, no MAAS host type has these names",
        "eth0:type=macvlan;eth1:type=SRIOV",
        (InterfaceSpec("eth0", attach="macvlan"), InterfaceSpec("eth1", attach="sriov")),
    ),
    (
        "mode=dhcp, link_up, static as the guest's addressing",
        "a:mode=dhcp;b:mode=link_up;c:mode=static,ip=10.0.0.9",
        (
            InterfaceSpec("a", mode="dhcp"),
            InterfaceSpec("b", mode="link_up"),
            InterfaceSpec("c", mode="static", ip="10.0.0.9"),
        ),
    ),
]


SAME = [(parse_storage, *r) for r in STORAGE_SAME] + [(parse_interfaces, *r) for r in IFACE_SAME]
REFUSED = [(parse_storage, *r) for r in STORAGE_REFUSED] + [(parse_interfaces, *r) for r in IFACE_REFUSED]


@pytest.mark.parametrize(("parser", "source", "value", "expected"), SAME, ids=[r[2] for r in SAME])
def test_maas_accepts_means_the_same(parser, source, value, expected):
    assert parser(value) == expected, source


@pytest.mark.parametrize(("parser", "source", "value", "words"), REFUSED, ids=[r[2] for r in REFUSED])
def test_maas_bug_or_maas_only_refused_in_one_sentence(parser, source, value, words):
    with pytest.raises(ParseError) as e:
        parser(value)
    assert all(w in str(e.value) for w in words), (source, str(e.value))
    assert not re.search(r"\w\. [A-Z]", str(e.value))  # one sentence


@pytest.mark.parametrize(("why", "value", "expected"), IFACE_OURS, ids=[r[1] for r in IFACE_OURS])
def test_interfaces_our_extensions(why, value, expected):
    assert parse_interfaces(value) == expected, why


@pytest.mark.parametrize(
    ("label", "ifname"),
    [
        ("0", "eth0"),  # IFNAME numeric
        ("0" * 52 + "200", "eth200"),  # IFNAME numeric_zero_pad
        ("eth0", "eth0"),  # IFNAME normal_interface_name
        ("eth012345678901", "eth012345678901"),  # IFNAME long_but_not_too_long_name
        ("eth0123456789012", "eth-ff5c2-89012"),  # IFNAME name_a_little_too_long
        ("1" + "0" * 53 + "1", "eth-8d3de-00001"),  # IFNAME crazy_long_numeric_name
    ],
)
def test_guest_interface_names_the_maas_way(label, ifname):
    """IFNAME::test_scenarios: the guest's interface name for a label, and the label parsed through the map."""
    assert guest_ifname(label) == ifname
    assert parse_interfaces(f"{label}:space=a")[0].label == ifname


def test_labels_naming_one_guest_interface_twice_are_refused():
    with pytest.raises(ParseError, match="names guest interface eth0 twice"):
        parse_interfaces("0:space=a;eth0:space=b")


# --- interfaces against a host: same NIC constraints --------------------------------------------------------------


def maas_host():
    nics = (
        Nic(name="eno1", kind="physical", addresses=("10.0.0.5/24",), space="public", link_speed=1000),
        Nic(name="eno2", kind="physical", bridge="br0", link_speed=10000),
        Nic(name="br0", kind="bridge", addresses=("10.10.0.5/24",), space="storage"),
        Nic(name="bond0", kind="bond", addresses=("10.20.0.5/24",), link_speed=20000),
        Nic(name="bond0.16", kind="vlan", vlan=16, addresses=("10.16.0.5/24",), link_speed=20000),
        Nic(name="eno3", kind="physical", addresses=("10.30.0.5/24",)),  # speed unknown (link down)
    )
    return synthetic_host(nodes=1, nics=nics)


def nic_of(interfaces: str) -> tuple[str, str, int | None]:
    a = place(maas_host(), [], VmRequest.from_dict({"interfaces": interfaces}), Policy())
    return a.nics[0].type, a.nics[0].parent, a.nics[0].vlan


@pytest.mark.parametrize(
    ("source", "interfaces", "expected"),
    [
        # type= is the host interface's kind; physical is macvlan on it, bridge attaches through it.
        (
            PODS + "test_get_machine_with_interfaces_by_subnet (physical -> MACVLAN)",
            "0:subnet=10.0.0.0/24",
            ("macvlan", "eno1", None),
        ),
        (IFACE + "test_filter_by_specifiers_matches_type", "a:type=physical,space=public", ("macvlan", "eno1", None)),
        (PODS + "test_get_machine_with_interfaces_by_subnets_bridge", "a:type=bridge", ("bridge", "br0", None)),
        (PODS + "test_get_machine_with_interfaces_by_subnets_bond", "a:type=bond", ("macvlan", "bond0", None)),
        (IFACE + "test_filter_by_specifiers_matches_type (vlan)", "a:type=vlan", ("macvlan", "bond0.16", 16)),
        (CODE + "maasserver/models/vlan.py (0x10 is vid 16)", "a:vlan=0x10", ("macvlan", "bond0.16", 16)),
        (IFACE + "test_filter_by_specifiers_matches_vid", "a:vid=16", ("macvlan", "bond0.16", 16)),
        (
            CODE + "maasserver/utils/orm.py:_add_vlan_vid_query (untagged)",
            "a:vid=untagged,type=bond",
            ("macvlan", "bond0", None),
        ),
        (
            NCFF + "TestFilterNodeForm::test_interfaces_filters_same_key_treated_as_OR_operation",
            "a:name=nothere,name=bond0",
            ("macvlan", "bond0", None),
        ),
        (
            CODE + "maasserver/utils/orm.py:parse_item_operation (not_ is AND NOT)",
            "a:not_name=eno1,not_name=eno2,not_name=eno3,type=physical,type=bond",
            ("macvlan", "bond0", None),
        ),
        (CODE + "maasserver/models/interface.py (link_speed__gte)", "a:link_speed=15000", ("macvlan", "bond0", None)),
        (PODS + "test_get_machine_with_interfaces_by_space_as_bridge", "a:space=storage", ("bridge", "br0", None)),
        (
            IFACE + "test_filter_by_specifiers_matches_undefined_space",
            "a:space=undefined,type=bond",
            ("macvlan", "bond0", None),
        ),
        ("ours: attach=macvlan on a bond", "a:type=bond,attach=macvlan", ("macvlan", "bond0", None)),
    ],
)
def test_nic_constraints_mean_the_same_on_a_host(source, interfaces, expected):
    assert nic_of(interfaces) == expected, source


def test_type_physical_on_a_bridge_port_is_refused_saying_why():
    # MAAS made a macvlan on the port (get_known_host_interfaces); the kernel refuses macvlan on a bridge port.
    with pytest.raises(PlacementError, match="eno2 is a port of bridge br0: macvlan cannot use a bridge port"):
        nic_of("a:name=eno2,type=physical")


def test_unknown_link_speed_is_named_in_the_refusal():
    with pytest.raises(PlacementError) as e:
        nic_of("a:subnet=10.30.0.0/24,link_speed=100")
    assert "link speed unknown on eno3" in str(e.value)


def test_type_bridge_is_maas_host_kind_and_attach_bridge_refuses_a_plain_nic():
    with pytest.raises(PlacementError, match="no host interface matches space=public,type=bridge"):
        nic_of("a:space=public,type=bridge")
    with pytest.raises(PlacementError, match="no bridge matches space=public,attach=bridge"):
        nic_of("a:space=public,attach=bridge")


# --- mode= and several ip=: the guest's cloud-init network config ------------------------------------------------


def netplan(interfaces: str) -> dict:
    a = place(maas_host(), [], VmRequest.from_dict({"interfaces": interfaces}), Policy())
    nics = [NicAllocation(**{**n.to_dict(), "more_ips": tuple(n.more_ips)}) for n in a.nics]
    docs = seed_documents(CloudInit(hostname="vm"), nics, prefixes={"a": 24, "10.0.0.10": 24})
    return yaml.safe_load(docs["network-config"])["ethernets"]


def test_several_ip_values_give_the_guest_several_addresses():
    eth = netplan("a:ip=10.0.0.9,ip=10.0.0.10")["a"]
    assert eth["addresses"] == ["10.0.0.9/24", "10.0.0.10/24"] and "dhcp4" not in eth


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("dhcp", {"dhcp4": True, "dhcp6": True}),
        ("link_up", {"dhcp4": False, "dhcp6": False}),
        ("auto", {"dhcp4": True}),
    ],
)
def test_mode_decides_the_guest_addressing(mode, expected):
    eth = netplan(f"a:subnet=10.0.0.0/24,mode={mode}")["a"]
    assert {k: v for k, v in eth.items() if k.startswith("dhcp")} == expected and "addresses" not in eth


def test_mode_unconfigured_leaves_the_interface_to_the_guest():
    assert "a" not in netplan("a:subnet=10.0.0.0/24,mode=unconfigured")


def test_every_address_is_checked_free():
    host = maas_host()
    with pytest.raises(PlacementError, match=r"ip 10\.0\.0\.5 is an address of this host"):
        place(host, [], VmRequest.from_dict({"interfaces": "a:ip=10.0.0.9,ip=10.0.0.5"}), Policy())


# --- params: cores, pinned_cores, hugepages_backed ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "params", "cores", "pinned"),
    [
        (PODS + "test_get_machine_uses_all_initial_values", {}, 1, None),
        (PODS + "test_get_machine_pinned_cores (3 pinned, no cores)", {"pinned_cores": "1,4,6"}, 3, (1, 4, 6)),
        (PODS + "test_get_machine_pinned_cores (a list)", {"pinned_cores": [6, 1, 4]}, 3, (1, 4, 6)),
        (PODS + "test_get_machine_uses_passed_values", {"cores": "4"}, 4, None),
        ("ours: auto pinning", {"cores": 2, "pinned_cores": "auto"}, 2, "auto"),
    ],
)
def test_vcpus_and_pinning_mean_the_same(source, params, cores, pinned):
    r = VmRequest.from_dict(params)
    assert (r.cores, r.pinned_cores) == (cores, pinned), source


def test_memory_default_is_maas_2048_mib():
    # PODS test_get_machine_uses_all_initial_values: DEFAULT_COMPOSED_MEMORY = 2048 (MiB)
    assert VmRequest.from_dict({}).memory == 2048 * 1024**2
    assert VmRequest.from_dict({"memory": "4096"}).memory == 4096 * 1024**2  # MAAS's unit: MiB


def test_cores_and_pinned_cores_that_disagree_are_refused_naming_maas():
    # MAAS api/pods.py compose doc: "If [pinned_cores] is passed, the cores parameter is ignored."
    with pytest.raises(ParseError, match="MAAS ignored cores then"):
        VmRequest.from_dict({"cores": 2, "pinned_cores": "1,4,6"})


@pytest.mark.parametrize(
    ("value", "backed"),
    [
        (True, True),
        ("true", True),
        ("True", True),
        ("1", True),
        (False, False),
        ("false", False),
        ("0", False),
        ("", False),
    ],
)
def test_hugepages_backed_read_as_maas_where_maas_was_right(value, backed):
    # PODS test_get_machine_uses_passed_values (a BooleanField: "false" and "0" are false)
    assert VmRequest.from_dict({"hugepages_backed": value}).hugepages_backed is backed


@pytest.mark.parametrize("value", ["no", "off", "yes", "nope"])
def test_hugepages_backed_words_maas_read_as_true_are_refused(value):
    with pytest.raises(ParseError, match="MAAS read every word but false and 0, even 'no', as true"):
        VmRequest.from_dict({"hugepages_backed": value})


def test_ours_hugepage_size_implies_backing():
    assert VmRequest.from_dict({"hugepage_size": "2M"}).hugepages_backed is True


# --- one parser: the compose action, the CLI and the relation read MAAS input the same way -------------------------

MAAS_INPUT = {
    "storage": "root:5.,data:.5(ssd),data:1",
    "interfaces": "0:vid=untagged,type=physical,ip=10.0.0.9,ip=10.0.0.10,mode=static;1:type=bridge,mode=link_up",
}


def _shape(r: VmRequest) -> tuple:
    return (r.cores, r.memory, r.pinned_cores, r.hugepages_backed, r.storage, r.interfaces)


def test_action_cli_and_relation_share_one_parser_and_its_defaults():
    from vmhost import cli
    from vmhost.relation_policy import RelationSettings, build_request

    action = VmRequest.from_dict(ComposeParams(**MAAS_INPUT, hugepages_backed=True).request_dict())
    args = cli.build_parser().parse_args(
        ["compose", "--storage", MAAS_INPUT["storage"], "--interfaces", MAAS_INPUT["interfaces"], "--hugepages-backed"]
    )
    command = cli._request(args)
    relation = build_request(
        {**MAAS_INPUT, "hugepages_backed": True}, owner="m/app/1", settings=RelationSettings()
    ).request
    assert _shape(action) == _shape(command) == _shape(relation)
    assert (action.cores, action.memory) == (1, 2048 * 1024**2)  # MAAS's defaults, everywhere
    assert [d.label for d in action.storage] == ["root", "data", "data-2"]
    assert action.interfaces[0].label == "eth0" and action.interfaces[0].ips == ("10.0.0.9", "10.0.0.10")


def test_pinned_cores_without_cores_through_the_action_and_the_cli():
    from vmhost import cli

    action = VmRequest.from_dict(ComposeParams(pinned_cores="1,4,6").request_dict())
    command = cli._request(cli.build_parser().parse_args(["compose", "--pinned-cores", "1,4,6"]))
    assert (action.cores, action.pinned_cores) == (command.cores, command.pinned_cores) == (3, (1, 4, 6))


# --- link speed comes from the host --------------------------------------------------------------------------------


def test_libvirt_discovery_reads_link_speed_from_sysfs(monkeypatch, tmp_path):
    import json
    import subprocess

    from vmhost.providers import libvirt

    for name, speed in (("eno1", "10000"), ("eno2", "-1"), ("eno3", None)):
        (tmp_path / name / "device").mkdir(parents=True)
        if speed is not None:
            (tmp_path / name / "speed").write_text(speed + "\n")
    links = [{"ifname": n, "addr_info": []} for n in ("eno1", "eno2", "eno3")]

    def run(argv, **kw):
        out = json.dumps(links) if argv[:3] == ["ip", "-j", "-d"] else "[]"
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(libvirt, "_SYSFS_NET", tmp_path)
    monkeypatch.setattr(libvirt.subprocess, "run", run)
    speeds = {n.name: n.link_speed for n in libvirt._local_nics()}
    assert speeds == {"eno1": 10000, "eno2": None, "eno3": None}  # -1 and no file: unknown


def test_lxd_discovery_reads_link_speed_from_the_resources_ports():
    from vmhost.providers.lxd import LxdProvider

    provider = object.__new__(LxdProvider)
    answers = {"/networks": [{"name": "eno1", "type": "physical"}, {"name": "eno2", "type": "physical"}]}
    provider._get = lambda path, **kw: answers.get(path, {})
    res = {"network": {"cards": [{"numa_node": 0, "ports": [{"id": "eno1", "link_speed": 25000}, {"id": "eno2"}]}]}}
    assert {n.name: n.link_speed for n in provider._nics(res)} == {"eno1": 25000, "eno2": None}


def test_several_addresses_must_all_be_on_the_interfaces_subnets():
    nics = (Nic(name="br0", kind="bridge", addresses=("10.0.0.5/24", "2001:db8::5/64")),)
    host = synthetic_host(nodes=1, nics=nics)
    a = place(host, [], VmRequest.from_dict({"interfaces": "a:ip=10.0.0.9,ip=2001:db8::9"}), Policy())
    assert (a.nics[0].parent, a.nics[0].ip, a.nics[0].more_ips) == ("br0", "10.0.0.9", ("2001:db8::9",))
    with pytest.raises(PlacementError, match=r"subnets containing ip 10\.0\.0\.9 and 10\.9\.0\.9"):
        place(host, [], VmRequest.from_dict({"interfaces": "a:ip=10.0.0.9,ip=10.9.0.9"}), Policy())


def test_relation_allowed_networks_hold_for_every_address_the_vm_gets():
    from vmhost.model import Allocation
    from vmhost.relation_policy import RelationSettings, nic_policy_error

    nics = (Nic("br9", kind="bridge"),)
    s = RelationSettings(allowed_networks=("10.5.0.0/16",))

    def alloc(*ips):
        nic = NicAllocation("eth0", "bridge", "br9", ip=ips[0], more_ips=ips[1:])
        return Allocation("x", 1, 1024**3, nics=(nic,))

    assert nic_policy_error(alloc("10.5.0.9", "10.5.1.9"), host_nics=nics, settings=s) is None
    assert "does not offer" in nic_policy_error(alloc("10.5.0.9", "192.168.0.9"), host_nics=nics, settings=s)


def test_addresses_and_mode_survive_the_hypervisor_metadata_round_trip():
    nic = NicAllocation("eth0", "bridge", "br0", ip="10.0.0.9", more_ips=("2001:db8::9",), mode="static")
    assert NicAllocation.from_dict(nic.to_dict()) == nic
    plain = NicAllocation("eth0", "bridge", "br0")
    assert "more_ips" not in plain.to_dict() and "mode" not in plain.to_dict()  # older records read back equal
