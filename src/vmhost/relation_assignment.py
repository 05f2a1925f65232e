"""Unit assignment for the vm-allocation relation: which unit serves which accepted request.

Pure (no ops, no I/O, deterministic). With several units, each publishes its free Capacity and its
UnitResults on the peer relation; the leader assigns every accepted request to one unit (best fit);
each unit composes what is assigned to it and releases the relation VMs nobody asks for any more;
the leader merges every unit's results into one status per request for each requirer.

Just over ~400 lines on purpose: one idea (who serves what, and what each requirer is told), and the
peer data it reads is decoded here, totally and bounded, beside the rules that use it.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from vmhost.guest_access import KEY_TYPES, key_fingerprint
from vmhost.model import HostKey, VmInfo, VmRequest
from vmhost.parse import HUGEPAGE_SIZES
from vmhost.placement import HostUsage
from vmhost.relation_policy import AcceptedRequest, RelationRequests, RequestDecision, split_owner

__all__ = [
    "Assignment",
    "Capacity",
    "ComposeFailure",
    "RequestStatus",
    "UnitResult",
    "UnitWork",
    "assign",
    "merge_statuses",
    "unit_results",
    "unit_work",
    "usable_addresses",
]

logger = logging.getLogger(__name__)

RequestStatus = Literal["pending", "ready", "failed", "rejected"]
BOOTING = "VM is booting; waiting for an address"
MAX_ADDRESSES = 16  # what the interface library reads per VM
MAX_HOST_KEYS = 4
MAX_HOST_KEY = 2048  # characters of one public host key line (RSA 4096 takes about 730)


@dataclass(frozen=True)
class UnitResult:
    """What a unit reports for one owner key (published on the peer relation)."""

    status: RequestStatus
    message: str | None = None
    name: str | None = None
    mac_addresses: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    cores: int = 0
    memory: int = 0
    storage: int = 0  # bytes of disk its VM holds (the storage quota); 0 from units that predate it
    login_user: str | None = None
    host_keys: tuple[HostKey, ...] = ()

    @property
    def has_vm(self) -> bool:
        """Whether the unit holds a VM for the owner (ready, or still booting), not just a verdict."""
        return self.name is not None and self.status in ("ready", "pending")

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "name": self.name,
            "mac_addresses": list(self.mac_addresses),
            "addresses": list(self.addresses),
            "cores": self.cores,
            "memory": self.memory,
            "storage": self.storage,
            "login_user": self.login_user,
            "host_keys": [key.to_dict() for key in self.host_keys],
        }

    @classmethod
    def from_dict(cls, data: Any) -> UnitResult:
        """From what a unit published; ValueError (pydantic's) for anything else."""
        valid = _ResultData.model_validate(data)
        return cls(
            status=valid.status,
            message=valid.message,
            name=valid.name,
            mac_addresses=tuple(valid.mac_addresses or ()),
            addresses=tuple(valid.addresses or ()),
            cores=valid.cores,
            memory=valid.memory,
            storage=valid.storage,
            login_user=valid.login_user,
            host_keys=tuple(_public_host_keys(HostKey(**key.model_dump()) for key in valid.host_keys or ())),
        )


@dataclass(frozen=True)
class ComposeFailure:
    """Why a compose this unit just tried did not happen: refused by the host, or failed."""

    status: Literal["failed", "rejected"]
    message: str


# Peer data is re-read on every hook; these bound what one unit's entry can hold.
_Count = Annotated[StrictInt, Field(ge=0, le=2**62)]
_Short = Annotated[StrictStr, Field(max_length=64)]


class _HostKeyData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    algorithm: _Short
    public_key: Annotated[StrictStr, Field(max_length=MAX_HOST_KEY)]
    fingerprint: _Short


class _ResultData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: RequestStatus = "pending"
    message: StrictStr | None = Field(None, max_length=4096)
    name: _Short | None = None
    mac_addresses: list[_Short] | None = Field(None, max_length=64)
    addresses: list[_Short] | None = Field(None, max_length=64)
    cores: _Count = 0
    memory: _Count = 0
    storage: _Count = 0
    login_user: _Short | None = None
    host_keys: list[_HostKeyData] | None = Field(None, max_length=MAX_HOST_KEYS)


class _CapacityData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    threads: _Count = 0
    vcpus: _Count = 0
    memory: _Count = 0
    hugepages: dict[_Short, _Count] | None = Field(None, max_length=16)


# ---------------------------------------------------------------------------------------------
# Capacity and assignment


@dataclass(frozen=True)
class Capacity:
    """What a unit can still give, as it publishes on the peer relation."""

    threads: int = 0  # free host threads (for pinned vCPUs)
    vcpus: int = 0  # free shared vCPUs (overcommitted)
    memory: int = 0  # free general memory, bytes
    hugepages: Mapping[str, int] = field(default_factory=dict)  # free pages per size

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "vcpus": self.vcpus, "memory": self.memory, "hugepages": dict(self.hugepages)}

    @classmethod
    def from_dict(cls, data: Any) -> Capacity:
        """From what a unit published; ValueError (pydantic's) for anything else."""
        valid = _CapacityData.model_validate(data)
        pages = valid.hugepages or {}
        return cls(
            threads=valid.threads,
            vcpus=valid.vcpus,
            memory=valid.memory,
            hugepages={size: count for size, count in pages.items() if size in HUGEPAGE_SIZES},
        )

    @classmethod
    def from_usage(cls, usage: HostUsage) -> Capacity:
        """From placement's HostUsage (the same numbers the resources view shows)."""
        pages: dict[str, int] = {}
        for node in usage.nodes:
            for size in node.hugepages:
                pages[size] = pages.get(size, 0) + node.hugepages_free(size)
        return cls(
            threads=sum(len(node.free_threads) for node in usage.nodes),
            vcpus=usage.shared_vcpus_free,
            memory=usage.memory_free,
            hugepages=pages,
        )

    def _pages(self, request: VmRequest) -> tuple[str, int] | None:
        """(page size, page count) of the hugepages that would back `request`; None when none fit."""
        if request.hugepage_size:
            sizes = [request.hugepage_size]
        else:
            sizes = sorted(HUGEPAGE_SIZES, key=HUGEPAGE_SIZES.get, reverse=True)
        for size in sizes:
            count, remainder = divmod(request.memory, HUGEPAGE_SIZES[size])
            if remainder == 0 and self.hugepages.get(size, 0) >= count:
                return size, count
        return None

    def fits(self, request: VmRequest) -> bool:
        cpus = self.threads if request.pinned_cores is not None else self.vcpus
        cpus_fit = cpus >= request.cores
        memory_fits = self._pages(request) is not None if request.hugepages_backed else self.memory >= request.memory
        return cpus_fit and memory_fits

    def minus(self, request: VmRequest) -> Capacity:
        pinned = request.pinned_cores is not None
        pages = dict(self.hugepages)
        memory = self.memory
        if request.hugepages_backed:
            backing = self._pages(request)
            if backing:
                pages[backing[0]] -= backing[1]
        else:
            memory -= request.memory
        return Capacity(
            threads=self.threads - (request.cores if pinned else 0),
            vcpus=self.vcpus - (request.cores if not pinned else 0),
            memory=memory,
            hugepages=pages,
        )


