"""The vm-allocation relation's one entry point: decide(snapshot) -> plan, pure.

The charm glue (src/allocation_relation.py) runs gather -> decide -> execute -> publish:
- gather reads everything into a Snapshot: the requests of every relation, the relation VMs on this
  host, what the other units published (results, capacity), the leader's last assignments;
- decide() judges every request (vmhost.relation_policy) and, on the leader, assigns the accepted
  ones to units (vmhost.relation_assignment); the Plan says what this unit composes and releases;
- execute carries the Plan out on the host; publish reports, via report(), what this unit now serves
  and, on the leader, one status per request to each requirer.
Nothing is remembered between hooks except what Juju holds and the VMs' own owner keys
(docs/design.md §3, §7, §7.1), so a replayed hook decides the same thing and never makes a second VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vmhost.model import VmInfo
from vmhost.relation_assignment import (
    Capacity,
    ComposeFailure,
    UnitResult,
    UnitWork,
    assign,
    merge_statuses,
    unit_results,
    unit_work,
)
from vmhost.relation_policy import (
    AcceptedRequest,
    HeldVm,
    RelationRequests,
    RelationSettings,
    RequestDecision,
    judge_requests,
    split_owner,
)

__all__ = ["PeerUnit", "Plan", "Report", "Snapshot", "decide", "report"]


@dataclass(frozen=True)
class PeerUnit:
    """Another live unit of this application, as it published itself on the peer relation."""

    name: str
    results: Mapping[str, UnitResult] = field(default_factory=dict)
    capacity: Capacity | None = None  # None: not published yet, or unreadable


@dataclass(frozen=True)
class Snapshot:
    """Everything one reconcile decides from, read once at its start."""

    unit: str
    leader: bool
    settings: RelationSettings
    relations: tuple[RelationRequests, ...] = ()
    vms: tuple[VmInfo, ...] = ()  # every VM on this host (operator VMs included: they are left alone)
    peers: tuple[PeerUnit, ...] = ()
    own_results: Mapping[str, UnitResult] = field(default_factory=dict)  # what this unit published last
    capacity: Capacity | None = None  # this unit's free capacity (read on the leader, which assigns)
    assignments: Mapping[str, str] = field(default_factory=dict)  # owner -> unit, as the leader left them
    departing: bool = False  # this unit is leaving the peer relation: it gives its relation VMs back


@dataclass(frozen=True)
class Plan:
    """What this unit does now, and what it tells the others."""

    decisions: tuple[RequestDecision, ...]
    assignments: Mapping[str, str]  # owner -> unit (the leader's new ones, or the current ones)
    assignments_changed: bool  # the leader records `assignments` for the other units
    waiting: Mapping[str, str]  # owner -> why it has no unit yet
    compose: tuple[AcceptedRequest, ...] = ()
    release: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """What publish writes: this unit's results (peer relation), and on the leader each requirer's statuses."""

    results: dict[str, UnitResult]
    statuses: dict[int, list[dict[str, Any]]]


def _held(snapshot: Snapshot) -> dict[str, HeldVm]:
    """owner -> where its VM is: the VMs other units hold (ready or booting; the lowest unit name wins),
    then this host's own relation VMs, which are known for certain."""
    held = {
        owner: HeldVm(peer.name, result.cores, result.memory, result.storage)
        for peer in sorted(snapshot.peers, key=lambda peer: peer.name, reverse=True)
        for owner, result in peer.results.items()
        if result.has_vm
    }
    for vm in snapshot.vms:
        if split_owner(vm.allocation.owner):
            a = vm.allocation
            held[a.owner] = HeldVm(snapshot.unit, a.vcpus, a.memory, a.disk_bytes)
    return held


def decide(snapshot: Snapshot) -> Plan:
    """Judge every request, assign units (leader), and say what this unit composes and releases."""
    held = _held(snapshot)
    decisions = tuple(
        judge_requests(snapshot.relations, settings=snapshot.settings, held=held, assigned=snapshot.assignments)
    )
    accepted = [decision.accepted for decision in decisions if decision.accepted is not None]
    assignments: Mapping[str, str] = snapshot.assignments
    waiting: Mapping[str, str] = {}
    if snapshot.leader:
        capacities = {peer.name: peer.capacity for peer in snapshot.peers if peer.capacity is not None}
        if snapshot.capacity is not None:
            capacities[snapshot.unit] = snapshot.capacity
        failed = {
            owner for peer in snapshot.peers for owner, result in peer.results.items() if result.status == "failed"
        }
        failed |= {owner for owner, result in snapshot.own_results.items() if result.status == "failed"}
        assignment = assign(
            accepted,
            current=snapshot.assignments,
            units={snapshot.unit} | {peer.name for peer in snapshot.peers},
            capacities=capacities,
            located={owner: vm.unit for owner, vm in held.items()},
            failed=failed,
        )
        assignments, waiting = assignment.units, assignment.waiting
    if snapshot.departing:
        work = UnitWork(release=tuple(sorted(vm.name for vm in snapshot.vms if split_owner(vm.allocation.owner))))
    else:
        work = unit_work(
            snapshot.unit,
            decisions=decisions,
            assignments=assignments,
            vms=snapshot.vms,
            live_apps={relation.app_key for relation in snapshot.relations},
            held_elsewhere={
                owner for peer in snapshot.peers for owner, result in peer.results.items() if result.has_vm
            },
            unreadable_apps={relation.app_key for relation in snapshot.relations if relation.error},
        )
    return Plan(
        decisions=decisions,
        assignments=assignments,
        assignments_changed=snapshot.leader and assignments != snapshot.assignments,
        waiting=waiting,
        compose=work.compose,
        release=work.release,
    )


def report(
    snapshot: Snapshot, plan: Plan, *, vms: tuple[VmInfo, ...], failures: Mapping[str, ComposeFailure]
) -> Report:
    """After execute: this unit's results from the VMs now on the host, and (leader) every requirer's statuses."""
    results = {}
    if not snapshot.departing:
        results = unit_results(
            snapshot.unit, decisions=plan.decisions, assignments=plan.assignments, vms=vms, failures=failures
        )
    statuses: dict[int, list[dict[str, Any]]] = {}
    if snapshot.leader:
        every_unit = {peer.name: peer.results for peer in snapshot.peers} | {snapshot.unit: results}
        statuses = merge_statuses(
            snapshot.relations,
            decisions=plan.decisions,
            assignments=plan.assignments,
            results=every_unit,
            waiting=plan.waiting,
        )
    return Report(results=results, statuses=statuses)
