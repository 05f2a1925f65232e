"""Typed charm config and action parameters (pydantic; no ops import, so tests and tools reuse them).

The charm's own module, beside src/charm.py (as canonical/operator's machine-tinyproxy example keeps
its config): the workload package never imports it; it is handed plain dataclasses from vmhost.model
(HugepageSetting, Quota, Policy) and vmhost.relation_policy.RelationSettings instead.

The charm loads these with `CharmBase.load_config` / `ActionEvent.load_params`, which pass Juju's
hyphenated names with underscores. Every validator turns an operator string into a typed value or
raises one sentence naming what is wrong and what is allowed; `error_message` turns a pydantic
ValidationError into that sentence with the Juju option or parameter name in front.

Over ~400 lines on purpose: one pydantic model per config option set and action (the charm's whole
operator-facing surface), each validator a sentence; splitting it would scatter config.yaml's mirror.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from vmhost.access import cloud_init_for
from vmhost.cloudinit import check_ssh_keys, check_user_data
from vmhost.model import MAX_RESERVED_MEMORY, RATIO_BOUNDS, BootMode, CloudInit, HugepageSetting, Policy, Quota
from vmhost.parse import (
    MAX_TEXT,
    MAX_VM_CORES,
    ParseError,
    check_size,
    clip,
    parse_cpuset,
    parse_hugepage_size,
    parse_listen_address,
    parse_size,
    parse_vm_name,
)
from vmhost.relation_policy import DEFAULT_RELATION_IMAGE, Binding, RelationSettings
from vmhost.simplestreams import DEFAULT_IMAGE_SERVER, StreamError, check_server
from vmhost.timeouts import DEFAULT_CALL_TIMEOUT, seconds

__all__ = [
    "AddTrustedClientParams",
    "CharmConfig",
    "ClientTokenParams",
    "ComposeParams",
    "ListVmsParams",
    "NameParams",
    "StopVmParams",
    "error_message",
    "parse_hugepages_setting",
    "relation_settings",
    "vm_results",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")  # an alias or local name, never a path


def _digits_as_text(v: Any) -> Any:
    """`juju run` reads key=value as YAML, so memory=2048 or name=123 arrive as integers: take them as text."""
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


# An action parameter people may type as a number (actions.yaml declares it `type: [string, integer]`).
Text = Annotated[str, BeforeValidator(_digits_as_text), Field(max_length=MAX_TEXT)]


def parse_hugepages_setting(value: str) -> tuple[HugepageSetting, ...]:
    """Settings from "2M:4096", "2M:4096,1G:8" or per node "0:1G:8,1:1G:8"."""
    out: list[HugepageSetting] = []
    for tok in re.split(r"[,\s]+", value.strip()):
        if not tok:
            continue
        parts = tok.split(":")
        if len(parts) == 2:
            node_s, (size_s, count_s) = None, parts
        elif len(parts) == 3:
            node_s, size_s, count_s = parts
        else:
            raise ValueError(f"entry {clip(tok)} is not size:count or node:size:count (e.g. 2M:4096 or 0:1G:8)")
        node = None
        if node_s is not None:
            if not (node_s.isascii() and node_s.isdigit()) or len(node_s) > 4:
                raise ValueError(f"node {clip(node_s)} in {clip(tok)} is not a NUMA node number")
            node = int(node_s)
        try:
            size = parse_hugepage_size(size_s)
        except ParseError as e:
            raise ValueError(str(e)) from None
        if not (count_s.isascii() and count_s.isdigit()) or len(count_s) > 12:
            raise ValueError(f"count {clip(count_s)} in {clip(tok)} is not a whole number of pages (at most 12 digits)")
        if any(s.size == size and (s.node is None or node is None or s.node == node) for s in out):
            raise ValueError(f"{size} pages are given twice in {clip(tok)}; give each size once, or once per node")
        out.append(HugepageSetting(size=size, count=int(count_s), node=node))
    return tuple(out)


# Ceilings of relation-quota: far above any one host, low enough that sums stay small integers.
QUOTA_MAX = {"vms": 100_000, "cores": 1_000_000, "memory": 1024**5, "storage": 1024**5}


def _parse_quota(value: str) -> Quota:
    found: dict[str, int] = {}
    for tok in re.split(r"[,\s]+", value.strip()):
        if not tok:
            continue
        key, sep, val = tok.partition("=")
        key = key.strip().lower()
        if not sep or key not in QUOTA_MAX:
            raise ValueError(f"entry {clip(tok)} is not vms=N, cores=N, memory=SIZE or storage=SIZE")
        if key in ("memory", "storage"):  # a bare number: MiB of memory, GB of disk (MAAS's units)
            unit = "M" if key == "memory" else "GB"
            try:
                found[key] = check_size(key, parse_size(val, default_unit=unit), 0, QUOTA_MAX[key])
            except ParseError as e:
                raise ValueError(str(e)) from None
        elif val.isascii() and val.isdigit() and int(val[:12]) <= QUOTA_MAX[key]:
            found[key] = int(val)
        else:
            raise ValueError(f"{key} {clip(val)} is not a whole number from 0 to {QUOTA_MAX[key]}")
    return Quota(**found)


CONFIG_TEXT_MAX = 4096  # characters in any one text option (the longest real ones, hugepages per node, are far shorter)


class CharmConfig(BaseModel):
    """The charm's config options (config.yaml), parsed into what the workload uses."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    backend: Literal["lxd", "libvirt"] = "lxd"
    lxd_snap_channel: str = "5.21/stable"
    lxd_listen_address: str = ""
    lxd_storage_driver: Literal["dir", "zfs", "btrfs", "lvm"] = "dir"
    bridge: str = ""
    cpu_overcommit_ratio: float = 1.0
    memory_overcommit_ratio: float = 1.0
    reserved_cores: tuple[int, ...] = ()
    reserved_memory: int = 0
    confine_foreign_vms: bool = True
    hugepages: tuple[HugepageSetting, ...] = ()
    default_storage_pool: str = ""
    space_bridges: dict[str, str] = Field(default_factory=dict)
    allowed_networks: tuple[str, ...] = ()
    relation_quota: Quota = Quota()
    relation_image: str = DEFAULT_RELATION_IMAGE
    libvirt_uri: str = "qemu:///system"
    libvirt_image_dir: str = "/var/lib/vmhost/images"
    image_server: str = DEFAULT_IMAGE_SERVER
    libvirt_domain_type: Literal["auto", "kvm", "qemu"] = "auto"
    metrics_address: str = "127.0.0.1:9477"
    hypervisor_timeout: float = DEFAULT_CALL_TIMEOUT

    @field_validator("*", mode="before")
    @classmethod
    def _bounded_text(cls, v: Any) -> Any:
        """Every option's text has a ceiling, and a message never echoes more than a clip of it."""
        if isinstance(v, str) and len(v) > CONFIG_TEXT_MAX:
            raise ValueError(f"{clip(v)} is {len(v)} characters long; at most {CONFIG_TEXT_MAX}")
        return v

    @field_validator("hypervisor_timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> float:
        return seconds(v, "value")

    @field_validator("lxd_snap_channel")
    @classmethod
    def _channel(cls, v: str) -> str:
        if not re.fullmatch(r"(?:[a-z0-9.-]+/)?(?:stable|candidate|beta|edge)(?:/[\w.-]+)?|[a-z0-9.-]+", v):
            raise ValueError(f"{clip(v)} is not a snap channel; use track/risk such as 5.21/stable or 6/stable")
        return v

    @field_validator("libvirt_uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9+]+://[^\s]*", v):
            raise ValueError(f"{clip(v)} is not a libvirt URI; use e.g. qemu:///system or qemu+ssh://virsh@host/system")
        return v

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, v: str) -> str:
        v = v.strip()
        if v:
            try:
                parse_listen_address(v)
            except ParseError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("image_server")
    @classmethod
    def _image_server(cls, v: str) -> str:
        try:
            return check_server(v)
        except StreamError as e:
            raise ValueError(str(e)) from None

    @field_validator("libvirt_image_dir")
    @classmethod
    def _image_dir(cls, v: str) -> str:
        v = v.strip()
        if not v.startswith("/") or "\n" in v:
            raise ValueError(f"{clip(v)} is not an absolute directory path; use e.g. /var/lib/vmhost/images")
        return v

    @field_validator("relation_image")
    @classmethod
    def _relation_image(cls, v: str) -> str:
        v = v.strip()
        if not _IMAGE_NAME_RE.fullmatch(v) or ".." in v:
            raise ValueError(
                f"{clip(v)} is not an image name; use <os>:<alias> such as ubuntu:24.04, or the name of a local image"
            )
        return v

    @field_validator("cpu_overcommit_ratio", "memory_overcommit_ratio")
    @classmethod
    def _ratio(cls, v: float, info: ValidationInfo) -> float:
        lo, hi = RATIO_BOUNDS[info.field_name]
        if not lo <= v <= hi:  # false for nan too
            raise ValueError(f"{v:g} is not allowed; use a number from {lo:g} to {hi:g} (1.0 means no overcommit)")
        return v

    @field_validator("reserved_cores", mode="before")
    @classmethod
    def _cpuset(cls, v: Any) -> tuple[int, ...]:
        if isinstance(v, str):
            if not v.strip():
                return ()
            try:
                return parse_cpuset(v)
            except ParseError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("reserved_memory", mode="before")
    @classmethod
    def _size(cls, v: Any) -> int:
        if isinstance(v, str):
            try:
                return check_size("reserved memory", parse_size(v or "0", default_unit="M"), 0, MAX_RESERVED_MEMORY)
            except ParseError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("hugepages", mode="before")
    @classmethod
    def _hugepages(cls, v: Any) -> tuple[HugepageSetting, ...]:
        return parse_hugepages_setting(v) if isinstance(v, str) else v

    @field_validator("relation_quota", mode="before")
    @classmethod
    def _quota(cls, v: Any) -> Quota:
        return _parse_quota(v) if isinstance(v, str) else v

    @field_validator("space_bridges", mode="before")
    @classmethod
    def _space_bridges(cls, v: Any) -> dict[str, str]:
        if not isinstance(v, str):
            return v
        out: dict[str, str] = {}
        for tok in re.split(r"[,\s]+", v.strip()):
            if not tok:
                continue
            space, sep, bridge = tok.partition("=")
            if not sep or not _NAME_RE.match(space) or not _NAME_RE.match(bridge):
                raise ValueError(f"entry {clip(tok)} is not space=bridge (e.g. public=br0 storage=br1)")
            out[space] = bridge
        return out

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _networks(cls, v: Any) -> tuple[str, ...]:
        if not isinstance(v, str):
            return v
        out = []
        for tok in re.split(r"[,\s]+", v.strip()):
            if not tok:
                continue
            if "/" in tok:
                try:
                    tok = str(ipaddress.ip_network(tok, strict=False))
                except ValueError:
                    raise ValueError(f"{clip(tok)} is not a CIDR (e.g. 10.20.0.0/24)") from None
            elif not _NAME_RE.match(tok):
                raise ValueError(f"{clip(tok)} is not a space, bridge or network name, nor a CIDR")
            out.append(tok)
        return tuple(out)

    @field_validator("lxd_listen_address")
    @classmethod
    def _listen(cls, v: str) -> str:
        v = v.strip()
        if not v:
            return v
        m = re.fullmatch(r"\[([0-9A-Fa-f:]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", v)
        if not m:
            raise ValueError(f"{clip(v)} is not an address[:port] (e.g. 10.0.0.5:8443 or [::]:8443)")
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if port is not None and not 0 < int(port) < 65536:
            raise ValueError(f"port {port} in {clip(v)} is not 1-65535")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
                raise ValueError(f"{clip(host)} in {clip(v)} is not an IP address or host name") from None
        return v

    @field_validator("bridge", "default_storage_pool")
    @classmethod
    def _name(cls, v: str) -> str:
        v = v.strip()
        if v and not _NAME_RE.match(v):
            raise ValueError(f"{clip(v)} is not a name; use letters, digits, '-', '_' or '.'")
        return v

    def policy(self) -> Policy:
        return Policy(
            cpu_overcommit_ratio=self.cpu_overcommit_ratio,
            memory_overcommit_ratio=self.memory_overcommit_ratio,
            reserved_cores=self.reserved_cores,
            reserved_memory=self.reserved_memory,
            default_storage_pool=self.default_storage_pool or None,
            confine_foreign_vms=self.confine_foreign_vms,
        )