@dataclass(frozen=True)
class Assignment:
    """owner -> unit for every accepted request that has one; owner -> why for those still waiting."""

    units: dict[str, str]
    waiting: dict[str, str]


def assign(
    accepted: Sequence[AcceptedRequest],
    *,
    current: Mapping[str, str],
    units: Iterable[str],
    capacities: Mapping[str, Capacity],
    located: Mapping[str, str],
    failed: Iterable[str] = (),
) -> Assignment:
    """Which unit serves each accepted request.

    A VM stays where it is (`located`); an assignment to a live unit stands unless its compose failed
    there; the rest go, in request order, to the unit with the fewest free threads (shared vCPUs for an
    unpinned VM) that still fits, ties by unit name, so big holes stay open for big VMs. When no unit
    seems to fit, the roomiest unit gets it and its placement says exactly what is short. Requests of a
    unit that left are assigned again.
    """
    retry = set(failed)
    live = sorted(set(units))
    free = {unit: capacities[unit] for unit in live if unit in capacities}
    out: dict[str, str] = {}
    for request in accepted:
        unit = located.get(request.owner)
        if unit in live:
            out[request.owner] = unit
        elif current.get(request.owner) in live and request.owner not in retry:
            unit = current[request.owner]
            out[request.owner] = unit
            if unit in free:
                free[unit] = free[unit].minus(request.request)
    waiting: dict[str, str] = {}
    for request in accepted:
        if request.owner in out:
            continue
        if not free:
            waiting[request.owner] = "waiting for the host units to publish their capacity"
            continue
        pinned = request.request.pinned_cores is not None
        cpus = {unit: free[unit].threads if pinned else free[unit].vcpus for unit in free}
        fitting = [unit for unit in free if free[unit].fits(request.request)]
        if fitting:
            best = min(fitting, key=lambda unit: (cpus[unit], unit))
        else:
            best = min(free, key=lambda unit: (-cpus[unit], -free[unit].memory, unit))
        out[request.owner] = best
        free[best] = free[best].minus(request.request)
    return Assignment(units=out, waiting=waiting)


