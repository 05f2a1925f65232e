"""Total parsers for the strings operators type: sizes, CPU sets, MAAS storage and interface constraints.

Every function either returns a typed value or raises ParseError naming the offending token, so
bad input is refused before anything is planned or created.

Over ~400 lines on purpose: the bottom layer holds every operator-string grammar (sizes, CPU sets, MAAS
storage and interface strings) with their bounds, so each rule is written once and imports nothing.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

__all__ = [
    "DiskSpec",
    "InterfaceSpec",
    "ParseError",
    "format_cpuset",
    "format_size",
    "human_size",
    "parse_cpuset",
    "parse_hugepage_size",
    "parse_interfaces",
    "parse_size",
    "parse_storage",
    "parse_vm_name",
]


class ParseError(ValueError):
    """Malformed operator input; the message names the token and what is allowed."""


# What one VM may ask for, whoever asks (CLI, action, relation); README "Limits" says the same.
# Checked before anything is planned, so nothing absurd reaches a hypervisor, sysfs or float().
MIN_VM_MEMORY = 64 * 1024**2
MAX_VM_MEMORY = 16 * 1024**4
MAX_VM_CORES = 1024
MIN_DISK_SIZE = 64 * 1024**2
MAX_DISK_SIZE = 64 * 1024**4
MAX_DISKS = 26  # virtio disks are named vda..vdz
MAX_INTERFACES = 16
MAX_TEXT = 4096  # longest storage, interfaces or cpu-set string


def clip(value: object, limit: int = 80) -> str:
    """repr() of a value for a message, cut short: operator and remote strings can be kilobytes long."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 4]}...{text[-1]}"


def check_size(what: str, n: int, lo: int, hi: int) -> int:
    """`n` when lo <= n <= hi, else ParseError saying the allowed range in human sizes."""
    if not lo <= n <= hi:
        shown = human_size(n) if n < 1024**5 else f"over {human_size(1024**5)}"
        raise ParseError(
            f"{what} is too {'small' if n < lo else 'large'} ({shown}); allowed: {human_size(lo)} to {human_size(hi)}"
        )
    return n


def check_text(what: str, value: str) -> str:
    """`value` unless it is longer than MAX_TEXT (a constraint string that long is a mistake or an attack)."""
    if len(value) > MAX_TEXT:
        raise ParseError(f"{what} is {len(value)} characters long; at most {MAX_TEXT} are allowed")
    return value


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")

HUGEPAGE_SIZES = {"2M": 2 * 1024**2, "1G": 1024**3}


