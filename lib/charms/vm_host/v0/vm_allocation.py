"""Ask a vm-host application for virtual machines over the `vm_allocation` interface.

The vm-host charm provides the `vm-allocation` endpoint (it is the offerer across models); any charm
that needs VMs requires it. The requirer's leader lists what it wants in its application databag; the
provider composes, names and reports each VM in its own application databag.

Requirer app databag, key `requests` (JSON list)::

    [{"id": "web-0", "cores": 2, "memory": "4G", "pinned_cores": "auto", "hugepages_backed": false,
      "hugepage_size": null, "numa_nodes": null, "storage": "root:20", "interfaces": "eth0:space=public",
      "image": "ubuntu:24.04", "ssh_authorized_keys": ["ssh-ed25519 AAAA..."], "user_data": "#cloud-config...",
      "tags": ["web"]}]

`image` is `<os>:<alias>` on the host's image server (absent: the host operator's default image);
`ssh_authorized_keys` are what the VM's login user accepts; `user_data` reaches cloud-init in the VM
as it is (the host never logs or reports it).

Provider app databag, key `vms` (JSON list), one entry per request::

    [{"id": "web-0", "status": "ready", "message": null, "unit": "vm-host/0", "name": "vm-1a2b3c4d",
      "mac_addresses": ["52:54:00:..."], "addresses": ["10.20.0.50"], "login_user": "ubuntu",
      "host_keys": [{"algorithm": "ssh-ed25519", "public_key": "ssh-ed25519 AAAA...",
                     "fingerprint": "SHA256:..."}]}]

`status` is pending (being composed, or booting: no address yet; the message says which), ready (it
runs and has an address: log in as `login_user` with one of your keys, and pin one of `host_keys`),
failed (the compose failed; the message says why) or rejected (the request is invalid, over quota or
against the host's policy; the message names the field). A request id maps to at most one VM: sending
the same request again never makes a second VM, and removing a request from the list releases its VM.

Events, each fired once per change (the library remembers what it last saw in the unit's stored state,
so a replayed hook fires nothing): `vm_ready` when a VM is first ready, `vm_changed` when an address,
MAC, login user or host key of a ready VM changes, `vm_released` when a VM that was ready goes away
(its request withdrawn or failed, the relation removed, or it is made again on another vm-host unit:
then `vm_ready` follows for the new machine), `vm_failed` when a request fails or is
rejected. Each carries `request_id`, `name`, `host_unit` (the vm-host unit serving it), `addresses`,
`mac_addresses`, `login_user` and `host_keys` (`VmHostKey`: `public_key`, `fingerprint`).

Requirer usage::

    import logging

    import ops

    from charms.vm_host.v0.vm_allocation import VmAllocationRequirer

    logger = logging.getLogger(__name__)
    MY_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop"


    class MyCharm(ops.CharmBase):
        def __init__(self, framework):
            super().__init__(framework)
            self.vms = VmAllocationRequirer(self, "vm-host")
            framework.observe(self.on["vm-host"].relation_created, self._on_related)
            framework.observe(self.vms.on.vm_ready, self._on_vm_ready)
            framework.observe(self.vms.on.vm_changed, self._on_vm_ready)
            framework.observe(self.vms.on.vm_released, self._on_vm_released)

        def _on_related(self, event):
            if self.unit.is_leader():
                self.vms.request_vm(
                    "web-0", cores=2, memory="4G", image="ubuntu:24.04", ssh_authorized_keys=[MY_KEY]
                )

        def _on_vm_ready(self, event):
            address = event.addresses[0]  # a ready VM has at least one
            fingerprints = ", ".join(key.fingerprint for key in event.host_keys)
            logger.info("VM %s: ssh %s@%s (host keys %s)", event.name, event.login_user, address, fingerprints)
            self.unit.status = ops.ActiveStatus(f"{event.request_id}: ssh {event.login_user}@{address}")

        def _on_vm_released(self, event):
            self.unit.status = ops.WaitingStatus(f"{event.request_id} was released")

This library needs only `ops` (2.17 or later) and `pydantic` (2.x); remote data is untrusted and validated with bounds.

Over ~400 lines on purpose: a charm library is one file by Charmhub's rules (fetched with
`charmcraft fetch-lib`), holding both sides of the interface and their total decoding.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import ops
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The unique Charmhub library identifier, never change it
LIBID = "a8d68aaefd7f4dfcb59dbe522068f833"

# Increment this major API version when introducing breaking changes
LIBAPI = 0

# Increment this PATCH version before using `charmcraft publish-lib` or reset
# to 0 if you are raising the major API version
LIBPATCH = 4

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
    "VmChangedEvent",
    "VmEvent",
    "VmFailedEvent",
    "VmHostKey",
    "VmReadyEvent",
    "VmReleasedEvent",
    "VmRequestSpec",
    "VmStatus",
    "decode_json",
    "parse_requests",
    "parse_size",
    "parse_statuses",
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
MAX_INTERFACES = 16
MAX_ADDRESSES = 16  # per VM, as the provider publishes them
MAX_HOST_KEYS = 4
MAX_HOST_KEY_LENGTH = 2048
# One databag value (`requests`, `vms`) is refused unread past this size, and its JSON past this depth
# (a request is 3 levels deep); the requirer side never writes more.
MAX_FIELD_BYTES = 1024 * 1024
MAX_DEPTH = 16

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
_ID_RE = re.compile(ID_PATTERN)
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=-]{0,62}$")
# Storage (`label:size(tag,...),...`) and interface (`label:key=value,...;...`) strings: only the
# characters their syntax uses, so nothing else (quotes, newlines, XML, paths) can ride along.
_STORAGE_RE = re.compile(r"^[A-Za-z0-9_.:,()-]*$")
_INTERFACES_RE = re.compile(r"^[A-Za-z0-9_.:,;=/ -]*$")
# An image is `<os>:<alias>` on the host's image server (never a path or a file on the host).
MAX_IMAGE_LENGTH = 64
_IMAGE_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}:[a-z0-9]+(?:[._-][a-z0-9]+)*$")
# Key types OpenSSH accepts by default (no DSA); the host checks each key down to its wire format.
_KEY_TYPES = r"ssh-(rsa|ed25519)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com"
_KEY_RE = re.compile(rf"^({_KEY_TYPES}) [A-Za-z0-9+/]+={{0,2}}( [\x20-\x7e]*)?$")
_HOST_KEY_RE = re.compile(rf"^({_KEY_TYPES}) [A-Za-z0-9+/]+={{0,2}}$")
_FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

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


def _is_text(value: str) -> bool:
    """Whether `value` can be written out as UTF-8 and carries no NUL (JSON allows both)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return "\x00" not in value


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
    image: str | None = Field(None, max_length=MAX_IMAGE_LENGTH)
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

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and not _IMAGE_RE.fullmatch(v):
            raise ValueError(
                "must be <os>:<alias> from the host's image server, such as ubuntu:24.04 or ubuntu:noble "
                "(lower-case letters, digits, '.', '_', '-'), or left out for the host's default"
            )
        return v

    @field_validator("user_data")
    @classmethod
    def _user_data(cls, v: str | None) -> str | None:
        if v is not None and not _is_text(v):
            raise ValueError("must be UTF-8 text without NUL characters")
        if v is not None and len(v.encode("utf-8")) > MAX_USER_DATA:
            raise ValueError(f"must be at most {MAX_USER_DATA} bytes of UTF-8")
        return v

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys(cls, v: list[str] | None) -> list[str] | None:
        for i, key in enumerate(v or ()):
            if len(key) > MAX_KEY_LENGTH or not _KEY_RE.fullmatch(key) or not _is_text(key):
                raise ValueError(
                    f"entry {i} is not one OpenSSH public key line (type, base64 key, optional comment; "
                    f"at most {MAX_KEY_LENGTH} characters; types ssh-ed25519, ecdsa-sha2-nistp256/384/521, "
                    "ssh-rsa, sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com)"
                )
        return v

    @field_validator("interfaces")
    @classmethod
    def _interface_count(cls, v: str | None) -> str | None:
        if v is not None and v.count(";") >= MAX_INTERFACES:
            raise ValueError(f"lists more than {MAX_INTERFACES} interfaces (separated by ';')")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str] | None) -> list[str] | None:
        for i, tag in enumerate(v or ()):
            if not _TAG_RE.fullmatch(tag):
                raise ValueError(f"entry {i} is not a tag; use letters, digits, '_', '.', ':', '=' or '-' (at most 63)")
        return v

    def to_databag(self) -> dict[str, Any]:
        """The JSON form, without the fields left to the host's defaults."""
        return self.model_dump(mode="json", exclude_none=True)