# ---------------------------------------------------------------------------------------------
# What one unit does, and what the leader tells each requirer


@dataclass(frozen=True)
class UnitWork:
    """What one unit does in this hook: the requests it composes and the VM names it releases."""

    compose: tuple[AcceptedRequest, ...] = ()
    release: tuple[str, ...] = ()


def unit_work(
    unit: str,
    *,
    decisions: Sequence[RequestDecision],
    assignments: Mapping[str, str],
    vms: Sequence[VmInfo],
    live_apps: Iterable[str],
    held_elsewhere: Iterable[str] = (),
    unreadable_apps: Iterable[str] = (),
) -> UnitWork:
    """The requests to compose on `unit` and the VMs to release there.

    Released: a relation VM whose application is no longer related, whose request id is no longer
    listed, a second VM for one owner, or one that another unit already serves. Nothing else is touched
    (VMs made by the operator carry no relation owner key), nor the VMs of an application whose list
    cannot be read at all or is longer than the library reads (a broken write on the remote side must
    not delete its VMs).
    """
    live = set(live_apps)
    unreadable = set(unreadable_apps)
    listed = {decision.owner for decision in decisions if decision.owner}
    elsewhere = set(held_elsewhere)
    release: list[str] = []
    have: dict[str, str] = {}
    for vm in sorted(vms, key=lambda vm: vm.name):
        owner = vm.allocation.owner
        parts = split_owner(owner)
        if parts is None:
            continue
        model, app, _ = parts
        app_key = f"{model}/{app}"
        if app_key in unreadable and app_key in live:
            have.setdefault(owner, vm.name)
            continue
        if (
            app_key not in live
            or owner not in listed
            or owner in have
            or (assignments.get(owner) not in (None, unit) and owner in elsewhere)
        ):
            release.append(vm.name)
        else:
            have[owner] = vm.name
    compose = tuple(
        decision.accepted
        for decision in decisions
        if decision.accepted is not None and assignments.get(decision.owner) == unit and decision.owner not in have
    )
    return UnitWork(compose=compose, release=tuple(release))


def unit_results(
    unit: str,
    *,
    decisions: Sequence[RequestDecision],
    assignments: Mapping[str, str],
    vms: Sequence[VmInfo],
    failures: Mapping[str, ComposeFailure],
) -> dict[str, UnitResult]:
    """owner -> UnitResult for every request `unit` serves or holds a VM for.

    `failures` is owner -> ComposeFailure for the composes this unit just tried.
    """
    by_owner: dict[str, VmInfo] = {}
    for vm in sorted(vms, key=lambda vm: vm.name):
        if vm.allocation.owner and vm.allocation.owner not in by_owner:
            by_owner[vm.allocation.owner] = vm
    out: dict[str, UnitResult] = {}
    for decision in decisions:
        if decision.owner is None:
            continue
        vm = by_owner.get(decision.owner)
        if vm is not None:
            out[decision.owner] = _ready(vm, decision)
        elif decision.accepted is not None and assignments.get(decision.owner) == unit:
            failure = failures.get(decision.owner)
            if failure is not None:
                out[decision.owner] = UnitResult(status=failure.status, message=failure.message)
            else:
                out[decision.owner] = UnitResult(status="pending", message=f"being composed on {unit}")
    return out


def usable_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """The addresses another machine can reach the VM at: bare IPs, IPv4 first, in a stable order (so an
    unchanged VM publishes unchanged data), without link-local, loopback or anything unreadable."""
    found = set()
    for address in addresses:
        try:
            ip = ipaddress.ip_interface(address).ip
        except ValueError:
            continue
        if not (ip.is_link_local or ip.is_loopback or ip.is_multicast or ip.is_unspecified):
            found.add(ip)
    return tuple(str(ip) for ip in sorted(found, key=lambda ip: (ip.version, ip)))[:MAX_ADDRESSES]


