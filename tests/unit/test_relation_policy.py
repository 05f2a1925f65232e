"""vmhost.relation_policy: which remote requests the host serves, and how (pure: plain values in and out)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from tests.unit.relation_requests import GiB, M, judge, rel, spec, vm
from tests.unit.ssh_keys import DSA, ECDSA, ED25519, RSA, RSA_1024, SK_ED25519
from vmhost.model import Allocation, Nic, NicAllocation, VmRequest
from vmhost.relation_assignment import UnitWork, unit_work
from vmhost.relation_policy import (
    DEFAULT_RELATION_IMAGE,
    IMAGE_REJECTION,
    Binding,
    HeldVm,
    IncomingRequest,
    Quota,
    RelationSettings,
    first_few,
    nic_policy_error,
    owner_key,
    remote_reason,
    split_owner,
    vm_name,
)


def test_owner_keys_round_trip_and_names_are_stable_and_distinct():
    key = owner_key(M, "client", "web-0")
    assert split_owner(key) == (M, "client", "web-0")
    assert split_owner(None) is None and split_owner("operator") is None
    assert vm_name(key) == vm_name(key)
    assert vm_name(key) != vm_name(owner_key(M, "client", "web-1"))
    assert vm_name(key).startswith("vm-")


def test_request_is_named_owned_and_mapped_onto_the_space_bridge():
    d = judge(
        [
            rel(
                spec(
                    "a",
                    interfaces="eth0:space=public,ip=10.0.0.5",
                    ssh_authorized_keys=[ED25519],
                    user_data="#!/bin/sh\ntrue",
                )
            )
        ],
        RelationSettings(space_bridges={"public": "br0"}),
        {},
    )[0]
    acc = d.accepted
    assert acc is not None and d.owner == f"{M}/client/a"
    assert acc.request.owner == d.owner and acc.request.name == vm_name(d.owner)
    (iface,) = acc.request.interfaces
    assert (iface.name, iface.space, iface.ip) == ("br0", (), "10.0.0.5")
    assert acc.cloud_init.hostname == acc.request.name
    assert acc.cloud_init.ssh_authorized_keys == (ED25519,) and acc.cloud_init.user_data == "#!/bin/sh\ntrue"
    assert (acc.boot, acc.image) == ("image", DEFAULT_RELATION_IMAGE)  # the operator's default: a usable OS


def test_image_requests_boot_from_the_image_they_name_else_the_operators():
    (d,) = judge([rel(spec("a", image="ubuntu:noble"))], RelationSettings(image="ubuntu:22.04"), {})
    assert d.accepted.boot == "image" and d.accepted.image == "ubuntu:noble"
    (d,) = judge([rel(spec("a"))], RelationSettings(image="ubuntu:22.04"), {})
    assert d.accepted.boot == "image" and d.accepted.image == "ubuntu:22.04"


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"storage": "root:0"}, ["storage"]),
        ({"interfaces": "eth0:vlan=9999"}, ["interfaces", "vlan"]),
        ({"hugepage_size": "1G", "memory": 1536 * 1024**2}, ["hugepages", "memory"]),
        ({"interfaces": "eth0:space=public,name=br1"}, ["interfaces", "br1", "br0"]),
    ],
)
def test_requests_the_host_cannot_honour_are_rejected_with_the_field(kw, words):
    (d,) = judge([rel(spec("a", **kw))], RelationSettings(space_bridges={"public": "br0"}), {})
    assert d.accepted is None and d.rejected
    for w in words:
        assert w in d.rejected


def test_allowed_networks_check_names_before_placement():
    s = RelationSettings(allowed_networks=("public", "br9"), space_bridges={"public": "br0", "storage": "br1"})
    ds = judge(
        [
            rel(
                spec("a", interfaces="eth0:space=public"),
                spec("b", interfaces="eth0:space=storage"),
                spec("c", interfaces="eth0:name=br9"),
            )
        ],
        s,
        {},
    )
    assert [d.rejected is None for d in ds] == [True, False, True]
    assert "br1" in ds[1].rejected and "allowed-networks" in ds[1].rejected


def test_nic_policy_accepts_by_name_space_bridge_mapping_space_and_cidr():
    nics = (
        Nic("br0", kind="bridge"),
        Nic("br1", kind="bridge", space="db"),
        Nic("br2", kind="bridge", addresses=("10.5.0.1/24",)),
        Nic("br3", kind="bridge"),
    )
    s = RelationSettings(allowed_networks=("br0", "db", "10.5.0.0/16", "pub"), space_bridges={"pub": "br3"})

    def alloc(parent):
        return Allocation("x", 1, GiB, nics=(NicAllocation("eth0", "bridge", parent),))

    for ok in ("br0", "br1", "br2", "br3"):
        assert nic_policy_error(alloc(ok), host_nics=nics, settings=s) is None, ok
    err = nic_policy_error(alloc("virbr0"), host_nics=nics, settings=s)
    assert "eth0" in err and "virbr0" in err
    assert (
        nic_policy_error(alloc("virbr0"), host_nics=nics, settings=RelationSettings()) is None
    )  # no list: no restriction


def test_quota_counts_existing_vms_first_then_new_requests_in_order():
    s = RelationSettings(quota=Quota(vms=2, cores=4))
    c = owner_key(M, "client", "c")
    held = {c: HeldVm("vm-host/0", 2, GiB)}
    ds = judge([rel(spec("a", cores=3), spec("b", cores=1), spec("c", cores=2))], s, held)
    by = {d.id: d for d in ds}
    assert by["c"].accepted is not None  # existing: kept even though it is listed last
    assert "cores" in by["a"].rejected and "quota" in by["a"].rejected
    assert by["b"].accepted is not None
    # memory quota and other apps are separate
    ds = judge(
        [rel(spec("x", memory=3 * GiB), app="other", rid=2)], RelationSettings(quota=Quota(memory=2 * GiB)), held
    )
    assert "memory" in ds[0].rejected


def test_invalid_entry_keeps_its_owner_so_its_vm_is_not_released():
    ds = judge(
        [
            rel(
                IncomingRequest("a", None, "request 'a' is invalid: cores: too many"),
                IncomingRequest("#1", None, "junk"),
            )
        ],
        RelationSettings(),
        {},
    )
    assert ds[0].owner == f"{M}/client/a" and ds[0].rejected
    assert ds[1].owner is None
    owner = ds[0].owner
    work = unit_work("u/0", decisions=ds, assignments={}, vms=[vm("vm-a", owner)], live_apps={f"{M}/client"})
    assert work == UnitWork()


# ---------------------------------------------------------------------------------------------
# The vm-allocation binding: where requests that name no network go


def test_binding_spec_by_interface_name_else_real_subnets_else_nothing():
    from vmhost.parse import InterfaceSpec

    assert Binding(("br0", "br9"), ("10.20.0.0/24",)).spec("eth1") == InterfaceSpec("eth1", name="br0")
    by_subnet = Binding((), ("10.20.0.7/32", "10.20.0.0/24", "fd00::/64")).spec("eth0")
    assert by_subnet == InterfaceSpec("eth0", subnet=("10.20.0.0/24", "fd00::/64"))  # single addresses say nothing
    assert Binding((), ("192.0.2.0/32",)).spec("eth0") is None
    assert Binding().spec("eth0") is None


def test_request_naming_no_network_gets_one_nic_on_the_binding():
    s = RelationSettings(space_bridges={"public": "br0"}, binding=Binding(("br5",), ("10.50.0.0/24",)))
    ds = judge(
        [
            rel(
                spec("none"),  # no interfaces at all: one NIC on the binding
                spec("bare", interfaces="eth0:;eth1:space=public"),  # eth0 has no constraints
                spec("subnet", interfaces="eth0:subnet=10.30.0.0/24"),  # constrained: left to placement
                spec("ip", interfaces="eth0:ip=10.30.0.9"),
            )
        ],
        s,
        {},
    )
    got = {d.id: [(i.label, i.name, i.subnet, i.ip) for i in d.accepted.request.interfaces] for d in ds}
    assert got == {
        "none": [("eth0", "br5", (), None)],
        "bare": [("eth0", "br5", (), None), ("eth1", "br0", (), None)],
        "subnet": [("eth0", None, ("10.30.0.0/24",), None)],
        "ip": [("eth0", None, (), "10.30.0.9")],
    }
    # without binding information, behaviour is as before: no NIC asked for, none given
    (d,) = judge([rel(spec("none"))], RelationSettings(), {})
    assert d.accepted.request.interfaces == ()


def test_binding_nics_meet_allowed_networks_once_placed():
    # A bound port attaches through its bridge, which only placement knows: evaluate accepts, and
    # nic_policy_error then judges the bridge the NIC really lands on.
    s = RelationSettings(allowed_networks=("br1",), binding=Binding(("enp1s0",)))
    (d,) = judge([rel(spec("a"))], s, {})
    assert d.accepted is not None and d.accepted.request.interfaces[0].name == "enp1s0"
    nics = (Nic("enp1s0", kind="physical", bridge="br1"), Nic("br1", kind="bridge"), Nic("br0", kind="bridge"))

    def placed(parent):
        return Allocation("x", 1, GiB, nics=(NicAllocation("eth0", "bridge", parent),))

    assert nic_policy_error(placed("br1"), host_nics=nics, settings=s) is None
    err = nic_policy_error(placed("br0"), host_nics=nics, settings=replace(s, binding=Binding(("br0",))))
    assert "br0" in err and "allowed-networks" in err


@pytest.mark.parametrize(
    "bridges, known",
    [({"public": "br0", "storage": "br1"}, "public, storage"), ({}, "none")],
)
def test_space_not_in_space_bridges_is_rejected_naming_the_known_spaces(bridges, known):
    s = RelationSettings(space_bridges=bridges, binding=Binding(("br0",)))
    (d,) = judge([rel(spec("a", interfaces="eth0:space=dmz"))], s, {})
    assert d.accepted is None
    assert "space dmz" in d.rejected and f"space-bridges: {known}" in d.rejected
    assert "vm-allocation endpoint is bound to" in d.rejected
    # one known space among several still resolves (as before)
    if bridges:
        (d,) = judge([rel(spec("a", interfaces="eth0:space=dmz,space=public"))], s, {})
        assert d.accepted.request.interfaces[0].name == "br0"


def test_rejections_name_only_the_first_few_remote_spaces():
    spaces = [f"space={i:02d}" + "x" * 40 for i in range(20)]
    s = RelationSettings(space_bridges={"public": "br0"})
    (d,) = judge([rel(spec("a", interfaces="eth0:" + ",".join(spaces)))], s, {})
    assert d.accepted is None
    assert "00" + "x" * 40 in d.rejected and "02" + "x" * 40 in d.rejected
    assert "03" + "x" * 40 not in d.rejected and "and 17 more" in d.rejected
    assert len(d.rejected) < 400
    # a short list is named in full, without a count
    (d,) = judge([rel(spec("a", interfaces="eth0:space=dmz,space=lab"))], s, {})
    assert "space dmz, lab," in d.rejected and "more" not in d.rejected


def test_names_in_full_or_first_few_and_a_count():
    assert first_few(["a", "b"]) == "a, b"
    assert first_few(["a", "b", "c"]) == "a, b, c"
    assert first_few(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"
    assert first_few([]) == ""


HOSTILE_IMAGES = [
    "../etc/passwd",
    "a/b",
    "ubuntu:../../etc/shadow",
    "ubuntu:..",
    "/var/lib/vmhost/images/noble",
    "noble",  # a host-local name: only the operator may use those
    "metadata.yaml",
    "ubuntu:",
    ":24.04",
    "Ubuntu:24.04",
    "ubuntu:24.04 ",
    "ubuntu:24.04\n",
    "ubuntu:24.04;rm",
    "ubuntu:a:b",
    "images:debian/12",
    "ubuntu:" + "1" * 60,
    "",
    7,
    ["ubuntu:24.04"],
]


@pytest.mark.parametrize("image", HOSTILE_IMAGES)
def test_an_image_that_is_not_os_colon_alias_is_rejected_in_one_sentence(image):
    (d,) = judge([rel(spec("a", image=image))], RelationSettings(), {})
    assert d.accepted is None
    assert d.rejected == f"request 'a': {IMAGE_REJECTION}"  # one sentence, and never the value given


@pytest.mark.parametrize("image", ["ubuntu:24.04", "ubuntu:noble", "ubuntu:22.04", "debian:12", "ubuntu:24.04-lts"])
def test_os_colon_alias_images_pass(image):
    (d,) = judge([rel(spec("a", image=image))], RelationSettings(), {})
    assert d.accepted is not None and d.accepted.image == image


# ---------------------------------------------------------------------------------------------
# Access: keys and user-data, hostile ones rejected naming the field, never echoing the value

SECRET = "password: hunter2-SECRET"


@pytest.mark.parametrize("key", [ED25519, ECDSA, RSA, SK_ED25519, ED25519.rsplit(" ", 1)[0]])
def test_public_keys_of_allowed_types_pass(key):
    (d,) = judge([rel(spec("a", ssh_authorized_keys=[key]))], RelationSettings(), {})
    assert d.accepted is not None and d.accepted.cloud_init.ssh_authorized_keys == (key,)


ED_TYPE, ED_BLOB, _ = ED25519.split(" ")
HOSTILE_KEYS = {
    "dsa": DSA,
    "rsa-1024": RSA_1024,
    "options": 'command="/bin/sh" ' + ED25519,
    "two-lines": ED25519 + "\n" + RSA,
    "type-mismatch": "ssh-rsa " + ED_BLOB,  # the blob is an ed25519 key
    "truncated-blob": f"{ED_TYPE} {ED_BLOB[:40]}",
    "not-base64": f"{ED_TYPE} {ED_BLOB[:-4]}!!!!",
    "private-key": "-----BEGIN OPENSSH PRIVATE KEY-----",
    "control-in-comment": ED25519 + "\x1b[2J",
    "trailing-newline": ED25519 + "\n",
    "tab-separated": ED25519.replace(" ", "\t", 1),
    "too-long": f"{ED25519} {'x' * 9000}",
    "empty": "",
    "not-text": 12,
}


@pytest.mark.parametrize("key", list(HOSTILE_KEYS.values()), ids=list(HOSTILE_KEYS))
def test_a_hostile_key_is_rejected_naming_the_entry_and_the_allowed_types(key):
    (d,) = judge([rel(spec("a", ssh_authorized_keys=[ED25519, key], user_data=SECRET))], RelationSettings(), {})
    assert d.accepted is None
    assert d.rejected.startswith("request 'a': ssh_authorized_keys entry 1 is not one OpenSSH public key line")
    assert "allowed types: ssh-ed25519" in d.rejected and "ssh-dss" not in d.rejected
    assert "hunter2" not in d.rejected and "AAAA" not in d.rejected and "/bin/sh" not in d.rejected


def test_too_many_keys_or_not_a_list_is_rejected():
    (d,) = judge([rel(spec("a", ssh_authorized_keys=[ED25519] * 33))], RelationSettings(), {})
    assert d.rejected == "request 'a': ssh_authorized_keys lists 33 keys; at most 32 are allowed"
    (d,) = judge([rel(spec("a", ssh_authorized_keys=ED25519))], RelationSettings(), {})
    assert "must be a list" in d.rejected and "AAAA" not in d.rejected


@pytest.mark.parametrize(
    "user_data, words",
    [
        (SECRET + "x" * (64 * 1024), "at most 65536"),
        (SECRET + "\x00", "without NUL"),
        (SECRET + "\ud800", "UTF-8"),
        (["#cloud-config"], "must be text"),
    ],
    ids=["too-big", "nul", "surrogate", "not-text"],
)
def test_hostile_user_data_is_rejected_without_echoing_it(user_data, words):
    (d,) = judge([rel(spec("a", user_data=user_data))], RelationSettings(), {})
    assert d.accepted is None and "user_data" in d.rejected and words in d.rejected
    assert "hunter2" not in d.rejected and "cloud-config" not in d.rejected


def test_user_data_is_passed_on_as_opaque_text_and_kept_out_of_reprs():
    text = "#!/bin/sh\n" + SECRET + "\n{{ not: [yaml\n"  # never parsed by the host: cloud-init's business
    (d,) = judge([rel(spec("a", user_data=text))], RelationSettings(), {})
    assert d.accepted.cloud_init.user_data == text
    assert "hunter2" not in repr(d) and "hunter2" not in repr(d.accepted)


def _placement_error(request: VmRequest, hugepages=None, reserved=()) -> str:
    from tests.unit.hosts import synthetic_host
    from vmhost.model import Policy, StoragePool
    from vmhost.placement import PlacementError, place

    topo = synthetic_host(
        nodes=2,
        cores_per_node=2,
        memory_per_node=3 * GiB,
        hugepages=hugepages or {"2M": 77},
        nics=(Nic(name="br7", kind="bridge", addresses=("10.7.0.1/24",)), Nic(name="enp9", kind="physical")),
        storage_pools=(StoragePool(name="default", total=55 * 10**9),),
    )
    with pytest.raises(PlacementError) as e:
        place(topo, [], request, Policy(reserved_cores=reserved))
    return str(e.value)


HUGE_1G = {"memory": GiB, "hugepages_backed": True}
# node 0 has the threads, node 1 (its threads reserved) the hugepages: each fits alone, not together
SPLIT = {"hugepages": [{"2M": 0}, {"2M": 600}], "reserved": (2, 3, 6, 7)}


@pytest.mark.parametrize(
    "request_kw, host, short",
    [
        ({"cores": 9, "pinned_cores": "auto"}, {}, "not enough pinned threads"),
        ({"cores": 9}, {}, "not enough shared vCPUs"),
        ({"memory": 7 * GiB}, {}, "not enough memory"),
        ({"memory": 3 * GiB, "pinned_cores": "auto"}, {}, "not enough memory"),
        ({**HUGE_1G, "hugepage_size": "2M"}, {}, "not enough 2M hugepages"),
        ({**HUGE_1G, "hugepage_size": "1G"}, {}, "not enough 1G hugepages"),
        ({**HUGE_1G, "memory": GiB + 1024**2}, {}, "memory is not a whole number of 2M hugepages"),
        ({**HUGE_1G, "pinned_cores": "auto"}, SPLIT, "no set of NUMA nodes has room for its CPUs and memory together"),
        ({"storage": "root:99"}, {}, "disk root: not enough storage"),
        ({"interfaces": "lan:name=br9"}, {}, "interface lan: no host network matches it"),
        ({"interfaces": "lan:type=sriov"}, {}, "interface lan: no free SR-IOV VF"),
    ],
)
def test_remote_reason_names_what_placement_found_short_and_nothing_the_host_has(request_kw, host, short):
    detail = _placement_error(VmRequest.from_dict({"cores": 1, "memory": GiB, **request_kw}), **host)
    said = remote_reason(detail)
    assert said == "the host cannot place this VM now: " + short, detail
    assert not re.search(r"\d", said.replace("2M", "").replace("1G", "")), said
    assert not any(w in said for w in ("br7", "enp9", "node ", "default")), said


def test_remote_reason_for_a_message_it_does_not_know_says_nothing_more():
    assert remote_reason("lvm: vg0 has 12G free") == "the host cannot place this VM now"


def test_numa_nodes_reach_the_request_and_are_bounded_by_cores():
    (d,) = judge([rel(spec("a", cores=4, numa_nodes=2))])
    assert d.accepted.request.numa_nodes == 2
    (d,) = judge([rel(spec("a", cores=1, numa_nodes=2))])
    assert d.accepted is None and "numa_nodes 2 needs at least 2 cores" in d.rejected


@pytest.mark.parametrize(
    ("user_data", "says"),
    [
        ("#cloud-config\n[1", "not valid YAML"),
        ("echo hi", "cloud-init would ignore it"),
        ("#cloud-config\n- a", "mapping"),
        pytest.param("#cloud-config\n" + "[" * 20000, "nested more than", id="deep"),  # was a RecursionError
    ],
)
def test_user_data_the_seed_cannot_carry_is_rejected_before_anything_is_made(user_data, says):
    (d,) = judge([rel(spec("a", user_data=user_data))], RelationSettings(), {})
    assert d.accepted is None and says in d.rejected and user_data not in d.rejected