class ComposeParams(BaseModel):
    """The compose action (MAAS parameter names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cores: int | None = Field(None, ge=1, le=MAX_VM_CORES)  # None: 1, or one per pinned CPU (as MAAS)
    memory: Annotated[Text, Field(max_length=64)] | None = None  # None: VmRequest's default, MAAS's 2048M
    pinned_cores: Text | None = None
    hugepages_backed: bool = False
    hugepage_size: str | None = Field(None, max_length=16)
    numa_nodes: int | None = None  # bounds (1-64, at most cores) are VmRequest's, one rule for every caller
    storage: Text | None = None
    interfaces: Text | None = None
    hostname: Text | None = None
    pool: Text | None = None
    start: bool = False
    boot: BootMode = "network"
    image: Text | None = None
    # Access (vmhost.access): keys for the login user DEFAULT_LOGIN_USER and the caller's user-data, bounded
    # by vmhost.cloudinit's checks, whose messages never echo the text (user-data may hold secrets).
    ssh_authorized_keys: tuple[str, ...] = ()
    user_data: str | None = None

    @field_validator("ssh_authorized_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> tuple[str, ...]:
        return check_ssh_keys(list(v) if isinstance(v, tuple) else v)

    @field_validator("user_data", mode="before")
    @classmethod
    def _user_data(cls, v: Any) -> str | None:
        return None if v is None else check_user_data(v)

    def cloud_init(self) -> CloudInit | None:
        """The seed's access part, or None for the default seed (no keys, no user-data)."""
        return cloud_init_for(self.hostname, self.ssh_authorized_keys, self.user_data)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        return parse_vm_name(v) if v else None

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str | None) -> str | None:
        if v and not _NAME_RE.match(v):
            raise ValueError(f"{clip(v)} is not a pool name; use letters, digits, '-', '_' or '.'")
        return v or None

    def request_dict(self) -> dict:
        """The shape VmRequest.from_dict takes (it does the MAAS-syntax parsing)."""
        return {
            "cores": self.cores,
            "memory": self.memory,
            "pinned_cores": self.pinned_cores,
            "hugepages_backed": self.hugepages_backed,
            "hugepage_size": self.hugepage_size,
            "numa_nodes": self.numa_nodes,
            "storage": self.storage,
            "interfaces": self.interfaces,
            "name": self.hostname,
            "pool": self.pool,
        }