def _public_host_keys(keys: Iterable[HostKey]) -> list[HostKey]:
    """Only public host keys of an allowed type, as "type base64" (no comment), with the fingerprint of
    that very key: nothing else a provider or a peer may have put there (a private half above all)
    reaches a peer or a requirer."""
    out = []
    for key in keys:
        public = " ".join(str(key.public_key).split(" ")[:2])
        try:
            fingerprint = key_fingerprint(public)
        except ValueError:
            fingerprint = None
        if fingerprint is None or key.algorithm not in KEY_TYPES or not public.startswith(f"{key.algorithm} "):
            logger.warning("a host key of type %.40r is not a public key of that type; left out", key.algorithm)
            continue
        if len(public) <= MAX_HOST_KEY:
            out.append(HostKey(key.algorithm, public, fingerprint))
    return sorted(out, key=lambda key: key.algorithm)[:MAX_HOST_KEYS]


def _ready(vm: VmInfo, decision: RequestDecision) -> UnitResult:
    """The result for a request whose VM exists here: ready once it runs and has an address another
    machine can reach, pending (saying what it waits for) until then."""
    allocation = vm.allocation
    addresses = usable_addresses(vm.addresses)
    if vm.phase != "ready":
        waiting: str | None = f"VM is {vm.phase[:32]} on the host"
    elif vm.state != "running":
        waiting = f"VM is {vm.state[:32]}; waiting for it to run"
    else:
        waiting = None if addresses else BOOTING
    note = None
    asked = decision.accepted.request if decision.accepted is not None else None
    if asked is not None and (allocation.vcpus, allocation.memory) != (asked.cores, asked.memory):
        note = "the request changed after its VM was composed; withdraw it and use a new id to get the new size"
    return UnitResult(
        status="pending" if waiting else "ready",
        message="; ".join(part for part in (waiting, note) if part) or None,
        name=vm.name,
        mac_addresses=tuple(vm.macs) or tuple(nic.mac for nic in allocation.nics if nic.mac),
        addresses=() if waiting else addresses,
        cores=allocation.vcpus,
        memory=allocation.memory,
        storage=allocation.disk_bytes,
        login_user=vm.login_user,
        host_keys=tuple(_public_host_keys(vm.host_keys)),
    )


def merge_statuses(
    relations: Sequence[RelationRequests],
    *,
    decisions: Sequence[RequestDecision],
    assignments: Mapping[str, str],
    results: Mapping[str, Mapping[str, UnitResult]],
    waiting: Mapping[str, str],
) -> dict[int, list[dict[str, Any]]]:
    """relation id -> the `vms` list for its requirer: one status per request, in request order."""
    by_relation: dict[int, list[dict[str, Any]]] = {relation.relation_id: [] for relation in relations}
    for decision in decisions:
        entry: dict[str, Any] = {"id": decision.id, "status": "pending", "message": None, "unit": None, "name": None}
        entry.update(mac_addresses=[], addresses=[], login_user=None, host_keys=[])
        unit = assignments.get(decision.owner) if decision.owner else None
        found = _result_for(decision.owner, unit, results) if decision.owner else None
        if found is not None:
            unit, result = found
            entry.update(
                status=result.status,
                message=result.message,
                unit=unit,
                name=result.name,
                mac_addresses=list(result.mac_addresses),
                addresses=list(result.addresses),
                login_user=result.login_user,
                host_keys=[key.to_dict() for key in result.host_keys],
            )
            if decision.rejected is not None:  # a VM exists but its request became invalid: keep it, say why
                entry["message"] = f"{decision.rejected}; its VM is kept until the request is withdrawn"
        elif decision.rejected is not None:
            entry.update(status="rejected", message=decision.rejected)
        elif unit is not None:
            entry.update(unit=unit, message=f"assigned to {unit}")
        else:
            entry["message"] = waiting.get(decision.owner or "", "waiting for the vm-host leader")
        by_relation.setdefault(decision.relation_id, []).append(entry)
    return by_relation


def _result_for(
    owner: str, unit: str | None, results: Mapping[str, Mapping[str, UnitResult]]
) -> tuple[str, UnitResult] | None:
    """The assigned unit's result, else any unit that holds a VM for the owner."""
    if unit is not None and owner in results.get(unit, {}):
        return unit, results[unit][owner]
    for other in sorted(results):
        result = results[other].get(owner)
        if result is not None and result.has_vm:
            return other, result
    return None
