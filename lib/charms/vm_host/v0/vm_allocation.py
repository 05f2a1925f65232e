"""Ask a vm-host application for virtual machines over the `vm_allocation` interface.

The vm-host charm provides the `vm-allocation` endpoint (it is the offerer across models); any charm
that needs VMs requires it. The requirer's leader lists what it wants in its application databag; the
provider composes, names and reports each VM in its own application databag.

Requirer app databag, key `requests` (JSON list)::

    [{"id": "web-0", "cores": 2, "memory": "4G", "pinned_cores": "auto", "hugepages_backed": false,
      "hugepage_size": null, "numa_nodes": null, "storage": "root:20", "interfaces": "eth0:space=public",
      "image": "noble", "ssh_authorized_keys": ["ssh-ed25519 AAAA..."], "user_data": "#cloud-config...",
      "tags": ["web"]}]

Provider app databag, key `vms` (JSON list), one entry per request::

    [{"id": "web-0", "status": "ready", "message": null, "unit": "vm-host/0", "name": "vm-1a2b3c4d",
      "mac_addresses": ["52:54:00:..."], "addresses": ["10.20.0.50"]}]

`status` is pending, ready, failed (the compose failed; the message says why) or rejected (the
request is invalid, over quota or against the host's network policy; the message names the field).
A request id maps to at most one VM: sending the same request again never makes a second VM, and
removing a request from the list releases its VM.

Requirer usage::

    from charms.vm_host.v0.vm_allocation import VmAllocationRequirer

    class MyCharm(ops.CharmBase):
        def __init__(self, framework):
            super().__init__(framework)
            self.vms = VmAllocationRequirer(self, "vm-host")
            framework.observe(self.vms.on.vm_ready, self._on_vm_ready)

        def _on_leader_elected(self, _):
            self.vms.request_vm("web-0", cores=2, memory="4G", interfaces="eth0:space=public")

        def _on_vm_ready(self, event):
            logger.info("VM %s is up at %s", event.name, event.addresses)

This library needs only `ops` and `pydantic`; remote data is untrusted and validated with bounds.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import ops
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

# The unique Charmhub library identifier, never change it
LIBID = "a8d68aaefd7f4dfcb59dbe522068f833"

# Increment this major API version when introducing breaking changes
LIBAPI = 0

# Increment this PATCH version before using `charmcraft publish-lib` or reset
# to 0 if you are raising the major API version
LIBPATCH = 1

PYDEPS = ["pydantic>=2"]

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_REQUESTS",
    "STATUSES",
    "ParsedRequest",
    "ProviderAppData",
    "RequirerAppData",
    "VmAllocationProvider",
    "VmAllocationRequirer",
    "VmFailedEvent",
    "VmReadyEvent",
    "VmRequestSpec",
    "VmStatus",
    "parse_requests",
    "parse_size",
]

DEFAULT_RELATION_NAME = "vm-allocation"
STATUSES = ("pending", "ready", "failed", "rejected")

# Bounds on what one remote application may send (the databag is untrusted input).
MAX_REQUESTS = 64
MAX_CORES = 256
MAX_NUMA_NODES = 64
MIN_MEMORY = 64 * 1024**2
MAX_MEMORY = 4 * 1024**4
MAX_KEYS = 32
MAX_KEY_LENGTH = 8192
MAX_USER_DATA = 64 * 1024
MAX_TAGS = 32
MAX_STORAGE_LENGTH = 512
MAX_INTERFACES_LENGTH = 1024
MAX_MESSAGE = 1024

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ID_RE = re.compile(ID_PATTERN)
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,62}$")
# Storage (`label:size(tag,...),...`) and interface (`label:key=value,...;...`) strings: only the
# characters their syntax uses, so nothing else (quotes, newlines, XML, paths) can ride along.
_STORAGE_RE = re.compile(r"^[A-Za-z0-9_.:,()-]*$")
_INTERFACES_RE = re.compile(r"^[A-Za-z0-9_.:,;=/ -]*$")
# An image is an alias the host resolves (never a path on the host).
_IMAGE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_KEY_RE = re.compile(
    r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( [^\r\n]*)?$"
)

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KIB": 1024,
    "KB": 1000,
    "M": 1024**2,
    "MIB": 1024**2,
    "MB": 1000**2,
    "G": 1024**3,
    "GIB": 1024**3,
    "GB": 1000**3,
    "T": 1024**4,
    "TIB": 1024**4,
    "TB": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*(\d{1,15})\s*([A-Za-z]{0,3})\s*$")


def parse_size(value: str | int) -> int:
    """Bytes from 8G, 512MiB, 4096 (a bare number in a string is MiB, an int is bytes).

    K/M/G/T are binary, KB/MB/GB/TB decimal: the same rules as the vm-host command line.
    """
    if isinstance(value, bool):
        raise ValueError("must be a size such as 8G or 512M, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("must be a size such as 8G or 512M")
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError("must be a size such as 8G or 512M (a whole number and a unit K, M, G or T)")
    unit = (m.group(2) or "M").upper()
    if unit not in _UNITS:
        raise ValueError(f"has unknown unit {m.group(2)!r}; allowed: K, M, G, T, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    return int(m.group(1)) * _UNITS[unit]


class VmRequestSpec(BaseModel):
    """One VM the requirer asks for. Unknown fields are ignored; absent ones are None (host defaults).

    Only the shape is checked here (types, bounds, character sets); the host parses the storage and
    interface constraints against what it has and rejects what it cannot honour, saying why.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(pattern=ID_PATTERN)
    cores: int | None = Field(None, ge=1, le=MAX_CORES)
    memory: int | None = Field(None, ge=MIN_MEMORY, le=MAX_MEMORY, description="bytes; 8G, 512M accepted")
    pinned_cores: Literal["auto"] | None = None
    hugepages_backed: bool | None = None
    hugepage_size: Literal["2M", "1G"] | None = None
    numa_nodes: int | None = Field(None, ge=1, le=MAX_NUMA_NODES, description="exactly this many host NUMA nodes")
    storage: str | None = Field(None, max_length=MAX_STORAGE_LENGTH, pattern=_STORAGE_RE.pattern)
    interfaces: str | None = Field(None, max_length=MAX_INTERFACES_LENGTH, pattern=_INTERFACES_RE.pattern)
    image: str | None = Field(None, pattern=_IMAGE_RE.pattern)
    ssh_authorized_keys: list[str] | None = Field(None, max_length=MAX_KEYS, repr=False)
    user_data: str | None = Field(None, max_length=MAX_USER_DATA, repr=False)
    tags: list[str] | None = Field(None, max_length=MAX_TAGS)

    @field_validator("cores", "numa_nodes", mode="before")
    @classmethod
    def _whole(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, bool) or (v is not None and not isinstance(v, int)):
            top = MAX_NUMA_NODES if info.field_name == "numa_nodes" else MAX_CORES
            raise ValueError(f"must be a whole number from 1 to {top}")
        return v

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)

    @field_validator("pinned_cores", mode="before")
    @classmethod
    def _pinned(cls, v: Any) -> Any:
        if v is None or v is False or v == "":
            return None
        if v is True or (isinstance(v, str) and v.lower() == "auto"):
            return "auto"
        raise ValueError("must be 'auto' or null; a remote model cannot choose host CPUs")

    @field_validator("hugepages_backed", mode="before")
    @classmethod
    def _bool(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, bool):
            raise ValueError("must be true or false")
        return v

    @field_validator("hugepage_size", mode="before")
    @classmethod
    def _hugepage_size(cls, v: Any) -> Any:
        if isinstance(v, str):
            return {"2MIB": "2M", "2048K": "2M", "1GIB": "1G", "1024M": "1G"}.get(v.upper(), v.upper())
        return v

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys(cls, v: list[str] | None) -> list[str] | None:
        for i, key in enumerate(v or ()):
            if len(key) > MAX_KEY_LENGTH or not _KEY_RE.match(key):
                raise ValueError(
                    f"entry {i} is not one OpenSSH public key line (type, base64 key, optional comment; "
                    f"at most {MAX_KEY_LENGTH} characters)"
                )
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str] | None) -> list[str] | None:
        for i, tag in enumerate(v or ()):
            if not _TAG_RE.match(tag):
                raise ValueError(f"entry {i} is not a tag; use letters, digits, '_', '.', ':', '=' or '-' (at most 63)")
        return v

    def to_databag(self) -> dict[str, Any]:
        """The JSON form, without the fields left to the host's defaults."""
        return self.model_dump(mode="json", exclude_none=True)


