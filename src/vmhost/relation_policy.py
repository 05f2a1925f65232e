"""Request policy for the vm-allocation relation: which remote requests this host serves, and how.

Pure (no ops, no I/O, deterministic). A request is checked field by field against the operator's
RelationSettings (networks, space bridges, images), named and owned by the host, then counted against
its application's quota. The owner key `model-uuid/app/request-id` a VM carries is what makes replays
find the VM they already made (docs/design.md §7). Which unit serves an accepted request is
vmhost.relation_assignment's business; vmhost.relation.decide() drives both.

Over 400 lines on purpose: it is one idea (is a remote request served, and as what), and its rules
(names, networks, images, quotas, what a remote model is told) read best side by side.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vmhost.cloudinit import check_user_data as check_seed_user_data
from vmhost.guest_access import check_authorized_keys, check_user_data
from vmhost.model import Allocation, CloudInit, Nic, Quota, VmRequest
from vmhost.parse import (
    DEFAULT_ROOT_DISK,
    InterfaceSpec,
    ParseError,
    disk_gigabytes,
    format_size,
    parse_interfaces,
    parse_storage,
)
from vmhost.simplestreams import StreamError, parse_image_name

__all__ = [
    "DEFAULT_RELATION_IMAGE",
    "AcceptedRequest",
    "Binding",
    "HeldVm",
    "IncomingRequest",
    "Quota",
    "RelationRequests",
    "RelationSettings",
    "RequestDecision",
    "RequestRejected",
    "build_request",
    "first_few",
    "judge_requests",
    "nic_policy_error",
    "owner_key",
    "remote_image_ok",
    "remote_reason",
    "split_owner",
    "vm_name",
]

FEW = 3  # how many items of a list a message names before "and N more"
# What a remote model may name as its image: `<os>:<alias>` on the operator's image server (ubuntu:24.04,
# ubuntu:noble), never a file or a local name on the host; a request that names none gets relation-image.
DEFAULT_RELATION_IMAGE = "ubuntu:24.04"
MAX_IMAGE_NAME = 64
IMAGE_REJECTION = (
    "image must be <os>:<alias> from the host's image server, such as ubuntu:24.04 or ubuntu:noble "
    f"(lower-case letters, digits, '.', '_', '-'; at most {MAX_IMAGE_NAME} characters), "
    "or left out for the host's default"
)
_OWNER_RE = re.compile(r"^(?P<model>[A-Za-z0-9-]{1,64})/(?P<app>[a-z][a-z0-9-]{0,62})/(?P<id>[a-z0-9][a-z0-9-]{0,62})$")


# ---------------------------------------------------------------------------------------------
# Owners, names, settings


def owner_key(model_uuid: str, app: str, request_id: str) -> str:
    """The key a relation VM carries: unique across models, apps and requests."""
    return f"{model_uuid}/{app}/{request_id}"


def split_owner(owner: str | None) -> tuple[str, str, str] | None:
    """(model uuid, app, request id) of a relation owner key; None for VMs made any other way."""
    match = _OWNER_RE.match(owner or "")
    return (match["model"], match["app"], match["id"]) if match else None


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
        for subnet in self.subnets:
            try:
                network = ipaddress.ip_network(subnet, strict=False)
            except ValueError:
                continue
            if network.num_addresses > 1:
                subnets.append(str(network))
        return InterfaceSpec(label, subnet=tuple(subnets)) if subnets else None


@dataclass(frozen=True)
class RelationSettings:
    """The operator's relation policy, as plain values the charm builds from its config: per-app
    quota, networks VMs may join, space -> bridge, the vm-allocation binding (where requests
    that name no network go) and the image a request that names none boots from (relation-image)."""

    quota: Quota = field(default_factory=Quota)
    allowed_networks: tuple[str, ...] = ()
    space_bridges: Mapping[str, str] = field(default_factory=dict)
    binding: Binding = field(default_factory=Binding)
    image: str = DEFAULT_RELATION_IMAGE


# ---------------------------------------------------------------------------------------------
# Inputs and outcomes


@dataclass(frozen=True)
class IncomingRequest:
    """One entry of a requirer's list, already shape-checked by the interface library."""

    id: str
    spec: Mapping[str, Any] | None = None  # the library's VmRequestSpec as a dict
    error: str | None = None


@dataclass(frozen=True)
class RelationRequests:
    """The requests of one related application. `app_key` is `model-uuid/app`; `error` says why its list
    is not served as written (unreadable, or too long), and then none of its VMs is released."""

    relation_id: int
    model_uuid: str
    app: str
    requests: tuple[IncomingRequest, ...] = ()
    error: str | None = None

    @property
    def app_key(self) -> str:
        return f"{self.model_uuid}/{self.app}"


