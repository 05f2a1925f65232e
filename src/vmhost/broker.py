"""Decisions for the vm-allocation relation: what to compose, what to release, what to tell whom.

Pure (no ops, no I/O, deterministic): the charm glue gathers the requests of every relation, the VMs
on this host and what the peers published, calls these functions, and carries out the answer. Every
input is recomputed on each reconcile (the hypervisor is the database, DESIGN.md §3): a VM carries
its owner key `model-uuid/app/request-id`, so a replayed hook finds the VM it already made and never
makes a second one, and a VM whose request is gone is released.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from vmhost.model import Allocation, CloudInit, Nic, Quota, VmRequest
from vmhost.parse import HUGEPAGE_SIZES, InterfaceSpec, ParseError, format_size, parse_interfaces, parse_storage

__all__ = [
    "Accepted",
    "Binding",
    "Capacity",
    "Decision",
    "Incoming",
    "RelationInput",
    "Result",
    "Settings",
    "assign",
    "evaluate",
    "first_few",
    "merge_statuses",
    "nic_policy_error",
    "owner_key",
    "remote_reason",
    "split_owner",
    "unit_actions",
    "unit_results",
    "vm_name",
]

DEFAULT_CORES = 1
DEFAULT_MEMORY = 1024**3
FEW = 3  # how many items of a list a message names before "and N more"
IMAGE_REJECTION = (
    "image must be a name of an image in the host's image directory "
    "(letters, digits, '.', '_', ':', '-'; no '/' and no '..')"
)
_OWNER_RE = re.compile(r"^(?P<model>[A-Za-z0-9-]{1,64})/(?P<app>[a-z][a-z0-9-]{0,62})/(?P<id>[a-z0-9][a-z0-9-]{0,62})$")


# ---------------------------------------------------------------------------------------------
# Owners, names, settings


def owner_key(model_uuid: str, app: str, request_id: str) -> str:
    """The key a relation VM carries: unique across models, apps and requests."""
    return f"{model_uuid}/{app}/{request_id}"


def split_owner(owner: str | None) -> tuple[str, str, str] | None:
    """(model uuid, app, request id) of a relation owner key; None for VMs made any other way."""
    m = _OWNER_RE.match(owner or "")
    return (m["model"], m["app"], m["id"]) if m else None


def first_few(items: Sequence[str], few: int = FEW) -> str:
    """A list as "a, b, c and 17 more": remote lists are unbounded, and a status message has a size limit."""
    items = list(items)
    if len(items) <= few:
        return ", ".join(items)
    return f"{', '.join(items[:few])} and {len(items) - few} more"


def vm_name(owner: str) -> str:
    """The VM name for an owner: chosen by the host (never the remote), stable across replays."""
    return "vm-" + hashlib.sha256(owner.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Binding:
    """The host interfaces and subnets carrying the `vm-allocation` endpoint's Juju binding.

    Juju never tells a charm the NAME of the space an endpoint is bound to, only which interfaces
    and subnets carry it, so `juju deploy vm-host --bind vm-allocation=public` is how the operator
    says where VMs go when a request names no network. `interfaces` lists the interface holding the
    bind address first (Juju's order).
    """

    interfaces: tuple[str, ...] = ()
    subnets: tuple[str, ...] = ()

    def spec(self, label: str) -> InterfaceSpec | None:
        """The interface a request that names no network gets; None when Juju said nothing usable.

        By name (placement attaches through the bridge when that interface is a bridge port); else
        by subnet, ignoring single-address "subnets" (Juju leaves the CIDR out sometimes, LP #1864102).
        """
        if self.interfaces:
            return InterfaceSpec(label, name=self.interfaces[0])
        subnets = []
        for s in self.subnets:
            try:
                net = ipaddress.ip_network(s, strict=False)
            except ValueError:
                continue
            if net.num_addresses > 1:
                subnets.append(str(net))
        return InterfaceSpec(label, subnet=tuple(subnets)) if subnets else None


@dataclass(frozen=True)
class Settings:
    """The operator's relation policy: per-app quota, networks VMs may join, space -> bridge, and
    the vm-allocation binding (where requests that name no network go)."""

    quota: Quota = field(default_factory=Quota)
    allowed_networks: tuple[str, ...] = ()
    space_bridges: Mapping[str, str] = field(default_factory=dict)
    binding: Binding = field(default_factory=Binding)


# ---------------------------------------------------------------------------------------------
# Inputs and outcomes


@dataclass(frozen=True)
class Incoming:
    """One entry of a requirer's list, already shape-checked by the interface library."""

    id: str
    spec: Mapping[str, Any] | None = None  # the library's VmRequestSpec as a dict
    error: str | None = None


@dataclass(frozen=True)
class RelationInput:
    """The requests of one related application. `app_key` is `model-uuid/app`; `error` says why its list
    is not served as written (unreadable, or too long), and then none of its VMs is released."""

    relation_id: int
    model_uuid: str
    app: str
    requests: tuple[Incoming, ...] = ()
    error: str | None = None

    @property
    def app_key(self) -> str:
        return f"{self.model_uuid}/{self.app}"


@dataclass(frozen=True)
class Accepted:
    """A request the host will serve: the VmRequest (named, owned) and how the VM boots."""

    owner: str
    request: VmRequest
    cloud_init: CloudInit
    image: str | None = None

    @property
    def boot(self) -> str:
        return "image" if self.image else "network"


@dataclass(frozen=True)
class Decision:
    relation_id: int
    id: str
    owner: str | None
    accepted: Accepted | None = None
    rejected: str | None = None


@dataclass(frozen=True)
class Result:
    """What a unit reports for one owner key (published on the peer relation)."""

    status: str  # pending | ready | failed | rejected
    message: str | None = None
    name: str | None = None
    mac_addresses: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    cores: int = 0
    memory: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "name": self.name,
            "mac_addresses": list(self.mac_addresses),
            "addresses": list(self.addresses),
            "cores": self.cores,
            "memory": self.memory,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Result:
        """From what a unit published; ValueError (pydantic's) for anything else."""
        v = _ResultData.model_validate(d)
        return cls(
            status=v.status,
            message=v.message,
            name=v.name,
            mac_addresses=tuple(v.mac_addresses or ()),
            addresses=tuple(v.addresses or ()),
            cores=v.cores,
            memory=v.memory,
        )


# Peer data is re-read on every hook; these bound what one unit's entry can hold.
_Count = Annotated[StrictInt, Field(ge=0, le=2**62)]
_Short = Annotated[StrictStr, Field(max_length=64)]


class _ResultData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: Literal["pending", "ready", "failed", "rejected"] = "pending"
    message: StrictStr | None = Field(None, max_length=4096)
    name: _Short | None = None
    mac_addresses: list[_Short] | None = Field(None, max_length=64)
    addresses: list[_Short] | None = Field(None, max_length=64)
    cores: _Count = 0
    memory: _Count = 0


class _CapacityData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    threads: _Count = 0
    vcpus: _Count = 0
    memory: _Count = 0
    hugepages: dict[_Short, _Count] | None = Field(None, max_length=16)


class Rejected(ValueError):
    """A request the host will not serve; the message names the field and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Validation against the host's policy


def _map_interface(s: InterfaceSpec, settings: Settings) -> InterfaceSpec:
    """space=X onto the bridge space-bridges names for X (several spaces: they must agree).

    The hypervisor knows no Juju spaces and Juju never tells a charm its binding's space name, so
    space-bridges is the only place a space name can resolve; any other is refused here, before
    placement would fail on it with a vaguer message.
    """
    bridges = {settings.space_bridges[sp] for sp in s.space if sp in settings.space_bridges}
    if not bridges:
        if s.space:
            known = first_few(sorted(settings.space_bridges)) or "none"
            asked = first_few(s.space)
            raise Rejected(
                f"interfaces: {s.label} asks for space {asked}, which this host does not know "
                f"(spaces in its space-bridges: {known}); leave space out to get the network "
                f"the vm-allocation endpoint is bound to"
            )
        return s
    if len(bridges) > 1:
        raise Rejected(f"interfaces: {s.label} asks for spaces on different bridges ({first_few(sorted(bridges))})")
    bridge = bridges.pop()
    if s.name is not None and s.name != bridge:
        raise Rejected(f"interfaces: {s.label} names host interface {s.name} but its space is on bridge {bridge}")
    return replace(s, space=(), name=bridge)


def _allowed_by_name(name: str, settings: Settings) -> bool:
    """Listed by name, or the bridge of a listed space (space-bridges)."""
    allowed = set(settings.allowed_networks)
    return name in allowed or any(sp in allowed and br == name for sp, br in settings.space_bridges.items())


def build_request(spec: Mapping[str, Any], owner: str, settings: Settings) -> Accepted:
    """The VmRequest and cloud-init for one shape-checked spec; raises Rejected naming the field."""
    image = spec.get("image")
    if image is not None and not _bare_name(image):
        raise Rejected(IMAGE_REJECTION)
    try:
        storage = parse_storage(spec.get("storage"))
    except ParseError as e:
        raise Rejected(f"storage: {e}") from None
    try:
        specs = parse_interfaces(spec.get("interfaces"))
    except ParseError as e:
        raise Rejected(f"interfaces: {e}") from None
    if not specs and settings.binding.spec("eth0") is not None:
        specs = (InterfaceSpec("eth0"),)  # a VM without a NIC is of no use to a remote model
    interfaces = []
    for s in specs:
        if s == InterfaceSpec(s.label) and (bound := settings.binding.spec(s.label)) is not None:
            # allowed-networks is checked once placed (nic_policy_error): only then is it known
            # whether a bound port attaches through its bridge, and which addresses that carries.
            interfaces.append(bound)
            continue
        mapped = _map_interface(s, settings)
        if settings.allowed_networks and mapped.name is not None and not _allowed_by_name(mapped.name, settings):
            raise Rejected(
                f"interfaces: {s.label} would attach to {mapped.name}, which is not in allowed-networks "
                f"({first_few(settings.allowed_networks)})"
            )
        interfaces.append(mapped)
    name = vm_name(owner)
    try:
        request = VmRequest.from_dict(
            {
                "cores": spec.get("cores") or DEFAULT_CORES,
                "memory": spec.get("memory") or DEFAULT_MEMORY,
                "pinned_cores": spec.get("pinned_cores"),
                "hugepages_backed": bool(spec.get("hugepages_backed")),
                "hugepage_size": spec.get("hugepage_size"),
                "storage": storage,
                "interfaces": tuple(interfaces),
                "name": name,
                "owner": owner,
            }
        )
    except ParseError as e:
        raise Rejected(str(e)) from None
    ci = CloudInit(
        hostname=name,
        ssh_authorized_keys=tuple(spec.get("ssh_authorized_keys") or ()),
        user_data=spec.get("user_data"),
    )
    return Accepted(owner=owner, request=request, cloud_init=ci, image=image)


def _bare_name(image: Any) -> bool:
    """A name the host looks up in its own image directory, never a path (DESIGN.md §7: no raw
    hypervisor input passes through; on libvirt a path would upload a host file as the root disk)."""
    return isinstance(image, str) and bool(image) and "/" not in image and "\\" not in image and ".." not in image


def nic_policy_error(allocation: Allocation, host_nics: Sequence[Nic], settings: Settings) -> str | None:
    """Why a planned VM's NICs break allowed-networks (None when they do not, or no list is set).

    A NIC is allowed when its host parent is listed by name, by the Juju space it serves, through a
    space-bridges entry whose space is listed, or by a listed CIDR holding one of its addresses.
    """
    if not settings.allowed_networks:
        return None
    by_name = {n.name: n for n in host_nics}
    cidrs = []
    for a in settings.allowed_networks:
        if "/" in a:
            try:
                cidrs.append(ipaddress.ip_network(a, strict=False))
            except ValueError:
                continue
    for nic in allocation.nics:
        host_nic = by_name.get(nic.parent)
        spaces = [host_nic.space] if host_nic and host_nic.space else []
        if _allowed_by_name(nic.parent, settings) or any(s in settings.allowed_networks for s in spaces):
            continue
        addrs = []
        for a in (host_nic.addresses if host_nic else ()) + ((nic.ip,) if nic.ip else ()):
            try:
                addrs.append(ipaddress.ip_interface(a).ip)
            except ValueError:
                continue
        if any(ip.version == net.version and ip in net for ip in addrs for net in cidrs):
            continue
        return (
            f"interfaces: {nic.label} would attach to {nic.parent}, which is not in allowed-networks "
            f"({first_few(settings.allowed_networks)})"
        )
    return None


# What a remote model is told when placement fails: the resource that was short, from the first words
# of placement's message (rule 7 names the resource first), never the host's free amounts or topology.
_LABEL = r"[A-Za-z0-9_.-]{1,32}"
_SHORTAGES = (
    (re.compile(r"pinned cpus?\b"), "not enough pinned threads"),
    (re.compile(r"shared vCPUs\b"), "not enough shared vCPUs"),
    (re.compile(r"hugepages (?P<size>1G|2M)\b"), "not enough {size} hugepages"),
    (
        re.compile(r"memory \S+ is not a whole number of (?P<size>1G|2M) hugepages"),
        "memory is not a whole number of {size} hugepages",
    ),
    (re.compile(r"memory\b"), "not enough memory"),
    (re.compile(r"no even split over NUMA nodes\b"), "no set of NUMA nodes has room for its CPUs and memory together"),
    (re.compile(rf"disk (?P<label>{_LABEL}):"), "disk {label}: not enough storage"),
    (re.compile(rf"interface (?P<label>{_LABEL}): sriov\b"), "interface {label}: no free SR-IOV VF"),
    (re.compile(rf"interface (?P<label>{_LABEL}):"), "interface {label}: no host network matches it"),
    (re.compile(r"sriov\b"), "not enough free SR-IOV VFs"),
)


def remote_reason(placement_error: str) -> str:
    """The sentence a requirer gets for a placement failure (the operator's log keeps the detail)."""
    for pattern, short in _SHORTAGES:
        m = pattern.match(placement_error)
        if m:
            return "the host cannot place this VM now: " + short.format(**m.groupdict())
    return "the host cannot place this VM now"


@dataclass(frozen=True)
class Held:
    """A VM that already exists for an owner: where it is and what it takes (for quotas)."""

    unit: str
    cores: int
    memory: int


def evaluate(relations: Sequence[RelationInput], settings: Settings, held: Mapping[str, Held]) -> list[Decision]:
    """Accept or reject every request of every relation, quotas included.

    VMs that already exist count first, so a new request can never push an existing VM over quota;
    then new requests count in the order the requirer listed them.
    """
    out: list[Decision] = []
    for rel in sorted(relations, key=lambda r: r.relation_id):
        built: list[Decision] = []
        for inc in rel.requests:
            # An entry without a usable id ("#3") cannot own a VM; one with an id keeps its VM, if any.
            owner = None if inc.id.startswith("#") else owner_key(rel.model_uuid, rel.app, inc.id)
            if inc.error is not None or inc.spec is None or owner is None:
                built.append(Decision(rel.relation_id, inc.id, owner, rejected=inc.error or "request is invalid"))
                continue
            try:
                built.append(
                    Decision(rel.relation_id, inc.id, owner, accepted=build_request(inc.spec, owner, settings))
                )
            except Rejected as e:
                built.append(Decision(rel.relation_id, inc.id, owner, rejected=f"request {inc.id!r}: {e}"))
        present = {d.owner for d in built if d.owner}
        used = [0, 0, 0]  # vms, cores, memory of existing VMs of this app
        for owner, h in held.items():
            if owner in present:
                used = [used[0] + 1, used[1] + h.cores, used[2] + h.memory]
        for d in built:
            if d.accepted is None or d.owner in held:
                out.append(d)
                continue
            r = d.accepted.request
            over = _over_quota(settings.quota, used, r.cores, r.memory)
            if over:
                out.append(replace(d, accepted=None, rejected=f"request {d.id!r}: {over} for {rel.app}"))
                continue
            used = [used[0] + 1, used[1] + r.cores, used[2] + r.memory]
            out.append(d)
    return out


def _over_quota(q: Quota, used: list[int], cores: int, memory: int) -> str | None:
    if q.vms is not None and used[0] + 1 > q.vms:
        return f"over quota: {used[0]} of {q.vms} VMs in use (relation-quota vms={q.vms})"
    if q.cores is not None and used[1] + cores > q.cores:
        return f"over quota: needs {cores} cores, {max(0, q.cores - used[1])} of {q.cores} left (relation-quota cores={q.cores})"
    if q.memory is not None and used[2] + memory > q.memory:
        left = format_size(max(0, q.memory - used[2]))
        return f"over quota: needs {format_size(memory)} memory, {left} of {format_size(q.memory)} left (relation-quota memory)"
    return None


# ---------------------------------------------------------------------------------------------
# Several units: capacity and assignment


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
    def from_dict(cls, d: Any) -> Capacity:
        """From what a unit published; ValueError (pydantic's) for anything else."""
        v = _CapacityData.model_validate(d)
        hp = v.hugepages or {}
        return cls(
            threads=v.threads,
            vcpus=v.vcpus,
            memory=v.memory,
            hugepages={k: n for k, n in hp.items() if k in HUGEPAGE_SIZES},
        )

    @classmethod
    def from_usage(cls, usage: Any) -> Capacity:
        """From placement's HostUsage (the same numbers the resources view shows)."""
        pages: dict[str, int] = {}
        for n in usage.nodes:
            for size in n.hugepages:
                pages[size] = pages.get(size, 0) + n.hugepages_free(size)
        return cls(
            threads=sum(len(n.free_threads) for n in usage.nodes),
            vcpus=usage.shared_vcpus_free,
            memory=usage.memory_free,
            hugepages=pages,
        )

    def _pages(self, r: VmRequest) -> tuple[str, int] | None:
        sizes = [r.hugepage_size] if r.hugepage_size else sorted(HUGEPAGE_SIZES, key=HUGEPAGE_SIZES.get, reverse=True)
        for s in sizes:
            if r.memory % HUGEPAGE_SIZES[s] == 0 and self.hugepages.get(s, 0) >= r.memory // HUGEPAGE_SIZES[s]:
                return s, r.memory // HUGEPAGE_SIZES[s]
        return None

    def fits(self, r: VmRequest) -> bool:
        cpu_ok = self.threads >= r.cores if r.pinned_cores is not None else self.vcpus >= r.cores
        mem_ok = self._pages(r) is not None if r.hugepages_backed else self.memory >= r.memory
        return cpu_ok and mem_ok

    def minus(self, r: VmRequest) -> Capacity:
        pinned = r.pinned_cores is not None
        pages = dict(self.hugepages)
        memory = self.memory
        if r.hugepages_backed:
            hp = self._pages(r)
            if hp:
                pages[hp[0]] -= hp[1]
        else:
            memory -= r.memory
        return Capacity(
            threads=self.threads - (r.cores if pinned else 0),
            vcpus=self.vcpus - (r.cores if not pinned else 0),
            memory=memory,
            hugepages=pages,
        )


def assign(
    accepted: Sequence[Accepted],
    current: Mapping[str, str],
    units: Iterable[str],
    capacities: Mapping[str, Capacity],
    located: Mapping[str, str],
    failed: Iterable[str] = (),
) -> tuple[dict[str, str], dict[str, str]]:
    """(owner -> unit, owner -> why unassigned) for every accepted request.

    A VM stays where it is; an assignment to a live unit stands unless its compose failed there; the
    rest go, in request order, to the unit with the fewest free threads (shared vCPUs for an unpinned
    VM) that still fits, ties by unit name, so big holes stay open for big VMs. When no unit seems to
    fit, the roomiest unit gets it and its placement says exactly what is short. Requests of a unit
    that left are assigned again.
    """
    retry = set(failed)
    live = sorted(set(units))
    free = {u: capacities[u] for u in live if u in capacities}
    out: dict[str, str] = {}
    for a in accepted:
        unit = located.get(a.owner)
        if unit in live:
            out[a.owner] = unit
        elif current.get(a.owner) in live and a.owner not in retry:
            out[a.owner] = current[a.owner]
            if out[a.owner] in free:
                free[out[a.owner]] = free[out[a.owner]].minus(a.request)
    waiting: dict[str, str] = {}
    for a in accepted:
        if a.owner in out:
            continue
        if not free:
            waiting[a.owner] = "waiting for the host units to publish their capacity"
            continue
        pinned = a.request.pinned_cores is not None
        cpus = {u: free[u].threads if pinned else free[u].vcpus for u in free}
        fitting = [u for u in free if free[u].fits(a.request)]
        if fitting:
            best = min(fitting, key=lambda u: (cpus[u], u))
        else:
            best = min(free, key=lambda u: (-cpus[u], -free[u].memory, u))
        out[a.owner] = best
        free[best] = free[best].minus(a.request)
    return out, waiting


# ---------------------------------------------------------------------------------------------
# What one unit does, and what the leader tells each requirer


def unit_actions(
    me: str,
    decisions: Sequence[Decision],
    assignments: Mapping[str, str],
    vms: Sequence[Any],
    live_apps: Iterable[str],
    ready_elsewhere: Iterable[str] = (),
    unreadable_apps: Iterable[str] = (),
) -> tuple[list[Accepted], list[str]]:
    """(requests to compose here, VM names to release here).

    Released: a relation VM whose application is no longer related, whose request id is no longer
    listed, a second VM for one owner, or one that another unit already serves. Nothing else is touched
    (VMs made by the operator carry no relation owner key), nor the VMs of an application whose list
    cannot be read at all or is longer than the library reads (a broken write on the remote side must
    not delete its VMs).
    """
    live = set(live_apps)
    unreadable = set(unreadable_apps)
    listed = {d.owner for d in decisions if d.owner}
    elsewhere = set(ready_elsewhere)
    release: list[str] = []
    have: dict[str, str] = {}
    for vm in sorted(vms, key=lambda v: v.name):
        owner = vm.allocation.owner
        parts = split_owner(owner)
        if parts is None:
            continue
        model, app, _ = parts
        if f"{model}/{app}" in unreadable and f"{model}/{app}" in live:
            have.setdefault(owner, vm.name)
            continue
        if (
            f"{model}/{app}" not in live
            or owner not in listed
            or owner in have
            or (assignments.get(owner) not in (None, me) and owner in elsewhere)
        ):
            release.append(vm.name)
        else:
            have[owner] = vm.name
    compose = [
        d.accepted
        for d in decisions
        if d.accepted is not None and assignments.get(d.owner) == me and d.owner not in have
    ]
    return compose, release


def unit_results(
    me: str,
    decisions: Sequence[Decision],
    assignments: Mapping[str, str],
    vms: Sequence[Any],
    outcomes: Mapping[str, tuple[str, str]],
) -> dict[str, Result]:
    """owner -> Result for every request this unit serves or holds a VM for.

    `outcomes` is owner -> (failed | rejected, why) for the composes this unit just tried.
    """
    by_owner = {}
    for vm in sorted(vms, key=lambda v: v.name):
        if vm.allocation.owner and vm.allocation.owner not in by_owner:
            by_owner[vm.allocation.owner] = vm
    out: dict[str, Result] = {}
    for d in decisions:
        if d.owner is None:
            continue
        vm = by_owner.get(d.owner)
        if vm is not None:
            a = vm.allocation
            note = None
            if d.accepted is not None and (a.vcpus, a.memory) != (d.accepted.request.cores, d.accepted.request.memory):
                note = "the request changed after its VM was composed; withdraw it and use a new id to get the new size"
            out[d.owner] = Result(
                status="ready",
                message=note,
                name=vm.name,
                mac_addresses=tuple(vm.macs) or tuple(n.mac for n in a.nics if n.mac),
                addresses=tuple(n.ip for n in a.nics if n.ip),
                cores=a.vcpus,
                memory=a.memory,
            )
        elif d.accepted is not None and assignments.get(d.owner) == me:
            if d.owner in outcomes:
                status, why = outcomes[d.owner]
                out[d.owner] = Result(status=status, message=why)
            else:
                out[d.owner] = Result(status="pending", message=f"being composed on {me}")
    return out


def merge_statuses(
    relations: Sequence[RelationInput],
    decisions: Sequence[Decision],
    assignments: Mapping[str, str],
    results: Mapping[str, Mapping[str, Result]],
    waiting: Mapping[str, str],
) -> dict[int, list[dict[str, Any]]]:
    """relation id -> the `vms` list for its requirer: one status per request, in request order."""
    by_rel: dict[int, list[dict[str, Any]]] = {r.relation_id: [] for r in relations}
    for d in decisions:
        entry: dict[str, Any] = {"id": d.id, "status": "pending", "message": None, "unit": None, "name": None}
        entry.update(mac_addresses=[], addresses=[])
        unit = assignments.get(d.owner) if d.owner else None
        found = _result_for(d.owner, unit, results) if d.owner else None
        if found is not None:
            unit, res = found
            entry.update(
                status=res.status,
                message=res.message,
                unit=unit,
                name=res.name,
                mac_addresses=list(res.mac_addresses),
                addresses=list(res.addresses),
            )
            if d.rejected is not None:  # a VM exists but its request became invalid: keep it, say why
                entry["message"] = f"{d.rejected}; its VM is kept until the request is withdrawn"
        elif d.rejected is not None:
            entry.update(status="rejected", message=d.rejected)
        elif unit is not None:
            entry.update(unit=unit, message=f"assigned to {unit}")
        else:
            entry["message"] = waiting.get(d.owner or "", "waiting for the vm-host leader")
        by_rel.setdefault(d.relation_id, []).append(entry)
    return by_rel


def _result_for(owner: str, unit: str | None, results: Mapping[str, Mapping[str, Result]]) -> tuple[str, Result] | None:
    """The assigned unit's result, else any unit that holds a ready VM for the owner."""
    if unit is not None and owner in results.get(unit, {}):
        return unit, results[unit][owner]
    for u in sorted(results):
        r = results[u].get(owner)
        if r is not None and r.status == "ready":
            return u, r
    return None