def parse_size(value: str | int, *, default_unit: str = "") -> int:
    """Bytes from "8G", "512MiB", "1.5T", 1234 or "1234" (K/M/G/T are binary, KB/MB/GB decimal)."""
    if isinstance(value, bool):
        raise ParseError(f"size {clip(value)} is not a size; use bytes or a number with K, M, G or T")
    if isinstance(value, int):
        if value < 0:
            raise ParseError(f"size {value} is negative; sizes are 0 or more bytes")
        return value
    if not isinstance(value, str):
        raise ParseError(f"size {clip(value)} is not a size; use bytes or a number with K, M, G or T")
    m = _SIZE_RE.match(value)
    if not m:
        raise ParseError(f"size {clip(value)} is not a size; use bytes or a number with K, M, G or T (e.g. 8G, 512MiB)")
    number, unit = m.group(1), (m.group(2) or default_unit).upper()
    if unit not in _UNITS:
        raise ParseError(
            f"size {clip(value)} has unknown unit {clip(m.group(2))}; allowed: B, K, M, G, T, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    # Exact arithmetic: "1.5G" is 1610612736 bytes and a long number cannot overflow a float.
    result = Fraction(number) * _UNITS[unit]
    if result.denominator != 1:
        raise ParseError(f"size {clip(value)} is not a whole number of bytes; use a larger unit or fewer decimals")
    return int(result)


_BINARY = (("T", 1024**4), ("G", 1024**3), ("M", 1024**2), ("K", 1024))


def format_size(n: int) -> str:
    """Shortest exact binary form ("8G", "512M"), else bytes: what parse_size reads back to the same number."""
    for suffix, mult in _BINARY:
        if n and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def human_size(n: int) -> str:
    """A size for a message, in the same units as the sizes operators type: "8G", "4.8G", "512B".

    Exact when exact; else one decimal of the largest unit it reaches, so both sides of "need X, have Y"
    read in the same units (never "need 8G, have 5194375168 bytes").
    """
    if n < 1024:
        return f"{n}B"
    suffix, mult = next((s, m) for s, m in _BINARY if n >= m)
    if n % mult == 0:
        return f"{n // mult}{suffix}"
    tenths = (n * 10 + mult // 2) // mult  # integers: no float overflow however large n is
    return f"{tenths // 10}.{tenths % 10}{suffix}"


_VM_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def parse_vm_name(value: str) -> str:
    """A VM name that is also a valid host name, domain name, LXD instance name and volume name prefix."""
    if not isinstance(value, str) or not _VM_NAME_RE.fullmatch(value):
        raise ParseError(f"{clip(value)} is not a valid host name; use lower-case letters, digits and '-' (at most 63)")
    return value


def parse_hugepage_size(value: str) -> str:
    """Canonical hugepage size label ("2M" or "1G") from "2M", "2MiB", "2048K", "1G", "1GiB"."""
    try:
        n = parse_size(value)
    except ParseError:
        raise ParseError(f"hugepage size {clip(value)} is not a size; allowed: 2M, 1G") from None
    for label, size in HUGEPAGE_SIZES.items():
        if n == size:
            return label
    raise ParseError(f"hugepage size {clip(value)} is not supported; allowed: 2M, 1G")


def parse_cpuset(value: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """Sorted unique CPU ids from "0-3,8,10-11" or a list of ints."""
    if isinstance(value, (list, tuple)):
        out = set()
        for v in value:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ParseError(f"cpu {clip(v)} is not a CPU number; use whole numbers 0 or more")
            out.add(v)
        if not out:
            raise ParseError("cpu set is empty; give at least one CPU, e.g. 0-3,8")
        return tuple(sorted(out))
    if not isinstance(value, str) or not value.strip():
        raise ParseError(f"cpu set {clip(value)} is empty; use a list like 0-3,8,10-11")
    check_text("cpu set", value)
    out = set()
    for token in value.split(","):
        tok = token.strip()
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", tok)
        if not m:
            raise ParseError(f"cpu set token {clip(tok)} is not a CPU or range; use forms like 3 or 0-3")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ParseError(f"cpu range {clip(tok)} runs backwards; write the low number first")
        if hi - lo > 65536:
            raise ParseError(f"cpu range {clip(tok)} is too large; at most 65536 CPUs")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def format_cpuset(cpus: list[int] | tuple[int, ...] | set[int]) -> str:
    """Compact "0-3,8" form of a CPU set."""
    ids = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a MAAS storage string: `label:size(tag,tag)`."""

    label: str
    size: int
    tags: tuple[str, ...] = ()

    def to_str(self) -> str:
        tags = f"({','.join(self.tags)})" if self.tags else ""
        return f"{self.label}:{self.size}B{tags}"


_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_DISK_RE = re.compile(r"^(?:([^:()]+):)?([^:()]+?)(?:\(([^()]*)\))?$")


def parse_storage(value: str | None) -> tuple[DiskSpec, ...]:
    """Disks from "root:20(ssd),data:100"; sizes in GB (10^9 bytes) unless a unit is given.

    Labels are optional (MAAS allows "20,50"): unnamed disks become root, disk1, disk2...
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if not isinstance(value, str):
        raise ParseError(
            f"storage {clip(value)} is not a string; use label:size(tag,...),... e.g. root:20(ssd),data:100"
        )
    check_text("storage", value)
    entries = _split_top_level(value)
    if len(entries) > MAX_DISKS:
        raise ParseError(f"storage lists {len(entries)} disks; at most {MAX_DISKS} are allowed")
    disks: list[DiskSpec] = []
    for raw in entries:
        tok = raw.strip()
        if not tok:
            raise ParseError(f"storage {clip(value)} has an empty disk entry; separate disks with one ','")
        m = _DISK_RE.match(tok)
        if not m:
            raise ParseError(f"storage token {clip(tok)} is not label:size(tags); e.g. root:20(ssd)")
        label, size_s, tags_s = m.group(1), m.group(2).strip(), m.group(3)
        if label is None:
            label = "root" if not disks else f"disk{len(disks)}"
        label = label.strip()
        if not _LABEL_RE.fullmatch(label):
            raise ParseError(
                f"storage label {clip(label)} in {clip(tok)} is not valid; use letters, digits, '-', '_' or '.'"
            )
        try:
            size = parse_size(size_s, default_unit="GB")
        except ParseError:
            raise ParseError(
                f"storage size {clip(size_s)} in {clip(tok)} is not a size; use GB as a number (20) or a unit (20G)"
            ) from None
        check_size(f"storage size {clip(size_s)} in {clip(tok)}", size, MIN_DISK_SIZE, MAX_DISK_SIZE)
        tags: tuple[str, ...] = ()
        if tags_s is not None:
            tags = tuple(t.strip() for t in tags_s.split(","))
            for t in tags:
                if not _LABEL_RE.fullmatch(t):
                    raise ParseError(
                        f"storage tag {clip(t)} in {clip(tok)} is not valid; use letters, digits, '-', '_' or '.'"
                    )
        if any(d.label == label for d in disks):
            raise ParseError(f"storage label {clip(label)} is used twice; each disk needs its own label")
        disks.append(DiskSpec(label, size, tags))
    return tuple(disks)


def _split_top_level(value: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in value:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ParseError(f"storage {clip(value)} has an unmatched ')'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ParseError(f"storage {clip(value)} has an unmatched '('")
    parts.append("".join(cur))
    return parts


InterfaceType = Literal["bridge", "macvlan", "sriov"]  # what a request may ask for (MAAS `type=`)
INTERFACE_TYPES: tuple[InterfaceType, ...] = get_args(InterfaceType)
_LIST_KEYS = ("space", "not_space", "subnet", "not_subnet", "vlan", "not_vlan")
_IFACE_KEYS = (*_LIST_KEYS, "ip", "type", "name")


@dataclass(frozen=True)
class InterfaceSpec:
    """One interface of a MAAS constraint string: `label:key=value,...`."""

    label: str
    space: tuple[str, ...] = ()
    not_space: tuple[str, ...] = ()
    subnet: tuple[str, ...] = ()
    not_subnet: tuple[str, ...] = ()
    vlan: tuple[int, ...] = ()
    not_vlan: tuple[int, ...] = ()
    ip: str | None = None
    type: InterfaceType | None = None
    name: str | None = None

    def to_str(self) -> str:
        parts = []
        for key in _LIST_KEYS:
            for v in getattr(self, key):
                parts.append(f"{key}={v}")
        for key in ("ip", "type", "name"):
            v = getattr(self, key)
            if v is not None:
                parts.append(f"{key}={v}")
        return f"{self.label}:{','.join(parts)}"


_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}")


def parse_interfaces(value: str | None) -> tuple[InterfaceSpec, ...]:
    """Interfaces from "eth0:space=public;eth1:subnet=10.20.0.0/24,type=sriov"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if not isinstance(value, str):
        raise ParseError(
            f"interfaces {clip(value)} is not a string; use label:key=value,...;label2:... e.g. eth0:space=public"
        )
    check_text("interfaces", value)
    entries = value.split(";")
    if len(entries) > MAX_INTERFACES:
        raise ParseError(f"interfaces lists {len(entries)} interfaces; at most {MAX_INTERFACES} are allowed")
    out: list[InterfaceSpec] = []
    for i, raw in enumerate(entries):
        tok = raw.strip()
        if not tok:
            raise ParseError(f"interfaces {clip(value)} has an empty entry; separate interfaces with ';'")
        if ":" in tok and "=" not in tok.split(":", 1)[0]:
            label, body = tok.split(":", 1)
            label = label.strip()
        else:
            label, body = f"eth{i}", tok
        if not _LABEL_RE.fullmatch(label):
            raise ParseError(f"interface label {clip(label)} is not valid; use letters, digits, '-', '_' or '.'")
        if any(o.label == label for o in out):
            raise ParseError(f"interface label {clip(label)} is used twice; each interface needs its own label")
        values: dict[str, list] = {k: [] for k in _LIST_KEYS}
        single: dict[str, str | None] = {"ip": None, "type": None, "name": None}
        for pair in body.split(","):
            pair = pair.strip()
            if not pair:
                continue
            if "=" not in pair:
                raise ParseError(
                    f"interface constraint {clip(pair)} in {clip(label)} is not key=value; keys: {', '.join(_IFACE_KEYS)}"
                )
            key, val = (s.strip() for s in pair.split("=", 1))
            key = key.lower()
            if key not in _IFACE_KEYS:
                raise ParseError(
                    f"interface constraint key {clip(key)} in {clip(label)} is unknown; keys: {', '.join(_IFACE_KEYS)}"
                )
            if not val:
                raise ParseError(f"interface constraint {clip(key)} in {clip(label)} has no value")
            values_or_single = _check_iface_value(label, key, val)
            if key in values:
                values[key].append(values_or_single)
            elif single[key] is not None:
                raise ParseError(f"interface constraint {clip(key)} is given twice in {clip(label)}; give it once")
            else:
                single[key] = values_or_single
        out.append(
            InterfaceSpec(
                label=label,
                **{k: tuple(v) for k, v in values.items()},
                ip=single["ip"],
                type=single["type"],
                name=single["name"],
            )
        )
    return tuple(out)


def _check_iface_value(label: str, key: str, val: str):
    if key in ("subnet", "not_subnet"):
        try:
            return str(ipaddress.ip_network(val, strict=False))
        except ValueError:
            raise ParseError(f"subnet {clip(val)} in {clip(label)} is not a CIDR; e.g. 10.20.0.0/24") from None
    if key in ("vlan", "not_vlan"):
        if not re.fullmatch(r"[0-9]{1,4}", val) or not 0 <= int(val) <= 4094:
            raise ParseError(f"vlan {clip(val)} in {clip(label)} is not a VLAN id; use 0-4094")
        return int(val)
    if key == "ip":
        try:
            return str(ipaddress.ip_address(val))
        except ValueError:
            raise ParseError(f"ip {clip(val)} in {clip(label)} is not an IP address; e.g. 10.20.0.50") from None
    if key == "type":
        if val.lower() not in INTERFACE_TYPES:
            raise ParseError(
                f"interface type {clip(val)} in {clip(label)} is unknown; allowed: {', '.join(INTERFACE_TYPES)}"
            )
        return val.lower()
    if key == "name":
        if not _IFNAME_RE.fullmatch(val):
            raise ParseError(f"interface name {clip(val)} in {clip(label)} is not a host interface name")
        return val
    if not _LABEL_RE.fullmatch(val):
        raise ParseError(f"space {clip(val)} in {clip(label)} is not a valid space name")
    return val
