"""vmhost.relation.decide() on plain snapshots (no ops): every policy rule and the unit assignment,
seen through the one entry point the charm calls, and report() after the plan is carried out."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.relation_requests import GiB, M, rel, spec, vm
from tests.unit.ssh_keys import ED25519
from vmhost.model import CloudInit
from vmhost.relation import PeerUnit, Snapshot, decide, report
from vmhost.relation_assignment import Capacity, ComposeFailure, UnitResult
from vmhost.relation_policy import Binding, IncomingRequest, Quota, RelationSettings, owner_key, vm_name

ROOMY = Capacity(threads=8, vcpus=8, memory=16 * GiB)
TIGHT = Capacity(threads=2, vcpus=2, memory=4 * GiB)


def owner(request_id: str, app: str = "client") -> str:
    return owner_key(M, app, request_id)


def snapshot(*relations, settings=None, **kw) -> Snapshot:
    """The leader h/0 alone with room to spare, unless `kw` says otherwise."""
    defaults = {"unit": "h/0", "leader": True, "capacity": ROOMY}
    return Snapshot(settings=settings or RelationSettings(), relations=tuple(relations), **{**defaults, **kw})


def composed(plan) -> list[str]:
    return [accepted.owner for accepted in plan.compose]


def rejected(plan) -> dict[str, str]:
    return {decision.id: decision.rejected for decision in plan.decisions if decision.rejected}


# ---------------------------------------------------------------------------------------------
# Request policy


def test_a_new_request_is_named_by_the_host_assigned_to_the_leader_and_composed():
    plan = decide(snapshot(rel(spec("web-0", cores=2))))
    (accepted,) = plan.compose
    assert accepted.owner == owner("web-0") and accepted.request.name == vm_name(owner("web-0"))
    assert accepted.request.cores == 2 and accepted.request.owner == owner("web-0")
    assert plan.assignments == {owner("web-0"): "h/0"} and plan.assignments_changed
    assert plan.release == () and plan.waiting == {}


def test_quota_counts_vms_that_exist_first_then_requests_in_order():
    settings = RelationSettings(quota=Quota(vms=2, cores=3))
    here = (vm("vm-c", owner("c"), cores=2),)
    plan = decide(snapshot(rel(spec("a", cores=2), spec("b"), spec("c")), settings=settings, vms=here))
    assert composed(plan) == [owner("b")]  # c exists (2 cores), b fits (1 more), a would make 4 > 3
    assert "over quota" in rejected(plan)["a"] and "cores" in rejected(plan)["a"]
    assert plan.release == ()


def test_storage_quota_counts_the_disks_of_vms_here_and_on_peers():
    from vmhost.model import DiskAllocation

    settings = RelationSettings(quota=Quota(storage=40 * 10**9))
    here = vm("vm-c", owner("c"))
    here = replace(here, allocation=replace(here.allocation, disks=(DiskAllocation("root", 20 * 10**9, "default"),)))
    peer = PeerUnit("h/1", results={owner("d"): UnitResult("ready", name="vm-d", storage=15 * 10**9)})
    requests = rel(spec("c"), spec("d"), spec("a", storage="root:10"), spec("b", storage="root:5"))
    plan = decide(snapshot(requests, settings=settings, vms=(here,), peers=(peer,)))
    assert "needs 10 GB of disk, 5 GB of 40 GB left" in rejected(plan)["a"]  # 20 here + 15 on h/1
    assert owner("b") in composed(plan)
    assert UnitResult.from_dict(UnitResult("ready", name="vm-d", storage=15 * 10**9).to_dict()).storage == 15 * 10**9


def test_quota_is_per_application():
    settings = RelationSettings(quota=Quota(vms=1))
    plan = decide(snapshot(rel(spec("a")), rel(spec("a"), app="other", rid=2), settings=settings))
    assert composed(plan) == [owner("a"), owner("a", "other")]


def test_space_maps_onto_its_bridge_and_unknown_spaces_are_rejected():
    settings = RelationSettings(space_bridges={"public": "br0"})
    plan = decide(
        snapshot(
            rel(spec("a", interfaces="eth0:space=public"), spec("b", interfaces="eth0:space=dmz")), settings=settings
        )
    )
    (accepted,) = plan.compose
    assert accepted.request.interfaces[0].name == "br0"
    assert "space dmz" in rejected(plan)["b"]


def test_allowed_networks_refuse_a_bridge_not_listed():
    settings = RelationSettings(allowed_networks=("public",), space_bridges={"public": "br0", "storage": "br1"})
    relation = rel(spec("a", interfaces="eth0:space=public"), spec("b", interfaces="eth0:space=storage"))
    plan = decide(snapshot(relation, settings=settings))
    assert composed(plan) == [owner("a")]
    assert "does not offer to remote models" in rejected(plan)["b"] and "br1" not in rejected(plan)["b"]


def test_a_request_naming_no_network_gets_the_binding():
    settings = RelationSettings(binding=Binding(("br5",)))
    (accepted,) = decide(snapshot(rel(spec("a")), settings=settings)).compose
    assert [(nic.label, nic.name) for nic in accepted.request.interfaces] == [("eth0", "br5")]


def test_an_image_path_is_rejected_and_an_alias_boots_from_the_image_with_the_seed():
    settings = RelationSettings(image="ubuntu:22.04")
    keys = [ED25519]
    plan = decide(
        snapshot(
            rel(spec("a", image="../etc/passwd"), spec("b", image="ubuntu:noble", ssh_authorized_keys=keys), spec("c")),
            settings=settings,
        )
    )
    assert "image must be <os>:<alias>" in rejected(plan)["a"]
    b, c = plan.compose
    assert (b.boot, b.image, c.boot, c.image) == ("image", "ubuntu:noble", "image", "ubuntu:22.04")
    assert b.cloud_init == CloudInit(hostname=b.request.name, ssh_authorized_keys=(ED25519,))
    assert c.cloud_init == CloudInit(hostname=c.request.name)


def test_a_request_that_became_invalid_keeps_its_vm():
    relation = rel(IncomingRequest("a", None, "request 'a' is invalid: cores: too many"))
    plan = decide(snapshot(relation, vms=(vm("vm-a", owner("a")),)))
    assert plan.compose == () and plan.release == ()
    assert rejected(plan) == {"a": "request 'a' is invalid: cores: too many"}


def test_an_unreadable_list_releases_none_of_its_vms():
    relation = rel(error="the requests field is not JSON")
    plan = decide(snapshot(relation, vms=(vm("vm-a", owner("a")),)))
    assert plan.release == ()


# ---------------------------------------------------------------------------------------------
# Withdrawals and replays


def test_withdrawn_requests_and_broken_relations_release_their_vms_and_nothing_else():
    vms = (
        vm("vm-a", owner("a")),
        vm("vm-gone", owner("gone")),  # its id is no longer listed
        vm("vm-other", owner("a", "unrelated")),  # its application is no longer related
        vm("vm-operator", None),  # made by the operator: never touched
        vm("vm-a-copy", owner("a")),  # a second VM for one owner
    )
    plan = decide(snapshot(rel(spec("a")), vms=vms))
    assert sorted(plan.release) == ["vm-a-copy", "vm-gone", "vm-other"]
    assert plan.compose == ()


def test_a_replayed_snapshot_never_composes_twice():
    first = decide(snapshot(rel(spec("a"), spec("b"))))
    assert composed(first) == [owner("a"), owner("b")]
    made = tuple(vm(accepted.request.name, accepted.owner) for accepted in first.compose)
    again = snapshot(rel(spec("a"), spec("b")), vms=made, assignments=first.assignments)
    replay = decide(again)
    assert replay.compose == () and replay.release == () and not replay.assignments_changed
    assert decide(again) == replay  # deterministic


def test_a_vm_ready_on_another_unit_is_not_composed_here():
    peer = PeerUnit("h/1", {owner("a"): UnitResult("ready", name="vm-x", cores=1, memory=GiB)}, ROOMY)
    plan = decide(snapshot(rel(spec("a")), peers=(peer,)))
    assert plan.assignments == {owner("a"): "h/1"} and plan.compose == ()


def test_a_copy_on_this_unit_of_a_vm_another_unit_serves_is_released():
    peer = PeerUnit("h/1", {owner("a"): UnitResult("ready", name="vm-a", cores=1, memory=GiB)}, ROOMY)
    here = (vm("vm-a", owner("a")),)
    plan = decide(
        snapshot(rel(spec("a")), peers=(peer,), vms=here, unit="h/2", leader=False, assignments={owner("a"): "h/1"})
    )
    assert plan.release == ("vm-a",)


# ---------------------------------------------------------------------------------------------
# Unit assignment


def test_the_leader_assigns_to_the_tightest_unit_that_fits():
    peers = (PeerUnit("h/1", capacity=TIGHT), PeerUnit("h/2", capacity=ROOMY))
    plan = decide(snapshot(rel(spec("small"), spec("big", cores=6)), peers=peers))
    assert plan.assignments == {owner("small"): "h/1", owner("big"): "h/0"}
    assert composed(plan) == [owner("big")]  # the leader composes only its own


def test_a_departed_units_requests_are_assigned_again():
    current = {owner("a"): "h/1", owner("b"): "h/2"}  # h/1 has left the peer relation
    plan = decide(snapshot(rel(spec("a"), spec("b")), peers=(PeerUnit("h/2", capacity=ROOMY),), assignments=current))
    assert plan.assignments[owner("b")] == "h/2"  # a live assignment stands
    assert plan.assignments[owner("a")] in ("h/0", "h/2") and plan.assignments_changed


def test_a_compose_that_failed_is_placed_afresh():
    failed = {owner("a"): UnitResult("failed", "no room")}
    peers = (PeerUnit("h/1", failed, TIGHT),)
    plan = decide(snapshot(rel(spec("a", cores=4)), peers=peers, assignments={owner("a"): "h/1"}))
    assert plan.assignments == {owner("a"): "h/0"}  # h/1 cannot fit 4 cores; chosen afresh


def test_without_published_capacity_requests_wait_and_say_why():
    plan = decide(snapshot(rel(spec("a")), capacity=None))
    assert plan.assignments == {} and plan.compose == ()
    assert "capacity" in plan.waiting[owner("a")]


def test_a_follower_keeps_the_leaders_assignments_and_composes_its_own():
    current = {owner("a"): "h/1", owner("b"): "h/0"}
    plan = decide(snapshot(rel(spec("a"), spec("b")), unit="h/1", leader=False, capacity=None, assignments=current))
    assert plan.assignments == current and not plan.assignments_changed and plan.waiting == {}
    assert composed(plan) == [owner("a")]


def test_a_departing_unit_gives_back_its_relation_vms_and_composes_nothing():
    vms = (vm("vm-a", owner("a")), vm("vm-operator", None))
    state = snapshot(rel(spec("a"), spec("b")), vms=vms, departing=True)
    plan = decide(state)
    assert plan.compose == () and plan.release == ("vm-a",)
    assert report(state, plan, vms=(), failures={}).results == {}


# ---------------------------------------------------------------------------------------------
# After execute: what is published


def test_report_merges_this_units_results_with_the_peers_into_one_status_per_request():
    peers = (PeerUnit("h/1", {owner("c"): UnitResult("ready", name="vm-c", cores=1, memory=GiB)}, ROOMY),)
    state = snapshot(rel(spec("a"), spec("b"), spec("c"), IncomingRequest("#4", None, "junk")), peers=peers)
    plan = decide(state)
    made = next(accepted for accepted in plan.compose if accepted.owner == owner("a"))
    after = (vm(made.request.name, made.owner, addresses=("10.0.0.9",)),)
    published = report(state, plan, vms=after, failures={owner("b"): ComposeFailure("failed", "not enough memory")})
    assert published.results[owner("a")].status == "ready" and published.results[owner("b")].status == "failed"
    statuses = {entry["id"]: entry for entry in published.statuses[1]}
    assert [entry["id"] for entry in published.statuses[1]] == ["a", "b", "c", "#4"]
    assert (statuses["a"]["status"], statuses["a"]["unit"]) == ("ready", "h/0")
    assert (statuses["b"]["status"], statuses["b"]["message"]) == ("failed", "not enough memory")
    assert (statuses["c"]["status"], statuses["c"]["unit"]) == ("ready", "h/1")
    assert statuses["#4"]["status"] == "rejected"


def test_a_follower_reports_its_results_but_no_statuses():
    state = snapshot(rel(spec("a")), unit="h/1", leader=False, assignments={owner("a"): "h/1"})
    plan = decide(state)
    published = report(state, plan, vms=(), failures={})
    assert published.results[owner("a")] == UnitResult("pending", "being composed on h/1")
    assert published.statuses == {}


def test_allowed_networks_refuse_a_named_bridge_not_listed():
    settings = RelationSettings(allowed_networks=("br0",))
    plan = decide(snapshot(rel(spec("a", interfaces="eth0:name=br1")), settings=settings))
    assert plan.compose == () and "does not offer to remote models" in rejected(plan)["a"]


def test_an_application_related_twice_has_one_quota_and_one_vm_per_id():
    # A requirer charm with two vm_allocation endpoints can relate both to this host: still one application.
    settings = RelationSettings(quota=Quota(vms=2))
    state = snapshot(rel(spec("a"), spec("b")), rel(spec("c"), spec("a", cores=2), rid=2), settings=settings)
    plan = decide(state)
    assert composed(plan) == [owner("a"), owner("b")]
    again = {(decision.relation_id, decision.id): decision for decision in plan.decisions}
    assert "over quota" in again[2, "c"].rejected
    assert again[2, "a"].owner is None and "another of its relations" in again[2, "a"].rejected
    made = tuple(vm(accepted.request.name, accepted.owner, addresses=("10.0.0.9",)) for accepted in plan.compose)
    second = {entry["id"]: entry for entry in report(state, plan, vms=made, failures={}).statuses[2]}
    assert second["a"]["status"] == "rejected" and second["a"]["name"] is None  # relation 1's VM is not told to 2


def test_a_request_already_assigned_counts_before_new_ones_so_reordering_cannot_pass_the_quota():
    # h/1 was given "a" and may have made it without publishing yet; the requirer then lists a new "c" first.
    settings = RelationSettings(quota=Quota(vms=1))
    peers = (PeerUnit("h/1", capacity=ROOMY),)
    state = snapshot(rel(spec("c"), spec("a")), peers=peers, settings=settings, assignments={owner("a"): "h/1"})
    plan = decide(state)
    assert plan.assignments == {owner("a"): "h/1"} and plan.compose == ()
    assert "over quota" in rejected(plan)["c"] and "a" not in rejected(plan)
    follower = decide(replace(state, unit="h/1", leader=False, peers=(PeerUnit("h/0", capacity=ROOMY),)))
    assert composed(follower) == [owner("a")]


def test_an_application_name_no_owner_key_can_hold_is_rejected_so_no_vm_is_made_that_could_never_be_released():
    plan = decide(snapshot(rel(spec("x"), app="a" * 64)))
    assert plan.compose == () and plan.assignments == {}
    assert "application name" in rejected(plan)["x"] and "63" in rejected(plan)["x"]
    assert composed(decide(snapshot(rel(spec("x"), app="a" * 63)))) == [owner("x", "a" * 63)]


def test_the_vms_a_too_long_list_keeps_still_count_against_its_quota():
    # Past 64 entries a list is served only up to there and none of its VMs is released (the rest may be
    # listed further on): those VMs must count, or every longer list would get a fresh quota's worth.
    settings = RelationSettings(quota=Quota(vms=1))
    here = (vm("vm-a", owner("a")),)
    too_long = "too many requests: 65 entries, at most 64 per application; the first 64 are served"
    plan = decide(snapshot(rel(spec("b"), error=too_long), settings=settings, vms=here))
    assert plan.compose == () and plan.release == ()
    assert "over quota" in rejected(plan)["b"]