@dataclass(frozen=True)
class AcceptedRequest:
    """A request the host will serve: the VmRequest (named, owned) and how the VM boots: from `image`
    with the seed `cloud_init` (left out of repr: its user-data may hold the requirer's secrets)."""

    owner: str
    request: VmRequest
    cloud_init: CloudInit = field(repr=False)
    image: str | None = None

    @property
    def boot(self) -> str:
        return "image" if self.image else "network"


@dataclass(frozen=True)
class RequestDecision:
    """The verdict on one listed request: accepted (with what to compose) or rejected (with why).
    `owner` is None for an entry without a usable id, which can never own a VM."""

    relation_id: int
    id: str
    owner: str | None
    accepted: AcceptedRequest | None = None
    rejected: str | None = None


@dataclass(frozen=True)
class HeldVm:
    """A VM that already exists for an owner: which unit has it and what it takes (for quotas)."""

    unit: str
    cores: int
    memory: int
    storage: int = 0


class RequestRejected(ValueError):
    """A request the host will not serve; the message names the field and what is allowed."""


# ---------------------------------------------------------------------------------------------
# Validation against the host's policy


def _map_interface(wanted: InterfaceSpec, settings: RelationSettings) -> InterfaceSpec:
    """space=X onto the bridge space-bridges names for X (several spaces: they must agree).

    The hypervisor knows no Juju spaces and Juju never tells a charm its binding's space name, so
    space-bridges is the only place a space name can resolve; any other is refused here, before
    placement would fail on it with a vaguer message.
    """
    bridges = {settings.space_bridges[space] for space in wanted.space if space in settings.space_bridges}
    if not bridges:
        if wanted.space:
            asked = first_few(wanted.space)
            raise RequestRejected(
                f"interfaces: {wanted.label} asks for space {asked}, which this host does not offer; leave "
                "space out to get the network the vm-allocation endpoint is bound to"
            )
        return wanted
    if len(bridges) > 1:
        raise RequestRejected(f"interfaces: {wanted.label} asks for spaces that are on different host networks")
    bridge = bridges.pop()
    if wanted.name is not None and wanted.name != bridge:
        raise RequestRejected(
            f"interfaces: {wanted.label} names host interface {wanted.name} but its space is on another one"
        )
    return replace(wanted, space=(), name=bridge)


def _allowed_by_name(name: str, settings: RelationSettings) -> bool:
    """Listed by name, or the bridge of a listed space (space-bridges)."""
    allowed = set(settings.allowed_networks)
    return name in allowed or any(
        space in allowed and bridge == name for space, bridge in settings.space_bridges.items()
    )


def build_request(spec: Mapping[str, Any], *, owner: str, settings: RelationSettings) -> AcceptedRequest:
    """The VmRequest and cloud-init for one shape-checked spec; raises RequestRejected naming the field.

    The VM boots from the image the request names (or the operator's relation-image) with a seed of
    its host-chosen name, the requirer's SSH keys and its user-data, passed on as opaque text.
    """
    image = spec.get("image")
    if image is not None and not remote_image_ok(image):
        raise RequestRejected(IMAGE_REJECTION)
    try:
        keys = check_authorized_keys(spec.get("ssh_authorized_keys"))
        user_data = check_user_data(spec.get("user_data"))
        if user_data is not None:
            check_seed_user_data(user_data)  # what the seed can merge or carry, judged now, not at compose
    except ValueError as e:  # ParseError, or the seed's one-sentence refusal (it never echoes the text)
        raise RequestRejected(str(e)) from None
    try:
        storage = parse_storage(spec.get("storage"))
    except ParseError as e:
        raise RequestRejected(f"storage: {e}") from None
    try:
        specs = parse_interfaces(spec.get("interfaces"))
    except ParseError as e:
        raise RequestRejected(f"interfaces: {e}") from None
    if not specs and settings.binding.spec("eth0") is not None:
        specs = (InterfaceSpec("eth0"),)  # a VM without a NIC is of no use to a remote model
    interfaces = []
    for wanted in specs:
        if wanted == InterfaceSpec(wanted.label) and (bound := settings.binding.spec(wanted.label)) is not None:
            # allowed-networks is checked once placed (nic_policy_error): only then is it known
            # whether a bound port attaches through its bridge, and which addresses that carries.
            interfaces.append(bound)
            continue
        mapped = _map_interface(wanted, settings)
        if settings.allowed_networks and mapped.name is not None and not _allowed_by_name(mapped.name, settings):
            raise RequestRejected(not_allowed(wanted.label))
        interfaces.append(mapped)
    name = vm_name(owner)
    try:
        request = VmRequest.from_dict(
            {
                # Unset: VmRequest's defaults, the same as the action's and the CLI's.
                "cores": spec.get("cores"),
                "memory": spec.get("memory"),
                "pinned_cores": spec.get("pinned_cores"),
                "hugepages_backed": bool(spec.get("hugepages_backed")),
                "hugepage_size": spec.get("hugepage_size"),
                "numa_nodes": spec.get("numa_nodes"),
                "storage": storage,
                "interfaces": tuple(interfaces),
                "name": name,
                "owner": owner,
            }
        )
    except ParseError as e:
        raise RequestRejected(str(e)) from None
    cloud_init = CloudInit(hostname=name, ssh_authorized_keys=keys, user_data=user_data)
    return AcceptedRequest(owner=owner, request=request, cloud_init=cloud_init, image=image or settings.image)


