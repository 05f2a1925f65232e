"""Charm glue for `vm-allocation`: gather what Juju and the host know, decide (vmhost.relation), execute, publish.

Data flow with several units (Juju is the distributed engine):
- every unit publishes its free capacity and its results (owner key -> status) in its peer unit databag;
- the leader assigns each accepted request to a unit (peer app databag `assignments`);
- each unit composes what is assigned to it and releases what nobody asks for any more;
- the leader merges the results into each requirer's `vms` (only the leader may write app data).
Nothing is remembered between hooks except what Juju holds and the VMs' own owner keys.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import ops
from pydantic import ValidationError

from charm_config import CharmConfig, relation_settings
from charms.vm_host.v0.vm_allocation import MAX_FIELD_BYTES, MAX_MESSAGE, VmAllocationProvider, VmStatus, decode_json
from vmhost.placement import PlacementError, compute_usage
from vmhost.providers.base import ProviderError
from vmhost.providers.image_source import ImageError, ImageNotFound
from vmhost.relation import PeerUnit, Plan, Snapshot, decide, report
from vmhost.relation_assignment import Capacity, ComposeFailure, UnitResult
from vmhost.relation_policy import (
    AcceptedRequest,
    Binding,
    IncomingRequest,
    RelationRequests,
    RelationSettings,
    nic_policy_error,
    remote_reason,
)
from vmhost.service import HostLockError, Refused, VmHost
from vmhost.timeouts import HypervisorTimeout

logger = logging.getLogger(__name__)

ASSIGNMENTS_KEY = "assignments"
CAPACITY_KEY = "capacity"
RESULTS_KEY = "results"
INTERNAL_ERROR = "the host hit an internal error serving this request; its operator can find the cause in the unit log"
HYPERVISOR_ERROR = "the hypervisor could not create this VM; the host's operator can find why in the unit log"
# A unit's results cover every request it serves, of every related application.
PEER_FIELD_BYTES = 16 * MAX_FIELD_BYTES


def _json(data: Mapping[str, str], key: str, default: Any) -> Any:
    """A JSON value from a peer databag, or `default` when absent or unusable (ours, but read totally)."""
    try:
        value = decode_json(data.get(key), limit=PEER_FIELD_BYTES)
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default


def _results(data: Mapping[str, str]) -> dict[str, UnitResult]:
    """owner -> UnitResult as a unit published them; an entry that is not one is left out."""
    out = {}
    for owner, entry in _json(data, RESULTS_KEY, {}).items():
        try:
            out[owner] = UnitResult.from_dict(entry)
        except ValueError:
            logger.warning("a peer result for %r is unreadable; ignored", owner[:200])  # %r: any text logs
    return out


def bounded(message: str | None, limit: int = MAX_MESSAGE) -> str | None:
    """`message` cut to the library's bound: remote text can make a message any length, and a status
    the library refuses would fail the hook for every request (every publish path goes through here)."""
    if message is None or len(message) <= limit:
        return message
    return message[: limit - 1] + "\N{HORIZONTAL ELLIPSIS}"


def _status(entry: dict[str, Any]) -> VmStatus:
    """One published status; an entry the library still refuses is reported failed, not raised."""
    try:
        return VmStatus.model_validate({**entry, "message": bounded(entry.get("message"))})
    except ValidationError as e:
        logger.error("status for request %s is unpublishable (%s)", entry.get("id"), _where(e))
        return VmStatus(id=str(entry.get("id"))[:128], status="failed", message=INTERNAL_ERROR)


def _where(e: BaseException) -> str:
    """Exception type and the innermost frame: enough to find a bug, never the message (it may echo
    a remote request's keys or user data)."""
    frames = traceback.extract_tb(e.__traceback__)
    at = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(e).__name__}{at}"