class RequirerAppData(BaseModel):
    """The requirer application databag. `requests` stays raw so one bad entry cannot hide the others."""

    model_config = ConfigDict(extra="ignore")

    requests: list[Any] | None = None


class VmStatus(BaseModel):
    """The provider's answer for one request."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(max_length=128)
    status: Literal["pending", "ready", "failed", "rejected"]
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    unit: str | None = None
    name: str | None = None
    mac_addresses: list[str] | None = None
    addresses: list[str] | None = None


class ProviderAppData(BaseModel):
    """The provider application databag; `error` is set when the requests list as a whole is unreadable."""

    model_config = ConfigDict(extra="ignore")

    vms: list[VmStatus] | None = None
    error: str | None = None


def _decode(value: str) -> Any:
    """json.loads that keeps an undecodable value as the raw string, so validation can name the field."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _error_sentence(e: ValidationError) -> str:
    """Field names and what is wrong; never the input values (they may hold keys or user data)."""
    parts = []
    for err in e.errors(include_input=False, include_url=False):
        loc = ".".join(str(x) for x in err.get("loc", ())) or "request"
        msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


@dataclass(frozen=True)
class ParsedRequest:
    """One entry of a requirer's `requests`: a valid spec, or the reason it is rejected.

    `id` is the entry's id when it has a usable one (so the rejection can be reported against it),
    else a placeholder `#<index>`.
    """

    index: int
    id: str
    spec: VmRequestSpec | None = None
    error: str | None = None


