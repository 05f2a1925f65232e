"""Charm glue for `vm-allocation`: gather what Juju knows, let vmhost.broker decide, carry it out.

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
from dataclasses import replace
from typing import Any

import ops
from pydantic import ValidationError

from charm_config import relation_settings
from charms.vm_host.v0.vm_allocation import MAX_FIELD_BYTES, MAX_MESSAGE, VmAllocationProvider, VmStatus, decode_json
from vmhost import broker
from vmhost.placement import PlacementError, compute_usage
from vmhost.providers.base import ProviderError
from vmhost.service import HostLockError, Refused
from vmhost.timeouts import HypervisorTimeout

logger = logging.getLogger(__name__)

ASSIGNMENTS_KEY = "assignments"
CAPACITY_KEY = "capacity"
RESULTS_KEY = "results"
INTERNAL_ERROR = "the host hit an internal error serving this request; its operator can find the cause in the unit log"
HYPERVISOR_ERROR = "the hypervisor could not create this VM; the host's operator can find why in the unit log"
# A unit's results cover every request it serves, of every related application.
PEER_FIELD_BYTES = 16 * MAX_FIELD_BYTES


def _json(data: Any, key: str, default: Any) -> Any:
    """A JSON value from a peer databag, or `default` when absent or unusable (ours, but read totally)."""
    try:
        value = decode_json(data.get(key), limit=PEER_FIELD_BYTES)
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default


def _results(data: Any) -> dict[str, broker.Result]:
    """owner -> Result as a unit published them; an entry that is not one is left out."""
    out = {}
    for owner, entry in _json(data, RESULTS_KEY, {}).items():
        try:
            out[owner] = broker.Result.from_dict(entry)
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


def _own_results(peer: ops.Relation | None, unit: ops.Unit) -> dict[str, broker.Result]:
    """What this unit published last time (to retry its failed composes elsewhere)."""
    return _results(peer.data[unit]) if peer is not None else {}


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

    # -----------------------------------------------------------------------------------------

    def _inputs(self) -> list[broker.RelationInput]:
        out = []
        for rel in self.provider.relations:
            if rel.app is None:
                continue
            parsed, error = self.provider.requests(rel)
            incoming = tuple(broker.Incoming(p.id, p.spec.model_dump() if p.spec else None, p.error) for p in parsed)
            out.append(
                broker.RelationInput(rel.id, self.provider.remote_model_uuid(rel), rel.app.name, incoming, error)
            )
        return out

    def _binding(self) -> broker.Binding:
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
            return broker.Binding()
        names = dict.fromkeys(i.name for i in network.interfaces if i.name)
        subnets = dict.fromkeys(str(i.subnet) for i in network.interfaces if i.subnet is not None)
        return broker.Binding(tuple(names), tuple(subnets))

    def _capacity(self, host: Any) -> broker.Capacity:
        return broker.Capacity.from_usage(compute_usage(host.topology(), host.allocations(), host.policy))

    def reconcile(self, host: Any, config: Any) -> None:
        """Bring the relation VMs on this host and every requirer's statuses in line with the requests."""
        try:
            settings = replace(relation_settings(config), binding=self._binding())
        except ValueError as e:
            logger.error("vm-allocation is paused: the relation settings are invalid (%s)", e)
            return
        unit, me = self._charm.unit, self._charm.unit.name
        leader = unit.is_leader()
        peer = self.model.get_relation(self.peer_name)
        inputs = self._inputs()

        others = {u.name for u in peer.units if u.name != me} if peer else set()
        live_units = {me} | others
        peer_results: dict[str, dict[str, broker.Result]] = {}
        capacities: dict[str, broker.Capacity] = {}
        if peer is not None:
            for u in peer.units:
                if u.name == me:
                    continue
                peer_results[u.name] = _results(peer.data[u])
                cap = _json(peer.data[u], CAPACITY_KEY, {})
                try:
                    if cap:
                        capacities[u.name] = broker.Capacity.from_dict(cap)
                except ValueError:
                    logger.warning("the capacity %s published is unreadable; ignored", u.name)

        vms = host.vms()
        held = {
            o: broker.Held(u, r.cores, r.memory)
            for u, res in sorted(peer_results.items(), reverse=True)
            for o, r in res.items()
            if r.status == "ready"
        }
        for vm in vms:
            if broker.split_owner(vm.allocation.owner):
                held[vm.allocation.owner] = broker.Held(me, vm.allocation.vcpus, vm.allocation.memory)
        decisions = broker.evaluate(inputs, settings, held)
        accepted = [d.accepted for d in decisions if d.accepted is not None]

        current = _json(peer.data[self._charm.app], ASSIGNMENTS_KEY, {}) if peer else {}
        current = {k: v for k, v in current.items() if isinstance(v, str)}
        waiting: dict[str, str] = {}
        if leader:
            capacities[me] = self._capacity(host)
            located = {o: h.unit for o, h in held.items()}
            failed = {o for res in peer_results.values() for o, r in res.items() if r.status == "failed"}
            failed |= {o for o, r in _own_results(peer, unit).items() if r.status == "failed"}
            assignments, waiting = broker.assign(accepted, current, live_units, capacities, located, failed)
            if peer is not None and assignments != current:
                peer.data[self._charm.app][ASSIGNMENTS_KEY] = json.dumps(assignments, sort_keys=True)
        else:
            assignments = current

        ready_elsewhere = {o for u, res in peer_results.items() for o, r in res.items() if r.status == "ready"}
        live_apps = {i.app_key for i in inputs}
        unreadable = {i.app_key for i in inputs if i.error}
        compose, release = broker.unit_actions(me, decisions, assignments, vms, live_apps, ready_elsewhere, unreadable)
        if self._departing:
            compose = []
            release = sorted(vm.name for vm in vms if broker.split_owner(vm.allocation.owner))

        outcomes = self._execute(host, settings, compose, release)
        if compose or release:
            vms = host.vms()
        results = broker.unit_results(me, decisions, assignments, vms, outcomes)
        if self._departing:
            results = {}
        if peer is not None:
            mine = peer.data[unit]
            mine[RESULTS_KEY] = json.dumps(
                {o: replace(r, message=bounded(r.message)).to_dict() for o, r in sorted(results.items())}
            )
            mine[CAPACITY_KEY] = json.dumps(self._capacity(host).to_dict())

        if leader:
            all_results = {u: r for u, r in peer_results.items() if u in live_units} | {me: results}
            merged = broker.merge_statuses(inputs, decisions, assignments, all_results, waiting)
            errors = {i.relation_id: i.error for i in inputs}
            for rel in self.provider.relations:
                if rel.id in merged:
                    statuses = [_status(e) for e in merged[rel.id]]
                    self.provider.publish(rel, statuses, error=bounded(errors.get(rel.id)))

    def _execute(
        self,
        host: Any,
        settings: broker.Settings,
        compose: list[broker.Accepted],
        release: list[str],
    ) -> dict[str, tuple[str, str]]:
        """Release, then compose; owner -> (failed | rejected, why) for composes that did not happen."""
        for name in release:
            try:
                host.decompose(name)
                logger.info("released relation VM %s", name)
            except (HostLockError, HypervisorTimeout):
                raise  # this unit cannot serve now (see below)
            except ProviderError as e:
                logger.warning("could not release relation VM %s: %s", name, e)
            except Exception as e:  # one bad release must not stop the other requests being served
                logger.error("could not release relation VM %s: unexpected %s", name, _where(e))
        outcomes: dict[str, tuple[str, str]] = {}
        for acc in compose:
            try:
                vm = host.compose(
                    acc.request,
                    start=True,
                    boot=acc.boot,
                    image=acc.image,
                    cloud_init=acc.cloud_init,
                    # checked on the very plan that is created, under the host lock
                    accept=lambda planned, topo: broker.nic_policy_error(planned, topo.nics, settings),
                )
                logger.info("composed %s for %s", vm.name, acc.owner)
            except Refused as e:
                outcomes[acc.owner] = ("rejected", bounded(str(e)))
            except (HostLockError, HypervisorTimeout):
                # Not the request's fault: the unit waits (the charm says why) and the next hook serves it.
                # Never published: the sentence names the lock holder's command line or the daemon's URI.
                raise
            except PlacementError as e:  # the remote model learns what was short, the log how much
                outcomes[acc.owner] = ("failed", broker.remote_reason(str(e)))
                logger.warning("compose for %s failed: %s", acc.owner, e)
            except (ProviderError, ValueError, RuntimeError, OSError) as e:
                outcomes[acc.owner] = ("failed", HYPERVISOR_ERROR)
                logger.warning("compose for %s failed: %s", acc.owner, e)
            except Exception as e:  # a bug hit by one request must not stop the others being served
                outcomes[acc.owner] = ("failed", INTERNAL_ERROR)
                logger.error("compose for %s failed: unexpected %s", acc.owner, _where(e))
        return outcomes