class NameParams(BaseModel):
    """decompose / start-vm: one VM by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Text = Field(min_length=1)


class PruneImagesParams(BaseModel):
    """prune-images: remove the base images no VM uses (dry_run: only say which)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dry_run: bool = False


class StopVmParams(NameParams):
    force: bool = False


class ListVmsParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    pool: Text | None = None


_CLIENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}$"
_EXPIRY_UNITS = {"m": 60, "h": 3600, "d": 86400}
TOKEN_EXPIRY_MIN, TOKEN_EXPIRY_MAX = 60, 7 * 86400  # s


class AddTrustedClientParams(BaseModel):
    """Trust a client certificate; restricted to vm-host's LXD project unless admin=true."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cert: str = Field(min_length=1, max_length=16384)
    name: Text = Field("vm-host-client", pattern=_CLIENT_NAME)
    admin: bool = False

    @field_validator("cert")
    @classmethod
    def _pem(cls, v: str) -> str:
        if "-----BEGIN CERTIFICATE-----" not in v:
            raise ValueError(
                "is not a PEM certificate; give the client's certificate starting -----BEGIN CERTIFICATE-----"
            )
        return v


class ClientTokenParams(BaseModel):
    """A join token that expires (`expiry`: 30m, 1h, 2d; a bare number is minutes), restricted unless admin=true."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Text = Field(pattern=_CLIENT_NAME)
    expiry: Text = "1h"
    admin: bool = False

    @field_validator("expiry")
    @classmethod
    def _expiry(cls, v: str) -> str:
        m = re.fullmatch(r"\s*(\d{1,6})\s*([mhd]?)\s*", v.lower())
        seconds = int(m.group(1)) * _EXPIRY_UNITS[m.group(2) or "m"] if m else None
        if seconds is None or not TOKEN_EXPIRY_MIN <= seconds <= TOKEN_EXPIRY_MAX:
            raise ValueError(
                f"{clip(v)} is not an expiry from 1m to 7d; give minutes, hours or days, e.g. 30m, 1h or 2d"
            )
        return f"{m.group(1)}{m.group(2) or 'm'}"

    @property
    def expiry_seconds(self) -> int:
        return int(self.expiry[:-1]) * _EXPIRY_UNITS[self.expiry[-1]]