def parse_requests(raw: Any, max_requests: int = MAX_REQUESTS) -> tuple[list[ParsedRequest], str | None]:
    """Validate a requirer's `requests` value entry by entry; returns (entries, whole-list error).

    Entries that repeat an id with the same content are one request (a replay); an id given twice with
    different content is rejected, as is every entry past `max_requests`.
    """
    if raw is None:
        return [], None
    if not isinstance(raw, list):
        return [], "requests must be a JSON list of request objects"
    out: list[ParsedRequest] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        rid = item.get("id") if isinstance(item, dict) else None
        rid = rid if isinstance(rid, str) and _ID_RE.match(rid) else f"#{i}"
        if not isinstance(item, dict):
            out.append(ParsedRequest(i, rid, error="request must be a JSON object"))
            continue
        if rid in seen:
            first = out[seen[rid]]
            if first.spec is not None and first.spec.model_dump() == _spec_dump(item):
                continue  # the same request listed again: one request
            out[seen[rid]] = ParsedRequest(
                first.index, rid, error=f"id {rid!r} is given more than once with different contents; use one id per VM"
            )
            continue
        if len(seen) >= max_requests:
            out.append(ParsedRequest(i, rid, error=f"too many requests; at most {max_requests} per application"))
            continue
        try:
            spec = VmRequestSpec.model_validate(item)
        except ValidationError as e:
            out.append(ParsedRequest(i, rid, error=f"request {rid!r} is invalid: {_error_sentence(e)}"))
        else:
            out.append(ParsedRequest(i, rid, spec=spec))
        if not rid.startswith("#"):
            seen[rid] = len(out) - 1
    return out, None


def _spec_dump(item: dict) -> dict | None:
    try:
        return VmRequestSpec.model_validate(item).model_dump()
    except ValidationError:
        return None


