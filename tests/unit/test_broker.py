"""vmhost.broker: the pure decisions behind the vm-allocation relation."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from vmhost import broker
from vmhost.broker import Capacity, Incoming, RelationInput, Result, Settings
from vmhost.model import Allocation, Nic, NicAllocation, Quota, VmInfo, VmRequest

M = "aaaaaaaa-1111-4111-8111-000000000001"
GiB = 1024**3


def spec(id: str, **kw) -> Incoming:
    return Incoming(id, {"id": id, "cores": 1, "memory": GiB, **kw})


def rel(*requests: Incoming, app="client", rid=1, model=M, error=None) -> RelationInput:
    return RelationInput(rid, model, app, tuple(requests), error)


def vm(name: str, owner: str | None, cores=1, memory=GiB, nics=()) -> VmInfo:
    return VmInfo(name=name, state="running", allocation=Allocation(name, cores, memory, owner=owner, nics=nics))


def test_owner_keys_round_trip_and_names_are_stable_and_distinct():
    key = broker.owner_key(M, "client", "web-0")
    assert broker.split_owner(key) == (M, "client", "web-0")
    assert broker.split_owner(None) is None and broker.split_owner("operator") is None
    assert broker.vm_name(key) == broker.vm_name(key)
    assert broker.vm_name(key) != broker.vm_name(broker.owner_key(M, "client", "web-1"))
    assert broker.vm_name(key).startswith("vm-")


def test_request_is_named_owned_and_mapped_onto_the_space_bridge():
    d = broker.evaluate(
        [rel(spec("a", interfaces="eth0:space=public,ip=10.0.0.5", ssh_authorized_keys=["k"], user_data="u"))],
        Settings(space_bridges={"public": "br0"}),
        {},
    )[0]
    acc = d.accepted
    assert acc is not None and d.owner == f"{M}/client/a"
    assert acc.request.owner == d.owner and acc.request.name == broker.vm_name(d.owner)
    (iface,) = acc.request.interfaces
    assert (iface.name, iface.space, iface.ip) == ("br0", (), "10.0.0.5")
    assert acc.cloud_init.hostname == acc.request.name
    assert acc.cloud_init.ssh_authorized_keys == ("k",) and acc.cloud_init.user_data == "u"
    assert acc.boot == "network"


def test_image_requests_boot_from_the_image():
    (d,) = broker.evaluate([rel(spec("a", image="noble"))], Settings(), {})
    assert d.accepted.boot == "image" and d.accepted.image == "noble"


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
    (d,) = broker.evaluate([rel(spec("a", **kw))], Settings(space_bridges={"public": "br0"}), {})
    assert d.accepted is None and d.rejected
    for w in words:
        assert w in d.rejected


def test_allowed_networks_check_names_before_placement():
    s = Settings(allowed_networks=("public", "br9"), space_bridges={"public": "br0", "storage": "br1"})
    ds = broker.evaluate(
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
    s = Settings(allowed_networks=("br0", "db", "10.5.0.0/16", "pub"), space_bridges={"pub": "br3"})

    def alloc(parent):
        return Allocation("x", 1, GiB, nics=(NicAllocation("eth0", "bridge", parent),))

    for ok in ("br0", "br1", "br2", "br3"):
        assert broker.nic_policy_error(alloc(ok), nics, s) is None, ok
    err = broker.nic_policy_error(alloc("virbr0"), nics, s)
    assert "eth0" in err and "virbr0" in err
    assert broker.nic_policy_error(alloc("virbr0"), nics, Settings()) is None  # no list: no restriction


def test_quota_counts_existing_vms_first_then_new_requests_in_order():
    s = Settings(quota=Quota(vms=2, cores=4))
    c = broker.owner_key(M, "client", "c")
    held = {c: broker.Held("vm-host/0", 2, GiB)}
    ds = broker.evaluate([rel(spec("a", cores=3), spec("b", cores=1), spec("c", cores=2))], s, held)
    by = {d.id: d for d in ds}
    assert by["c"].accepted is not None  # existing: kept even though it is listed last
    assert "cores" in by["a"].rejected and "quota" in by["a"].rejected
    assert by["b"].accepted is not None
    # memory quota and other apps are separate
    ds = broker.evaluate(
        [rel(spec("x", memory=3 * GiB), app="other", rid=2)], Settings(quota=Quota(memory=2 * GiB)), held
    )
    assert "memory" in ds[0].rejected


def test_invalid_entry_keeps_its_owner_so_its_vm_is_not_released():
    ds = broker.evaluate(
        [rel(Incoming("a", None, "request 'a' is invalid: cores: too many"), Incoming("#1", None, "junk"))],
        Settings(),
        {},
    )
    assert ds[0].owner == f"{M}/client/a" and ds[0].rejected
    assert ds[1].owner is None
    owner = ds[0].owner
    compose, release = broker.unit_actions("u/0", ds, {}, [vm("vm-a", owner)], {f"{M}/client"})
    assert compose == [] and release == []


def req(cores=1, memory=GiB, **kw) -> VmRequest:
    return VmRequest.from_dict({"cores": cores, "memory": memory, **kw})


def test_capacity_fit_uses_threads_for_pinned_and_shared_vcpus_otherwise():
    c = Capacity(threads=2, vcpus=8, memory=4 * GiB, hugepages={"2M": 512, "1G": 0})
    assert c.fits(req(4)) and not c.fits(req(4, pinned_cores="auto"))
    assert c.fits(req(2, pinned_cores="auto", hugepages_backed=True, memory=GiB))
    assert not c.fits(req(1, hugepages_backed=True, hugepage_size="1G", memory=GiB))
    assert not c.fits(req(1, memory=5 * GiB))
    left = c.minus(req(2, pinned_cores="auto", hugepages_backed=True, memory=GiB))
    assert (left.threads, left.vcpus, left.memory, left.hugepages["2M"]) == (0, 8, 4 * GiB, 0)
    assert Capacity.from_dict(c.to_dict()) == c


def accepted(*ids, cores=1, pinned=False):
    ds = broker.evaluate(
        [rel(*(spec(i, cores=cores, pinned_cores="auto" if pinned else None) for i in ids))], Settings(), {}
    )
    return [d.accepted for d in ds]


def test_assign_best_fit_is_deterministic_with_ties_by_unit_name():
    caps = {"h/2": Capacity(threads=4, vcpus=4, memory=8 * GiB), "h/1": Capacity(threads=4, vcpus=4, memory=8 * GiB)}
    (a,) = accepted("a", cores=2)
    got, waiting = broker.assign([a], {}, ["h/2", "h/1"], caps, {})
    assert got == {a.owner: "h/1"} and waiting == {}
    caps["h/0"] = Capacity(threads=16, vcpus=16, memory=8 * GiB)
    big = accepted("big", cores=8)[0]
    got, _ = broker.assign([a, big], {}, ["h/0", "h/1", "h/2"], caps, {})
    assert got == {a.owner: "h/1", big.owner: "h/0"}


def test_assign_keeps_vms_and_live_assignments_and_reassigns_departed_units():
    a, b, c = accepted("a", "b", "c")
    caps = {"h/0": Capacity(threads=8, vcpus=8, memory=8 * GiB), "h/2": Capacity(threads=2, vcpus=2, memory=8 * GiB)}
    current = {a.owner: "h/0", b.owner: "h/1", c.owner: "h/1"}
    located = {c.owner: "h/2"}  # c's VM lives on h/2 whatever the old assignment said
    got, _ = broker.assign([a, b, c], current, ["h/0", "h/2"], caps, located)
    assert got[a.owner] == "h/0" and got[c.owner] == "h/2"
    assert got[b.owner] == "h/2"  # h/1 left; h/2 is the tighter fit
    # a compose that failed on its unit is placed again
    got, _ = broker.assign([a], {a.owner: "h/2"}, ["h/0", "h/2"], caps, {}, failed={a.owner})
    assert got[a.owner] == "h/2"  # still the best fit, chosen afresh
    got, _ = broker.assign(accepted("x", cores=64), {}, ["h/0", "h/2"], caps, {})
    assert list(got.values()) == ["h/0"]  # nothing fits: the roomiest unit, whose placement says what is short
    got, waiting = broker.assign([a], {}, ["h/0"], {}, {})
    assert got == {} and "capacity" in waiting[a.owner]


def test_unit_actions_compose_only_what_is_assigned_here_and_release_what_nobody_wants():
    a, b = accepted("a", "b")
    ds = broker.evaluate([rel(spec("a"), spec("b"))], Settings(), {})
    gone = broker.owner_key(M, "client", "gone")
    other_app = broker.owner_key(M, "unrelated", "a")
    vms = [vm("vm-a", a.owner), vm("vm-gone", gone), vm("vm-other", other_app), vm("vm-op", None), vm("vm-a2", a.owner)]
    compose, release = broker.unit_actions("h/0", ds, {a.owner: "h/0", b.owner: "h/1"}, vms, {f"{M}/client"})
    assert compose == []  # a exists here; b is h/1's
    assert sorted(release) == ["vm-a2", "vm-gone", "vm-other"]
    compose, _ = broker.unit_actions("h/1", ds, {a.owner: "h/0", b.owner: "h/1"}, [], {f"{M}/client"})
    assert [c.owner for c in compose] == [b.owner]
    # an app whose list cannot be read keeps its VMs
    _, release = broker.unit_actions(
        "h/0", [], {}, [vm("vm-a", a.owner)], {f"{M}/client"}, unreadable_apps={f"{M}/client"}
    )
    assert release == []


def test_results_and_merged_statuses():
    ds = broker.evaluate(
        [rel(spec("a", interfaces=None), spec("b"), Incoming("bad", None, "request 'bad': cores: no"), spec("c"))],
        Settings(),
        {},
    )
    by = {d.id: d for d in ds}
    nic = NicAllocation("eth0", "bridge", "br0", ip="10.0.0.9", mac="52:54:00:00:00:01")
    here = [vm("vm-a", by["a"].owner, nics=(nic,))]
    assignments = {by["a"].owner: "h/0", by["b"].owner: "h/0", by["c"].owner: "h/1"}
    res = broker.unit_results("h/0", ds, assignments, here, {by["b"].owner: ("failed", "compose failed at step 'x'")})
    assert res[by["a"].owner] == Result("ready", None, "vm-a", ("52:54:00:00:00:01",), ("10.0.0.9",), 1, GiB)
    assert res[by["b"].owner].status == "failed"
    assert by["c"].owner not in res
    merged = broker.merge_statuses([rel()], ds, assignments, {"h/0": res}, {})
    st = {e["id"]: e for e in merged[1]}
    assert [e["id"] for e in merged[1]] == ["a", "b", "bad", "c"]
    assert (st["a"]["status"], st["a"]["unit"], st["a"]["addresses"]) == ("ready", "h/0", ["10.0.0.9"])
    assert st["b"]["status"] == "failed" and "step" in st["b"]["message"]
    assert st["bad"]["status"] == "rejected"
    assert (st["c"]["status"], st["c"]["unit"]) == ("pending", "h/1")


# ---------------------------------------------------------------------------------------------
# The vm-allocation binding: where requests that name no network go


def test_binding_spec_by_interface_name_else_real_subnets_else_nothing():
    from vmhost.parse import InterfaceSpec

    assert broker.Binding(("br0", "br9"), ("10.20.0.0/24",)).spec("eth1") == InterfaceSpec("eth1", name="br0")
    by_subnet = broker.Binding((), ("10.20.0.7/32", "10.20.0.0/24", "fd00::/64")).spec("eth0")
    assert by_subnet == InterfaceSpec("eth0", subnet=("10.20.0.0/24", "fd00::/64"))  # single addresses say nothing
    assert broker.Binding((), ("192.0.2.0/32",)).spec("eth0") is None
    assert broker.Binding().spec("eth0") is None


def test_request_naming_no_network_gets_one_nic_on_the_binding():
    s = Settings(space_bridges={"public": "br0"}, binding=broker.Binding(("br5",), ("10.50.0.0/24",)))
    ds = broker.evaluate(
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
    (d,) = broker.evaluate([rel(spec("none"))], Settings(), {})
    assert d.accepted.request.interfaces == ()


def test_binding_nics_meet_allowed_networks_once_placed():
    # A bound port attaches through its bridge, which only placement knows: evaluate accepts, and
    # nic_policy_error then judges the bridge the NIC really lands on.
    s = Settings(allowed_networks=("br1",), binding=broker.Binding(("enp1s0",)))
    (d,) = broker.evaluate([rel(spec("a"))], s, {})
    assert d.accepted is not None and d.accepted.request.interfaces[0].name == "enp1s0"
    nics = (Nic("enp1s0", kind="physical", bridge="br1"), Nic("br1", kind="bridge"), Nic("br0", kind="bridge"))

    def placed(parent):
        return Allocation("x", 1, GiB, nics=(NicAllocation("eth0", "bridge", parent),))

    assert broker.nic_policy_error(placed("br1"), nics, s) is None
    err = broker.nic_policy_error(placed("br0"), nics, replace(s, binding=broker.Binding(("br0",))))
    assert "br0" in err and "allowed-networks" in err


@pytest.mark.parametrize(
    "bridges, known",
    [({"public": "br0", "storage": "br1"}, "public, storage"), ({}, "none")],
)
def test_space_not_in_space_bridges_is_rejected_naming_the_known_spaces(bridges, known):
    s = Settings(space_bridges=bridges, binding=broker.Binding(("br0",)))
    (d,) = broker.evaluate([rel(spec("a", interfaces="eth0:space=dmz"))], s, {})
    assert d.accepted is None
    assert "space dmz" in d.rejected and f"space-bridges: {known}" in d.rejected
    assert "vm-allocation endpoint is bound to" in d.rejected
    # one known space among several still resolves (as before)
    if bridges:
        (d,) = broker.evaluate([rel(spec("a", interfaces="eth0:space=dmz,space=public"))], s, {})
        assert d.accepted.request.interfaces[0].name == "br0"


def test_rejections_name_only_the_first_few_remote_spaces():
    spaces = [f"space={i:02d}" + "x" * 40 for i in range(20)]
    s = Settings(space_bridges={"public": "br0"})
    (d,) = broker.evaluate([rel(spec("a", interfaces="eth0:" + ",".join(spaces)))], s, {})
    assert d.accepted is None
    assert "00" + "x" * 40 in d.rejected and "02" + "x" * 40 in d.rejected
    assert "03" + "x" * 40 not in d.rejected and "and 17 more" in d.rejected
    assert len(d.rejected) < 400
    # a short list is named in full, without a count
    (d,) = broker.evaluate([rel(spec("a", interfaces="eth0:space=dmz,space=lab"))], s, {})
    assert "space dmz, lab," in d.rejected and "more" not in d.rejected


def test_names_in_full_or_first_few_and_a_count():
    assert broker.first_few(["a", "b"]) == "a, b"
    assert broker.first_few(["a", "b", "c"]) == "a, b, c"
    assert broker.first_few(["a", "b", "c", "d", "e"]) == "a, b, c and 2 more"
    assert broker.first_few([]) == ""


@pytest.mark.parametrize("image", ["../etc/passwd", "a/b", "noble..img", "..", "/var/lib/vmhost/images/noble"])
def test_image_that_is_not_a_bare_name_is_rejected(image):
    (d,) = broker.evaluate([rel(spec("a", image=image))], Settings(), {})
    assert d.accepted is None
    assert "image must be a name of an image in the host's image directory" in d.rejected


@pytest.mark.parametrize("image", ["noble", "metadata.yaml", "jammy-22.04.qcow2", "ubuntu:noble"])
def test_image_names_pass_as_names(image):
    (d,) = broker.evaluate([rel(spec("a", image=image))], Settings(), {})
    assert d.accepted is not None and d.accepted.image == image


# ---------------------------------------------------------------------------------------------
# What remote models are told, and peer data read totally


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
    said = broker.remote_reason(detail)
    assert said == "the host cannot place this VM now: " + short, detail
    assert not re.search(r"\d", said.replace("2M", "").replace("1G", "")), said
    assert not any(w in said for w in ("br7", "enp9", "node ", "default")), said


def test_remote_reason_for_a_message_it_does_not_know_says_nothing_more():
    assert broker.remote_reason("lvm: vg0 has 12G free") == "the host cannot place this VM now"


@pytest.mark.parametrize(
    "value",
    [
        [],
        "x",
        None,
        {"status": "odd"},
        {"cores": "1"},
        {"cores": True},
        {"memory": 1e308},
        {"cores": -1},
        {"memory": 2**70},
        {"addresses": "10.0.0.1"},
        {"mac_addresses": [1]},
        {"name": "x" * 65},
    ],
)
def test_result_from_dict_refuses_what_no_unit_writes(value):
    with pytest.raises(ValueError):
        Result.from_dict(value)


def test_result_round_trips():
    r = Result("ready", "m", "vm-1", ("52:54:00:00:00:01",), ("10.0.0.5",), 2, GiB)
    assert Result.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "value",
    [[], "x", {"threads": "1"}, {"threads": 1.5}, {"memory": -1}, {"hugepages": [1]}, {"hugepages": {"2M": "x"}}],
)
def test_capacity_from_dict_refuses_what_no_unit_writes(value):
    with pytest.raises(ValueError):
        Capacity.from_dict(value)


def test_capacity_round_trips_and_drops_unknown_page_sizes():
    c = Capacity(threads=3, vcpus=4, memory=GiB, hugepages={"2M": 5})
    assert Capacity.from_dict(c.to_dict()) == c
    assert Capacity.from_dict({"hugepages": {"4M": 1, "2M": 2}}).hugepages == {"2M": 2}
