"""vmhost.relation_assignment: capacity, which unit serves which request, what each unit does, and the
statuses the leader merges (pure: plain values in, plain values out)."""

from __future__ import annotations

import pytest

from tests.unit.relation_requests import GiB, M, judge, rel, spec, vm
from vmhost.model import NicAllocation, VmRequest
from vmhost.relation_assignment import (
    Capacity,
    ComposeFailure,
    UnitResult,
    assign,
    merge_statuses,
    unit_results,
    unit_work,
)
from vmhost.relation_policy import (
    IncomingRequest,
    RelationSettings,
    owner_key,
)


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
    ds = judge(
        [rel(*(spec(i, cores=cores, pinned_cores="auto" if pinned else None) for i in ids))], RelationSettings(), {}
    )
    return [d.accepted for d in ds]


def test_assign_best_fit_is_deterministic_with_ties_by_unit_name():
    caps = {"h/2": Capacity(threads=4, vcpus=4, memory=8 * GiB), "h/1": Capacity(threads=4, vcpus=4, memory=8 * GiB)}
    (a,) = accepted("a", cores=2)
    got = assign([a], current={}, units=["h/2", "h/1"], capacities=caps, located={})
    assert got.units == {a.owner: "h/1"} and got.waiting == {}
    caps["h/0"] = Capacity(threads=16, vcpus=16, memory=8 * GiB)
    big = accepted("big", cores=8)[0]
    got = assign([a, big], current={}, units=["h/0", "h/1", "h/2"], capacities=caps, located={})
    assert got.units == {a.owner: "h/1", big.owner: "h/0"}


def test_assign_keeps_vms_and_live_assignments_and_reassigns_departed_units():
    a, b, c = accepted("a", "b", "c")
    caps = {"h/0": Capacity(threads=8, vcpus=8, memory=8 * GiB), "h/2": Capacity(threads=2, vcpus=2, memory=8 * GiB)}
    current = {a.owner: "h/0", b.owner: "h/1", c.owner: "h/1"}
    located = {c.owner: "h/2"}  # c's VM lives on h/2 whatever the old assignment said
    got = assign([a, b, c], current=current, units=["h/0", "h/2"], capacities=caps, located=located).units
    assert got[a.owner] == "h/0" and got[c.owner] == "h/2"
    assert got[b.owner] == "h/2"  # h/1 left; h/2 is the tighter fit
    # a compose that failed on its unit is placed again
    got = assign([a], current={a.owner: "h/2"}, units=["h/0", "h/2"], capacities=caps, located={}, failed={a.owner})
    assert got.units[a.owner] == "h/2"  # still the best fit, chosen afresh
    got = assign(accepted("x", cores=64), current={}, units=["h/0", "h/2"], capacities=caps, located={})
    assert list(got.units.values()) == ["h/0"]  # nothing fits: the roomiest unit, whose placement says what is short
    got = assign([a], current={}, units=["h/0"], capacities={}, located={})
    assert got.units == {} and "capacity" in got.waiting[a.owner]


def test_unit_actions_compose_only_what_is_assigned_here_and_release_what_nobody_wants():
    a, b = accepted("a", "b")
    ds = judge([rel(spec("a"), spec("b"))], RelationSettings(), {})
    gone = owner_key(M, "client", "gone")
    other_app = owner_key(M, "unrelated", "a")
    vms = [vm("vm-a", a.owner), vm("vm-gone", gone), vm("vm-other", other_app), vm("vm-op", None), vm("vm-a2", a.owner)]
    assignments = {a.owner: "h/0", b.owner: "h/1"}
    work = unit_work("h/0", decisions=ds, assignments=assignments, vms=vms, live_apps={f"{M}/client"})
    assert work.compose == ()  # a exists here; b is h/1's
    assert sorted(work.release) == ["vm-a2", "vm-gone", "vm-other"]
    work = unit_work("h/1", decisions=ds, assignments=assignments, vms=[], live_apps={f"{M}/client"})
    assert [c.owner for c in work.compose] == [b.owner]
    # an app whose list cannot be read keeps its VMs
    work = unit_work(
        "h/0",
        decisions=[],
        assignments={},
        vms=[vm("vm-a", a.owner)],
        live_apps={f"{M}/client"},
        unreadable_apps={f"{M}/client"},
    )
    assert work.release == ()


def test_results_and_merged_statuses():
    ds = judge(
        [
            rel(
                spec("a", interfaces=None),
                spec("b"),
                IncomingRequest("bad", None, "request 'bad': cores: no"),
                spec("c"),
            )
        ],
        RelationSettings(),
        {},
    )
    by = {d.id: d for d in ds}
    nic = NicAllocation("eth0", "bridge", "br0", ip="10.0.0.9", mac="52:54:00:00:00:01")
    here = [vm("vm-a", by["a"].owner, nics=(nic,))]
    assignments = {by["a"].owner: "h/0", by["b"].owner: "h/0", by["c"].owner: "h/1"}
    failures = {by["b"].owner: ComposeFailure("failed", "compose failed at step 'x'")}
    res = unit_results("h/0", decisions=ds, assignments=assignments, vms=here, failures=failures)
    assert res[by["a"].owner] == UnitResult("ready", None, "vm-a", ("52:54:00:00:00:01",), ("10.0.0.9",), 1, GiB)
    assert res[by["b"].owner].status == "failed"
    assert by["c"].owner not in res
    merged = merge_statuses([rel()], decisions=ds, assignments=assignments, results={"h/0": res}, waiting={})
    st = {e["id"]: e for e in merged[1]}
    assert [e["id"] for e in merged[1]] == ["a", "b", "bad", "c"]
    assert (st["a"]["status"], st["a"]["unit"], st["a"]["addresses"]) == ("ready", "h/0", ["10.0.0.9"])
    assert st["b"]["status"] == "failed" and "step" in st["b"]["message"]
    assert st["bad"]["status"] == "rejected"
    assert (st["c"]["status"], st["c"]["unit"]) == ("pending", "h/1")


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
        UnitResult.from_dict(value)


def test_result_round_trips():
    r = UnitResult("ready", "m", "vm-1", ("52:54:00:00:00:01",), ("10.0.0.5",), 2, GiB)
    assert UnitResult.from_dict(r.to_dict()) == r


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