class VmAllocationProvider(ops.Object):
    """The provider side: read validated requests per relation, publish their statuses (leader only)."""

    def __init__(self, charm: ops.CharmBase, relation_name: str = DEFAULT_RELATION_NAME):
        super().__init__(charm, f"{relation_name}-provider")
        self._charm = charm
        self.relation_name = relation_name

    @property
    def relations(self) -> list[ops.Relation]:
        return list(self._charm.model.relations.get(self.relation_name, ()))

    def requests(self, relation: ops.Relation) -> tuple[list[ParsedRequest], str | None]:
        """The remote application's requests, each valid or rejected with the field it is wrong in."""
        if relation.app is None:
            return [], None
        try:
            data = relation.load(RequirerAppData, relation.app, decoder=_decode)
        except ValidationError:
            return [], "requests must be a JSON list of request objects"
        return parse_requests(data.requests)

    def remote_model_uuid(self, relation: ops.Relation) -> str:
        """The remote application's model (this model for a local relation or a Juju older than 3.6.2)."""
        try:
            return relation.remote_model.uuid
        except (ops.ModelError, KeyError, AttributeError):
            return self._charm.model.uuid

    def publish(self, relation: ops.Relation, statuses: Iterable[VmStatus], error: str | None = None) -> None:
        """Write the statuses; only the leader may write the application databag (a Juju rule)."""
        if not self._charm.unit.is_leader():
            return
        relation.save(ProviderAppData(vms=list(statuses), error=error), self._charm.app)

    def published(self, relation: ops.Relation) -> list[VmStatus]:
        """What this application last published on `relation` (empty when unreadable)."""
        try:
            return relation.load(ProviderAppData, self._charm.app).vms or []
        except (ValidationError, ValueError, ops.ModelError):
            return []


class VmReadyEvent(ops.RelationEvent):
    """A requested VM became ready: `request_id`, `name`, `unit`, `addresses`, `mac_addresses`."""

    def __init__(self, handle: ops.Handle, relation: ops.Relation, status: dict | None = None, **kwargs: Any):
        super().__init__(handle, relation, **kwargs)
        self.status = status or {}

    def snapshot(self) -> dict[str, Any]:
        snap = super().snapshot()
        snap["status"] = self.status
        return snap

    def restore(self, snapshot: dict[str, Any]) -> None:
        super().restore(snapshot)
        self.status = snapshot.get("status") or {}

    @property
    def request_id(self) -> str:
        return self.status.get("id", "")

    @property
    def name(self) -> str | None:
        return self.status.get("name")

    @property
    def message(self) -> str | None:
        return self.status.get("message")

    @property
    def addresses(self) -> list[str]:
        return list(self.status.get("addresses") or ())

    @property
    def mac_addresses(self) -> list[str]:
        return list(self.status.get("mac_addresses") or ())


class VmFailedEvent(VmReadyEvent):
    """A request failed or was rejected; `message` says why, `rejected` tells the two apart."""

    @property
    def rejected(self) -> bool:
        return self.status.get("status") == "rejected"


class VmAllocationRequirerEvents(ops.ObjectEvents):
    vm_ready = ops.EventSource(VmReadyEvent)
    vm_failed = ops.EventSource(VmFailedEvent)