# pydantic errors whose message does not show the value given; error_message puts it in front.
_SHOW_INPUT = (
    "literal_error",
    "greater_than",
    "greater_than_equal",
    "less_than_equal",
    "string_pattern_mismatch",
    "string_too_long",
    "missing",
    "int_parsing",
    "string_type",
)


def error_message(e: ValidationError, kind: str = "config") -> str:
    """One sentence for the first problem: "config hugepages: <why>; ..." with the Juju (hyphenated) name."""
    parts = []
    for err in e.errors():
        loc = "-".join(str(x) for x in err.get("loc", ()) if isinstance(x, str)).replace("_", "-")
        msg = err.get("msg", "invalid")
        msg = msg.removeprefix("Value error, ")
        given = err.get("input")
        if err.get("type") in _SHOW_INPUT:
            msg = (
                f"{clip(given)} is not allowed: {msg[0].lower()}{msg[1:]}"
                if err.get("type") != "missing"
                else "is required"
            )
        parts.append(f"{kind} {loc}: {msg}" if loc else f"{kind}: {msg}")
    return "; ".join(parts[:2])


# Result keys Juju accepts (lower case, no underscores); nested values are JSON text.
_RESULT_KEYS = {
    "name": "name",
    "login_user": "login-user",
    "host_keys": "host-keys",
    "state": "state",
    "vcpus": "vcpus",
    "pinned": "pinned",
    "numa_nodes": "nodes",
    "memory": "memory",
    "hugepages": "hugepages",
    "disks": "disks",
    "nics": "nics",
    "mac_addresses": "macs",
    "cells": "cells",
    "threads_per_core": "threads",
    "resource_pool": "pool",
    "owner": "owner",
    "managed": "managed",
}


def vm_results(vm: dict) -> dict[str, str]:
    """A VmInfo.to_dict() as Juju action results: every value a string, nested values JSON."""
    out: dict[str, str] = {}
    for key, value in vm.items():
        rkey = _RESULT_KEYS.get(key, key.replace("_", ""))
        if value is None:
            continue
        out[rkey] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def relation_settings(config: CharmConfig, binding: Binding | None = None) -> RelationSettings:
    """The relation policy as plain values, from the charm's config and this unit's binding."""
    return RelationSettings(
        quota=config.relation_quota,
        allowed_networks=tuple(config.allowed_networks),
        space_bridges=dict(config.space_bridges),
        binding=binding or Binding(),
        image=config.relation_image,
    )