class RequirerAppData(BaseModel):
    """The requirer application databag. `requests` stays raw so one bad entry cannot hide the others."""

    model_config = ConfigDict(extra="ignore")

    requests: list[Any] | None = None


def _ip(value: str) -> str:
    """A bare IP address, as the provider publishes it (nothing a shell or ssh would read otherwise)."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("is not an IP address") from None


def _mac(value: str) -> str:
    if not _MAC_RE.fullmatch(value):
        raise ValueError("is not a MAC address")
    return value.lower()


_Address = Annotated[str, Field(max_length=64), AfterValidator(_ip)]
_Mac = Annotated[str, Field(max_length=32), AfterValidator(_mac)]


class VmHostKey(BaseModel):
    """One SSH host public key of a VM (vm-host generated it), so a client pins it instead of trusting
    first use. Only a public key line of a known type passes, and its fingerprint must be that key's."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    algorithm: str = Field(max_length=64)
    public_key: str = Field(max_length=MAX_HOST_KEY_LENGTH, pattern=_HOST_KEY_RE.pattern)
    fingerprint: str = Field(pattern=_FINGERPRINT_RE.pattern)

    @model_validator(mode="after")
    def _consistent(self) -> VmHostKey:
        kind, _, encoded = self.public_key.partition(" ")
        if kind != self.algorithm:
            raise ValueError("public_key is not of the key's algorithm")
        try:
            blob = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("public_key is not base64") from None
        if self.fingerprint != "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("="):
            raise ValueError("fingerprint is not the public key's")
        return self

    def known_hosts_line(self, *hosts: str) -> str:
        """The line for ~/.ssh/known_hosts that pins this key for `hosts` (addresses or names)."""
        return f"{','.join(hosts)} {self.public_key}"