class VmAllocationRequirer(ops.Object):
    """The requirer side: ask for VMs (leader), withdraw them, read their status; events on change."""

    on = VmAllocationRequirerEvents()  # type: ignore[reportAssignmentType]
    _stored = ops.StoredState()

    def __init__(self, charm: ops.CharmBase, relation_name: str = DEFAULT_RELATION_NAME):
        super().__init__(charm, f"{relation_name}-requirer")
        self._charm = charm
        self.relation_name = relation_name
        self._stored.set_default(seen={})
        charm.framework.observe(charm.on[relation_name].relation_changed, self._on_changed)
        charm.framework.observe(charm.on[relation_name].relation_broken, self._on_broken)

    def _relation(self, relation: ops.Relation | None) -> ops.Relation:
        if relation is not None:
            return relation
        rel = self._charm.model.get_relation(self.relation_name)
        if rel is None:
            raise RuntimeError(f"no {self.relation_name} relation; relate this application to vm-host first")
        return rel

    def requests(self, relation: ops.Relation | None = None) -> list[VmRequestSpec]:
        """The requests this application has made (invalid entries, if any were written, are skipped)."""
        rel = self._relation(relation)
        data = rel.load(RequirerAppData, self._charm.app, decoder=_decode)
        return [p.spec for p in parse_requests(data.requests, max_requests=10**6)[0] if p.spec is not None]

    def _write(self, rel: ops.Relation, specs: list[VmRequestSpec]) -> None:
        if not self._charm.unit.is_leader():
            raise RuntimeError("only the leader unit can change VM requests (they live in the application databag)")
        rel.data[self._charm.app]["requests"] = json.dumps([s.to_databag() for s in specs])

    def request_vm(
        self,
        id: str,
        *,
        cores: int | None = None,
        memory: str | int | None = None,
        pinned_cores: str | None = None,
        hugepages_backed: bool | None = None,
        hugepage_size: str | None = None,
        numa_nodes: int | None = None,
        storage: str | None = None,
        interfaces: str | None = None,
        image: str | None = None,
        ssh_authorized_keys: list[str] | None = None,
        user_data: str | None = None,
        tags: list[str] | None = None,
        relation: ops.Relation | None = None,
    ) -> VmRequestSpec:
        """Add (or change) the request `id`. Idempotent: asking again with the same values changes nothing.

        Raises pydantic.ValidationError when a value is out of bounds, RuntimeError when not the leader.
        """
        spec = VmRequestSpec.model_validate(
            {
                "id": id,
                "cores": cores,
                "memory": memory,
                "pinned_cores": pinned_cores,
                "hugepages_backed": hugepages_backed,
                "hugepage_size": hugepage_size,
                "numa_nodes": numa_nodes,
                "storage": storage,
                "interfaces": interfaces,
                "image": image,
                "ssh_authorized_keys": ssh_authorized_keys,
                "user_data": user_data,
                "tags": tags,
            }
        )
        rel = self._relation(relation)
        specs = self.requests(rel)
        if any(s == spec for s in specs):
            return spec
        if any(s.id == id for s in specs):
            self._write(rel, [spec if s.id == id else s for s in specs])
        elif len(specs) >= MAX_REQUESTS:
            raise ValueError(f"at most {MAX_REQUESTS} requests per application; withdraw one first")
        else:
            self._write(rel, [*specs, spec])
        return spec

    def withdraw(self, id: str, relation: ops.Relation | None = None) -> bool:
        """Remove the request `id`; the provider then releases its VM. Returns whether it was there."""
        rel = self._relation(relation)
        specs = self.requests(rel)
        kept = [s for s in specs if s.id != id]
        if len(kept) != len(specs):
            self._write(rel, kept)
        return len(kept) != len(specs)

    def statuses(self, relation: ops.Relation | None = None) -> dict[str, VmStatus]:
        """The provider's answer per request id (a request it has not answered yet is absent)."""
        rel = self._relation(relation)
        if rel.app is None:
            return {}
        try:
            data = rel.load(ProviderAppData, rel.app, decoder=_decode)
        except ValidationError:
            logger.warning("vm-host published statuses this library cannot read on relation %d", rel.id)
            return {}
        return {s.id: s for s in data.vms or ()}

    def vm(self, id: str, relation: ops.Relation | None = None) -> VmStatus | None:
        return self.statuses(relation).get(id)

    def _on_changed(self, event: ops.RelationChangedEvent) -> None:
        current = self.statuses(event.relation)
        key = str(event.relation.id)
        seen = dict(self._stored.seen.get(key, {}))
        for rid, st in sorted(current.items()):
            if seen.get(rid) == st.status:
                continue
            if st.status == "ready":
                self.on.vm_ready.emit(event.relation, status=st.model_dump(mode="json"))
            elif st.status in ("failed", "rejected"):
                self.on.vm_failed.emit(event.relation, status=st.model_dump(mode="json"))
        self._stored.seen[key] = {rid: st.status for rid, st in current.items()}

    def _on_broken(self, event: ops.RelationBrokenEvent) -> None:
        self._stored.seen.pop(str(event.relation.id), None)