class AllocationRelation(ops.Object):
    """Serves VM requests from remote applications over `vm-allocation`."""

    def __init__(self, charm: ops.CharmBase, relation_name: str = "vm-allocation", peer_name: str = "vm-host-peers"):
        super().__init__(charm, relation_name)
        self._charm = charm
        self.relation_name = relation_name
        self.peer_name = peer_name
        self.provider = VmAllocationProvider(charm, relation_name)
        self._departing = False
        if peer_name in charm.meta.peers:
            charm.framework.observe(charm.on[peer_name].relation_departed, self._on_peer_departed)

    def _on_peer_departed(self, event: ops.RelationDepartedEvent) -> None:
        """This unit is leaving: its next reconcile (in this same dispatch) gives its relation VMs back,
        and the leader assigns their requests elsewhere. Construct this object before the charm observes
        the peer departed event, so this flag is set before the charm's reconcile runs."""
        if event.departing_unit == self._charm.unit:
            self._departing = True

    def reconcile(self, host: VmHost, config: CharmConfig) -> str | None:
        """Bring the relation VMs on this host and every requirer's statuses in line with the requests;
        returns why the relation is paused (for the unit's status), or None."""
        try:
            settings = relation_settings(config, self._binding())
        except ValueError as e:  # e.g. network-get answered with something that is not JSON
            logger.error("vm-allocation is paused: the relation settings are invalid (%s)", e)
            return f"vm-allocation paused: cannot read this unit's binding ({bounded(str(e), 120)})"
        snapshot = self._gather(host, settings)
        plan = decide(snapshot)
        failures = self._execute(host, snapshot, plan)
        self._publish(host, snapshot, plan, failures)
        return None

    # --- gather -------------------------------------------------------------------------------

    def _gather(self, host: VmHost, settings: RelationSettings) -> Snapshot:
        """Everything decide() needs, read once: the requests, this host's VMs, what the peers published."""
        unit = self._charm.unit
        leader = unit.is_leader()
        peer = self.model.get_relation(self.peer_name)
        return Snapshot(
            unit=unit.name,
            leader=leader,
            settings=settings,
            relations=tuple(self._requests()),
            vms=tuple(host.vms()),
            peers=tuple(self._peer_unit(peer, other) for other in peer.units if other.name != unit.name)
            if peer
            else (),
            own_results=_results(peer.data[unit]) if peer is not None else {},
            capacity=self._capacity(host) if leader else None,
            assignments=_assignments(peer.data[self._charm.app]) if peer is not None else {},
            departing=self._departing,
        )

    def _requests(self) -> list[RelationRequests]:
        out = []
        for relation in self.provider.relations:
            if relation.app is None:
                continue
            parsed, error = self.provider.requests(relation)
            incoming = tuple(
                IncomingRequest(entry.id, entry.spec.model_dump() if entry.spec else None, entry.error)
                for entry in parsed
            )
            model_uuid = self.provider.remote_model_uuid(relation)
            out.append(RelationRequests(relation.id, model_uuid, relation.app.name, incoming, error))
        return out

    def _peer_unit(self, peer: ops.Relation, unit: ops.Unit) -> PeerUnit:
        """What another unit published: its results and its capacity (an unreadable one is left out)."""
        data = peer.data[unit]
        capacity = None
        published = _json(data, CAPACITY_KEY, {})
        try:
            if published:
                capacity = Capacity.from_dict(published)
        except ValueError:
            logger.warning("the capacity %s published is unreadable; ignored", unit.name)
        return PeerUnit(unit.name, _results(data), capacity)

    def _binding(self) -> Binding:
        """The host interfaces and subnets Juju bound this endpoint to (`--bind vm-allocation=SPACE`).

        Each unit reads its own, so every host resolves requests onto its own interface names.
        """
        try:
            network = self.model.get_binding(self.relation_name).network
        except ops.ModelError as e:
            logger.warning(
                "no network info for the %s binding (%s); requests that name no network are placed without it",
                self.relation_name,
                e,
            )
            return Binding()
        names = dict.fromkeys(interface.name for interface in network.interfaces if interface.name)
        subnets = dict.fromkeys(
            str(interface.subnet) for interface in network.interfaces if interface.subnet is not None
        )
        return Binding(tuple(names), tuple(subnets))

    def _capacity(self, host: VmHost) -> Capacity:
        return Capacity.from_usage(compute_usage(host.topology(), host.allocations(), host.policy))

    # --- execute ------------------------------------------------------------------------------

    def _execute(self, host: VmHost, snapshot: Snapshot, plan: Plan) -> dict[str, ComposeFailure]:
        """Record the leader's assignments (first: other units act on them even if this one cannot),
        release, then compose; owner -> ComposeFailure for composes that did not happen."""
        peer = self.model.get_relation(self.peer_name)
        if peer is not None and plan.assignments_changed:
            peer.data[self._charm.app][ASSIGNMENTS_KEY] = json.dumps(dict(plan.assignments), sort_keys=True)
        for name in plan.release:
            self._release(host, name)
        failures: dict[str, ComposeFailure] = {}
        for accepted in plan.compose:
            failure = self._compose(host, snapshot.settings, accepted)
            if failure is not None:
                failures[accepted.owner] = failure
        return failures

    def _release(self, host: VmHost, name: str) -> None:
        try:
            host.decompose(name)
            logger.info("released relation VM %s", name)
        except (HostLockError, HypervisorTimeout):
            raise  # this unit cannot serve now (see _compose)
        except ProviderError as e:
            logger.warning("could not release relation VM %s: %s", name, e)
        except Exception as e:  # one bad release must not stop the other requests being served
            logger.error("could not release relation VM %s: unexpected %s", name, _where(e))

    @staticmethod
    def _nic_policy(planned, topology, settings: RelationSettings, owner: str) -> str | None:
        """nic_policy_error, and the host-side detail the remote model is not told, in the operator's log."""
        reason = nic_policy_error(planned, host_nics=topology.nics, settings=settings)
        if reason:
            parents = ", ".join(sorted({nic.parent for nic in planned.nics if nic.parent}))
            logger.info("refused %s for %s: NICs on %s, allowed-networks %s", planned.name, owner, parents,
                        ", ".join(settings.allowed_networks))  # fmt: skip
        return reason

    def _compose(self, host: VmHost, settings: RelationSettings, accepted: AcceptedRequest) -> ComposeFailure | None:
        """Compose one accepted request; why not, when it did not happen."""
        try:
            vm = host.compose(
                accepted.request,
                start=True,
                boot=accepted.boot,
                image=accepted.image,
                cloud_init=accepted.cloud_init,
                # checked on the very plan that is created, under the host lock
                accept=lambda planned, topology: self._nic_policy(planned, topology, settings, accepted.owner),
            )
            logger.info("composed %s for %s", vm.name, accepted.owner)
        except Refused as e:
            return ComposeFailure("rejected", bounded(str(e)) or "")
        except (HostLockError, HypervisorTimeout):
            # Not the request's fault: the unit waits (the charm says why) and the next hook serves it.
            # Never published: the sentence names the lock holder's command line or the daemon's URI.
            raise
        except ImageNotFound:  # their image name, told back without the server's address
            logger.warning("compose for %s failed: no image %r on the image server", accepted.owner, accepted.image)
            return ComposeFailure("failed", f"the host's image server has no image named {accepted.image}")
        except ImageError as e:  # unreachable server, checksum mismatch: the operator's to fix
            logger.warning("compose for %s (image %s) failed: %s", accepted.owner, accepted.image, e)
            return ComposeFailure(
                "failed", f"the host could not fetch image {accepted.image}; its operator is told why"
            )
        except PlacementError as e:  # the remote model learns what was short, the log how much
            logger.warning("compose for %s failed: %s", accepted.owner, e)
            return ComposeFailure("failed", remote_reason(str(e)))
        except (ProviderError, ValueError, RuntimeError, OSError) as e:
            logger.warning("compose for %s failed: %s", accepted.owner, e)
            return ComposeFailure("failed", HYPERVISOR_ERROR)
        except Exception as e:  # a bug hit by one request must not stop the others being served
            logger.error("compose for %s failed: unexpected %s", accepted.owner, _where(e))
            return ComposeFailure("failed", INTERNAL_ERROR)
        return None

    # --- publish ------------------------------------------------------------------------------

    def _publish(self, host: VmHost, snapshot: Snapshot, plan: Plan, failures: dict[str, ComposeFailure]) -> None:
        """This unit's results and capacity on the peer relation; on the leader, each requirer's statuses."""
        vms = tuple(host.vms()) if plan.compose or plan.release else snapshot.vms
        published = report(snapshot, plan, vms=vms, failures=failures)
        peer = self.model.get_relation(self.peer_name)
        if peer is not None:
            mine = peer.data[self._charm.unit]
            results = {
                owner: replace(result, message=bounded(result.message)).to_dict()
                for owner, result in sorted(published.results.items())
            }
            mine[RESULTS_KEY] = json.dumps(results)
            mine[CAPACITY_KEY] = json.dumps(self._capacity(host).to_dict())
        if not snapshot.leader:
            return
        errors = {relation.relation_id: relation.error for relation in snapshot.relations}
        for relation in self.provider.relations:
            if relation.id in published.statuses:
                statuses = [_status(entry) for entry in published.statuses[relation.id]]
                self.provider.publish(relation, statuses, error=bounded(errors.get(relation.id)))


def _assignments(data: Mapping[str, str]) -> dict[str, str]:
    """owner -> unit as the leader recorded them (entries that are not names are left out)."""
    current = _json(data, ASSIGNMENTS_KEY, {})
    return {owner: unit for owner, unit in current.items() if isinstance(unit, str)}