class VmStatus(BaseModel):
    """The provider's answer for one request; every field bounded (the provider is remote to the requirer)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    status: Literal["pending", "ready", "failed", "rejected"]
    message: str | None = Field(None, max_length=MAX_MESSAGE)
    unit: str | None = Field(None, max_length=128)
    name: str | None = Field(None, max_length=64)
    mac_addresses: list[_Mac] | None = Field(None, max_length=MAX_INTERFACES)
    addresses: list[_Address] | None = Field(None, max_length=MAX_ADDRESSES)
    login_user: str | None = Field(None, max_length=32, pattern=_USER_RE.pattern)
    host_keys: list[VmHostKey] | None = Field(None, max_length=MAX_HOST_KEYS)

    @property
    def usable(self) -> bool:
        """Ready with a name and an address: what `vm_ready` waits for (an older provider may say ready sooner)."""
        return self.status == "ready" and bool(self.name) and bool(self.addresses)


class ProviderAppData(BaseModel):
    """The provider application databag; `error` is set when the requests list as a whole is not served
    as written (unreadable, or longer than MAX_REQUESTS)."""

    model_config = ConfigDict(extra="ignore")

    vms: list[VmStatus] | None = Field(None, max_length=MAX_REQUESTS)
    error: str | None = Field(None, max_length=MAX_MESSAGE)


def decode_json(value: Any, limit: int = MAX_FIELD_BYTES) -> Any:
    """JSON from a databag value, totally: anything unusable is a ValueError with one bounded sentence.

    The size is checked before decoding and the depth after (iteratively), so no remote value can
    make a hook spend unbounded time or memory or hit Python's recursion limit later on.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("is not a string")
    if len(value) > limit:
        raise ValueError(f"is {len(value)} characters long; at most {limit} are read")
    try:
        decoded = json.loads(value)
    except RecursionError:
        raise ValueError(f"is nested too deeply; at most {MAX_DEPTH} levels") from None
    except ValueError:  # JSONDecodeError, and integers too long to convert
        raise ValueError("is not valid JSON") from None
    stack = [(decoded, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise ValueError(f"is nested too deeply; at most {MAX_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return decoded


def _error_sentence(e: ValidationError, few: int = 3) -> str:
    """Field names and what is wrong (the first few); never the input values (they may hold keys or
    user data)."""
    errors = e.errors(include_input=False, include_url=False)
    parts = []
    for err in errors[:few]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "request"
        msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = f"; and {len(errors) - few} more" if len(errors) > few else ""
    return "; ".join(parts)[:MAX_MESSAGE] + more


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
    different content is rejected. Only the first `max_requests` entries are read: a longer list gets
    one whole-list error instead of a status per entry, so what the provider publishes stays bounded.
    """
    if raw is None:
        return [], None
    if not isinstance(raw, list):
        return [], "requests must be a JSON list of request objects"
    out: list[ParsedRequest] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw[:max_requests]):
        rid = item.get("id") if isinstance(item, dict) else None
        rid = rid if isinstance(rid, str) and _ID_RE.fullmatch(rid) else f"#{i}"
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
        try:
            spec = VmRequestSpec.model_validate(item)
        except ValidationError as e:
            out.append(ParsedRequest(i, rid, error=f"request {rid!r} is invalid: {_error_sentence(e)}"))
        else:
            out.append(ParsedRequest(i, rid, spec=spec))
        if not rid.startswith("#"):
            seen[rid] = len(out) - 1
    if len(raw) > max_requests:
        return out, (
            f"too many requests: {len(raw)} entries, at most {max_requests} per application; "
            f"the first {max_requests} are served, the rest are rejected"
        )
    return out, None


def parse_statuses(raw: Any) -> dict[str, VmStatus]:
    """The provider's statuses by request id: each readable entry of the first MAX_REQUESTS (an entry
    this library cannot read is left out, so one bad entry hides no other)."""
    if not isinstance(raw, list):
        return {}
    out: dict[str, VmStatus] = {}
    for item in raw[:MAX_REQUESTS]:
        try:
            status = VmStatus.model_validate(item)
        except ValidationError:
            continue
        out.setdefault(status.id, status)
    return out


def _requirer_data(databag: Any) -> RequirerAppData:
    """The requirer application databag, decoded totally (by hand: `Relation.load` is only in ops 2.23+)."""
    return RequirerAppData.model_validate({"requests": decode_json(databag.get("requests"))})


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
            data = _requirer_data(relation.data[relation.app])
        except ValidationError:
            return [], "requests must be a JSON list of request objects"
        except ValueError as e:  # decode_json's own sentence
            return [], f"requests {e}"
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
        data = ProviderAppData(vms=list(statuses)[:MAX_REQUESTS], error=error).model_dump(mode="json")
        relation.data[self._charm.app].update({key: json.dumps(value) for key, value in sorted(data.items())})

    def published(self, relation: ops.Relation) -> list[VmStatus]:
        """What this application last published on `relation` (empty when unreadable)."""
        try:
            return list(parse_statuses(decode_json(relation.data[self._charm.app].get("vms"))).values())
        except (ValueError, ops.ModelError):
            return []


class VmEvent(ops.RelationEvent):
    """A change to one requested VM. `host_unit` is the vm-host unit serving it (ops' own `unit` is the
    remote unit whose data changed, usually None for application data)."""

    def __init__(
        self,
        handle: ops.Handle,
        relation: ops.Relation,
        status: dict | None = None,
        previous: dict | None = None,
        **kwargs: Any,
    ):
        super().__init__(handle, relation, **kwargs)
        self.status = status or {}
        self.previous = previous or {}

    def snapshot(self) -> dict[str, Any]:
        snap = super().snapshot()
        snap["status"] = self.status
        snap["previous"] = self.previous
        return snap

    def restore(self, snapshot: dict[str, Any]) -> None:
        super().restore(snapshot)
        self.status = snapshot.get("status") or {}
        self.previous = snapshot.get("previous") or {}

    @property
    def request_id(self) -> str:
        return self.status.get("id", "")

    @property
    def name(self) -> str | None:
        return self.status.get("name")

    @property
    def host_unit(self) -> str | None:
        return self.status.get("unit")

    @property
    def message(self) -> str | None:
        return self.status.get("message")

    @property
    def addresses(self) -> list[str]:
        return list(self.status.get("addresses") or ())

    @property
    def mac_addresses(self) -> list[str]:
        return list(self.status.get("mac_addresses") or ())

    @property
    def login_user(self) -> str | None:
        return self.status.get("login_user")

    @property
    def host_keys(self) -> list[VmHostKey]:
        return _host_keys(self.status)


class VmReadyEvent(VmEvent):
    """A requested VM runs and has an address: log in as `login_user` at one of `addresses`, pinning `host_keys`."""


class VmChangedEvent(VmEvent):
    """A ready VM's addresses, MACs, login user or host keys changed; `previous_*` are what they were."""

    @property
    def previous_addresses(self) -> list[str]:
        return list(self.previous.get("addresses") or ())

    @property
    def previous_mac_addresses(self) -> list[str]:
        return list(self.previous.get("mac_addresses") or ())

    @property
    def previous_host_keys(self) -> list[VmHostKey]:
        return _host_keys(self.previous)


class VmReleasedEvent(VmEvent):
    """A VM that was ready is gone (withdrawn, failed, made again on another unit, or the relation removed);
    its fields are the last seen."""


class VmFailedEvent(VmEvent):
    """A request failed or was rejected; `message` says why, `rejected` tells the two apart."""

    @property
    def rejected(self) -> bool:
        return self.status.get("status") == "rejected"


def _host_keys(status: dict) -> list[VmHostKey]:
    out = []
    for key in status.get("host_keys") or ():
        try:
            out.append(VmHostKey.model_validate(key))
        except ValidationError:
            continue
    return out


def _view(status: VmStatus) -> dict[str, Any]:
    """What a ready VM is, for the events and for noticing a change (order-free lists, no message)."""
    view = status.model_dump(mode="json", exclude={"message"})
    view["addresses"] = sorted(view["addresses"] or ())
    view["mac_addresses"] = sorted(view["mac_addresses"] or ())
    view["host_keys"] = sorted(view["host_keys"] or (), key=lambda key: key["public_key"])
    return view


class VmAllocationRequirerEvents(ops.ObjectEvents):
    vm_ready = ops.EventSource(VmReadyEvent)
    vm_changed = ops.EventSource(VmChangedEvent)
    vm_released = ops.EventSource(VmReleasedEvent)
    vm_failed = ops.EventSource(VmFailedEvent)


class VmAllocationRequirer(ops.Object):
    """The requirer side: ask for VMs (leader), withdraw them, read their status; events on change."""

    on = VmAllocationRequirerEvents()  # type: ignore[reportAssignmentType]
    _stored = ops.StoredState()

    def __init__(self, charm: ops.CharmBase, relation_name: str = DEFAULT_RELATION_NAME):
        super().__init__(charm, f"{relation_name}-requirer")
        self._charm = charm
        self.relation_name = relation_name
        self._stored.set_default(seen={}, known={})
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
        """The requests this application has made (invalid entries, if any were written, are skipped).

        Leader only (Juju lets only the leader read its application databag): RuntimeError otherwise.
        """
        self._check_leader()
        rel = self._relation(relation)
        try:
            data = _requirer_data(rel.data[self._charm.app])
        except ValueError:  # only this application writes it, so only a bug gets here: start afresh
            logger.warning("this application's own VM requests on relation %d are unreadable", rel.id)
            return []
        return [p.spec for p in parse_requests(data.requests)[0] if p.spec is not None]

    def _check_leader(self) -> None:
        if not self._charm.unit.is_leader():
            raise RuntimeError(
                "only the leader unit can read or change VM requests (they live in the application databag)"
            )

    def _write(self, rel: ops.Relation, specs: list[VmRequestSpec]) -> None:
        self._check_leader()
        encoded = json.dumps([s.to_databag() for s in specs])
        if len(encoded) > MAX_FIELD_BYTES:
            raise ValueError(
                f"the requests would take {len(encoded)} bytes; vm-host reads at most {MAX_FIELD_BYTES}: "
                "use shorter user_data or fewer keys"
            )
        rel.data[self._charm.app]["requests"] = encoded

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

        Raises pydantic.ValidationError when a value is out of bounds, ValueError when the list would
        be too long or too big, RuntimeError when not the leader or not related.
        """
        self._check_leader()
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
        self._check_leader()
        rel = self._relation(relation)
        specs = self.requests(rel)
        kept = [s for s in specs if s.id != id]
        if len(kept) != len(specs):
            self._write(rel, kept)
        return len(kept) != len(specs)

    def statuses(self, relation: ops.Relation | None = None) -> dict[str, VmStatus]:
        """The provider's answer per request id (a request it has not answered yet is absent)."""
        read = self._read(self._relation(relation))
        return read[0] if read else {}

    def _read(self, rel: ops.Relation) -> tuple[dict[str, VmStatus], bool] | None:
        """(statuses, whether every entry was readable); None when the list cannot be read as a whole
        (nor the provider application known), so nothing is taken as released."""
        if rel.app is None:
            return None
        try:
            raw = decode_json(rel.data[rel.app].get("vms"))
        except ValueError as e:
            logger.warning("vm-host's statuses on relation %d are unreadable: vms %s", rel.id, e)
            return None
        if raw is not None and not isinstance(raw, list):
            logger.warning("vm-host's statuses on relation %d are unreadable: vms is not a list", rel.id)
            return None
        out = parse_statuses(raw)
        left = len(raw or ()) - len(out)
        if left:
            logger.warning(
                "%d of vm-host's statuses on relation %d are left out (unreadable or repeated)", left, rel.id
            )
        return out, left == 0

    def vm(self, id: str, relation: ops.Relation | None = None) -> VmStatus | None:
        return self.statuses(relation).get(id)

    def _known(self, key: str, current: dict[str, VmStatus]) -> dict[str, dict]:
        """What this unit last saw on relation `key`: request id -> {status, vm (the ready view, or None)}.

        Stored by this library only; read totally all the same. A unit upgraded from LIBPATCH 2 adopts
        the VMs it already announced as ready without announcing them again.
        """
        try:
            known = json.loads(self._stored.known.get(key) or "{}")
        except (TypeError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        legacy = self._stored.seen.get(key)
        if legacy is not None and key not in self._stored.known:
            for rid, status in dict(legacy).items():
                st = current.get(rid)
                vm = _view(st) if status == "ready" and st is not None and st.usable else None
                known[rid] = {"status": status, "vm": vm}
        return {rid: entry for rid, entry in known.items() if isinstance(entry, dict)}

    def _on_changed(self, event: ops.RelationChangedEvent) -> None:
        """Compare the provider's statuses with what this unit last saw; fire one event per change."""
        rel = event.relation
        read = self._read(rel)
        if read is None:  # nothing can be told from an unreadable list: nothing is released either
            return
        current, complete = read
        key = str(rel.id)
        known = self._known(key, current)
        now: dict[str, dict] = {}
        for rid, st in sorted(current.items()):
            before = known.get(rid, {})
            vm = before.get("vm") if isinstance(before.get("vm"), dict) else None
            # vm-host names a request's VM alike on every unit: one on another unit is another machine
            moved = vm is not None and st.unit is not None and st.unit != vm.get("unit")
            if vm is not None and (st.name != vm.get("name") or st.status in ("failed", "rejected") or moved):
                self.on.vm_released.emit(rel, app=rel.app, status=vm)
                vm = None
            if st.usable:
                view = _view(st)
                if vm is None:
                    self.on.vm_ready.emit(rel, app=rel.app, status=view)
                elif view != vm:
                    self.on.vm_changed.emit(rel, app=rel.app, status=view, previous=vm)
                vm = view
            if st.status in ("failed", "rejected") and before.get("status") != st.status:
                self.on.vm_failed.emit(rel, app=rel.app, status=st.model_dump(mode="json"))
            now[rid] = {"status": st.status, "vm": vm}
        for rid, before in sorted(known.items()):
            if rid in current:
                continue
            if not complete:  # it may be one of the unreadable entries: keep it until the list is readable
                now[rid] = before
            elif isinstance(before.get("vm"), dict):
                self.on.vm_released.emit(rel, app=rel.app, status=before["vm"])
        self._stored.known[key] = json.dumps(now)
        self._stored.seen.pop(key, None)

    def _on_broken(self, event: ops.RelationBrokenEvent) -> None:
        """The relation is gone, and with it every VM it served."""
        key = str(event.relation.id)
        for _rid, entry in sorted(self._known(key, {}).items()):
            if isinstance(entry.get("vm"), dict):
                self.on.vm_released.emit(event.relation, app=event.app, status=entry["vm"])
        self._stored.known.pop(key, None)
        self._stored.seen.pop(key, None)