def remote_image_ok(image: Any) -> bool:
    """Whether a remote model may ask for `image`: `<os>:<alias>` only, never a path or a host-local name
    (docs/design.md §7: no raw hypervisor input passes through; on libvirt a path would upload a host
    file as the root disk)."""
    if not isinstance(image, str) or len(image) > MAX_IMAGE_NAME:
        return False
    try:
        parse_image_name(image)  # the one image-name rule (simplestreams), capped shorter for remote models
    except StreamError:
        return False
    return True


def _inside(addresses: Sequence[str], cidrs: Sequence[ipaddress._BaseNetwork]) -> list[bool]:
    """For each readable address, whether it lies in one of `cidrs`."""
    out = []
    for address in addresses:
        try:
            ip = ipaddress.ip_interface(address).ip
        except ValueError:
            continue
        out.append(any(ip.version == net.version and ip in net for net in cidrs))
    return out


def nic_policy_error(allocation: Allocation, *, host_nics: Sequence[Nic], settings: RelationSettings) -> str | None:
    """Why a planned VM's NICs break allowed-networks (None when they do not, or no list is set).

    A NIC is allowed when its host parent is listed by name, by the Juju space it serves, through a
    space-bridges entry whose space is listed, or by a listed CIDR holding one of its addresses.
    """
    if not settings.allowed_networks:
        return None
    by_name = {host_nic.name: host_nic for host_nic in host_nics}
    cidrs = []
    for allowed in settings.allowed_networks:
        if "/" in allowed:
            try:
                cidrs.append(ipaddress.ip_network(allowed, strict=False))
            except ValueError:
                continue
    for nic in allocation.nics:
        host_nic = by_name.get(nic.parent)
        spaces = [host_nic.space] if host_nic and host_nic.space else []
        if _allowed_by_name(nic.parent, settings) or any(space in settings.allowed_networks for space in spaces):
            continue
        vm_inside = _inside(((nic.ip,) if nic.ip else ()) + tuple(nic.more_ips), cidrs)
        if any(_inside(host_nic.addresses if host_nic else (), cidrs)) or (vm_inside and all(vm_inside)):
            continue  # the host's side is allowed, or every address the VM gets there is
        return not_allowed(nic.label)
    return None


def not_allowed(label: str) -> str:
    """A NIC the operator's allowed-networks keeps out, told without the host's network names or the list."""
    return f"interfaces: {label} would attach to a host network this host does not offer to remote models"


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
        match = pattern.match(placement_error)
        if match:
            return "the host cannot place this VM now: " + short.format(**match.groupdict())
    return "the host cannot place this VM now"


# ---------------------------------------------------------------------------------------------
# Every request of every relation, quotas included


@dataclass(frozen=True)
class _QuotaUse:
    """What one application's VMs take so far, against its quota."""

    vms: int = 0
    cores: int = 0
    memory: int = 0
    storage: int = 0

    def plus(self, cores: int, memory: int, storage: int) -> _QuotaUse:
        return _QuotaUse(self.vms + 1, self.cores + cores, self.memory + memory, self.storage + storage)

    def overrun(self, quota: Quota, cores: int, memory: int, storage: int) -> str | None:
        """Why one more VM of this size breaks the quota; None when it fits."""
        if quota.vms is not None and self.vms + 1 > quota.vms:
            return f"over quota: {self.vms} of {quota.vms} VMs in use (relation-quota vms={quota.vms})"
        if quota.cores is not None and self.cores + cores > quota.cores:
            left = max(0, quota.cores - self.cores)
            return f"over quota: needs {cores} cores, {left} of {quota.cores} left (relation-quota cores={quota.cores})"
        if quota.memory is not None and self.memory + memory > quota.memory:
            left = format_size(max(0, quota.memory - self.memory))
            total = format_size(quota.memory)
            return f"over quota: needs {format_size(memory)} memory, {left} of {total} left (relation-quota memory)"
        if quota.storage is not None and self.storage + storage > quota.storage:
            left, total = disk_gigabytes(max(0, quota.storage - self.storage)), disk_gigabytes(quota.storage)
            return (
                f"over quota: needs {disk_gigabytes(storage)} of disk, {left} of {total} left (relation-quota storage)"
            )
        return None


def request_storage(request: VmRequest) -> int:
    """The disk a request takes: its disks, or the default root disk placement gives one that names none."""
    return sum(disk.size for disk in request.storage or (DEFAULT_ROOT_DISK,))


def _judge_one(relation: RelationRequests, incoming: IncomingRequest, settings: RelationSettings) -> RequestDecision:
    """The verdict on one request by its own fields (quotas come after)."""
    # An entry without a usable id ("#3") cannot own a VM; one with an id keeps its VM, if any.
    owner = None if incoming.id.startswith("#") else owner_key(relation.model_uuid, relation.app, incoming.id)
    verdict = RequestDecision(relation.relation_id, incoming.id, owner)
    if incoming.error is not None or incoming.spec is None or owner is None:
        return replace(verdict, rejected=incoming.error or "request is invalid")
    if split_owner(owner) is None:  # a VM whose owner key reads back as no relation's could never be released
        return replace(
            verdict,
            owner=None,
            rejected=f"request {incoming.id!r}: the application name is longer than the 63 characters a "
            "vm-host owner key holds; relate an application with a shorter name",
        )
    try:
        return replace(verdict, accepted=build_request(incoming.spec, owner=owner, settings=settings))
    except RequestRejected as e:
        return replace(verdict, rejected=f"request {incoming.id!r}: {e}")


def judge_requests(
    relations: Sequence[RelationRequests],
    *,
    settings: RelationSettings,
    held: Mapping[str, HeldVm],
    assigned: Collection[str] = (),
) -> list[RequestDecision]:
    """Accept or reject every request of every relation, quotas included.

    A quota is per application, across all its relations (a requirer charm may relate several of its
    endpoints to this host), and an id one relation of an application lists is rejected on its others,
    so one owner key never stands for two requests. VMs that exist and are kept count first (the listed
    ones; all of an application whose list has an `error`, as none of them is released), so a new request
    can never push an existing VM over quota; then those the leader already `assigned` to a unit (that unit
    may have made the VM and not published it yet, so a reordered list cannot slip a new request in beside
    it); then new requests, in the order listed.
    """
    ordered = sorted(relations, key=lambda relation: relation.relation_id)
    judged: list[tuple[RelationRequests, RequestDecision]] = []
    claimed: set[str] = set()
    for relation in ordered:
        for incoming in relation.requests:
            verdict = _judge_one(relation, incoming, settings)
            if verdict.owner in claimed:
                verdict = replace(
                    verdict,
                    owner=None,
                    accepted=None,
                    rejected=f"request {verdict.id!r}: {relation.app} lists this id on another of its "
                    "relations to this host; use one id per VM",
                )
            elif verdict.owner:
                claimed.add(verdict.owner)
            judged.append((relation, verdict))
    # An application whose list is not served as written keeps all its VMs (none is released), so all count.
    keeps_all = {relation.app_key for relation in ordered if relation.error}
    uses: dict[str, _QuotaUse] = {}
    for owner, vm in held.items():
        parts = split_owner(owner)
        app_key = f"{parts[0]}/{parts[1]}" if parts else ""
        if owner in claimed or app_key in keeps_all:
            uses[app_key] = uses.get(app_key, _QuotaUse()).plus(vm.cores, vm.memory, vm.storage)
    out = [verdict for _, verdict in judged]
    for i in sorted(range(len(judged)), key=lambda i: judged[i][1].owner not in assigned):
        relation, verdict = judged[i]
        if verdict.accepted is None or verdict.owner in held:
            continue
        request = verdict.accepted.request
        use = uses.get(relation.app_key, _QuotaUse())
        storage = request_storage(request)
        overrun = use.overrun(settings.quota, request.cores, request.memory, storage)
        if overrun:
            rejected = f"request {verdict.id!r}: {overrun} for {relation.app}"
            out[i] = replace(verdict, accepted=None, rejected=rejected)
            continue
        uses[relation.app_key] = use.plus(request.cores, request.memory, storage)
    return out
