"""Total parsers for the strings operators type: sizes, CPU sets, MAAS storage and interface constraints.

Every function either returns a typed value or raises ParseError naming the offending token, so
bad input is refused before anything is planned or created.

Over ~400 lines on purpose: the bottom layer holds every operator-string grammar (sizes, CPU sets, MAAS
storage and interface strings) with their bounds, so each rule is written once and imports nothing.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Generic, Literal, TypeVar, get_args

__all__ = [
    "DiskSpec",
    "InterfaceSpec",
    "ParseCache",
    "ParseError",
    "disk_gigabytes",
    "format_cpuset",
    "format_size",
    "guest_ifname",
    "human_size",
    "parse_cpuset",
    "parse_hugepage_size",
    "parse_interfaces",
    "parse_listen_address",
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
# "5", "5.5", and as MAAS also reads them, "5." and ".5".
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")

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
    number, unit = m.group(1).rstrip("."), (m.group(2) or default_unit).upper()
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


def disk_gigabytes(n: int) -> str:
    """Disk sizes as MAAS's storage syntax counts them: decimal GB ("8 GB", "0.5 GB")."""
    return f"{round(n / 10**9, 2):g} GB"


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


def parse_listen_address(value: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT` (the `vmhost serve` address) -> (ip, port); a name is refused, so the
    address the service binds is exactly the one the operator typed."""
    text = str(value).strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]{2,45})\]:([0-9]{1,5})|([0-9.]{7,15}):([0-9]{1,5})", text)
    if not m:
        raise ParseError(
            f"listen address {text[:60]!r} is not IP:PORT; use e.g. 127.0.0.1:9477, 0.0.0.0:9477 or [::1]:9477"
        )
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ParseError(f"listen address {text!r} has no valid IP address; use e.g. 127.0.0.1:9477") from None
    if not 1 <= int(port) <= 65535:
        raise ParseError(f"listen port {port} is out of range; allowed: 1 to 65535")
    return host, int(port)


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


# MAAS's compose default when no storage is given (DEFAULT_COMPOSED_STORAGE, maasserver/forms/pods.py);
# placement gives it to a VM on a host that has storage pools.
DEFAULT_ROOT_DISK = DiskSpec("root", 8 * 10**9, ("local",))


def parse_storage(value: str | None) -> tuple[DiskSpec, ...]:
    """Disks from "root:20(ssd),data:100"; sizes in GB (10^9 bytes) unless a unit is given.

    MAAS's reading (get_storage_constraints_from_string): labels are optional ("20,50": root, disk1...),
    may repeat (the repeats are renamed label-2, label-3 so every volume has its own name), a bare size
    is decimal GB cut to whole bytes, and after the first disk, disks with more tags come first.
    Empty means "no disks asked for" here; placement then gives MAAS's default root disk (DEFAULT_ROOT_DISK).
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
        size = _disk_size(size_s, tok)
        tags: tuple[str, ...] = ()
        if tags_s is not None:
            tags = tuple(t.strip() for t in tags_s.split(","))
            for t in tags:
                if not _LABEL_RE.fullmatch(t):
                    raise ParseError(
                        f"storage tag {clip(t)} in {clip(tok)} is not valid; use letters, digits, '-', '_' or '.'"
                    )
        disks.append(DiskSpec(label, size, tags))
    head, tail = disks[:1], disks[1:]
    tail.sort(key=lambda d: len(d.tags), reverse=True)  # stable, as MAAS sorts them
    return tuple(_unique_labels(head + tail))


def _disk_size(size_s: str, tok: str) -> int:
    """Bytes of one disk: a bare number is decimal GB cut to whole bytes (MAAS's int(float(size) * 1000**3))."""
    try:
        m = _SIZE_RE.match(size_s)
        if m and not m.group(2):
            size = int(Fraction(size_s.strip().rstrip(".") or "0") * 10**9)
        else:
            size = parse_size(size_s)
    except (ParseError, ValueError, ZeroDivisionError):
        raise ParseError(
            f"storage size {clip(size_s)} in {clip(tok)} is not a size; use GB as a number (20) or a unit (20G)"
        ) from None
    if size == 0:
        raise ParseError(
            f"storage size {clip(size_s)} in {clip(tok)} is 0, which MAAS composed as a 0-byte disk "
            f"(0 means 'any size' only when MAAS filters machines); give a size of at least {human_size(MIN_DISK_SIZE)}"
        )
    return check_size(f"storage size {clip(size_s)} in {clip(tok)}", size, MIN_DISK_SIZE, MAX_DISK_SIZE)


def _unique_labels(disks: list[DiskSpec]) -> list[DiskSpec]:
    """MAAS lets two disks share a label; here each disk names a volume, so repeats become label-2, label-3."""
    given = {d.label for d in disks}
    out: list[DiskSpec] = []
    used: set[str] = set()
    for d in disks:
        label, n = d.label, 2
        while label in used or (label != d.label and label in given):
            label, n = f"{d.label}-{n}", n + 1
        used.add(label)
        out.append(DiskSpec(label, d.size, d.tags) if label != d.label else d)
    return out


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


# How a guest NIC attaches (ours: `attach=`); MAAS's `type=` is the host interface's kind (HOST_KINDS).
AttachType = Literal["bridge", "macvlan", "sriov"]
ATTACH_TYPES: tuple[AttachType, ...] = get_args(AttachType)
HOST_KINDS = ("physical", "bond", "bridge", "vlan")
INTERFACE_MODES = ("auto", "dhcp", "static", "link_up", "unconfigured")
MAX_LINK_SPEED = 10**7  # Mbit/s (10 Tbit/s)

# MAAS interface keys that name things only MAAS has: refused, saying what to use instead.
_MAAS_ONLY = {
    "id": "MAAS interface ids exist only in MAAS's database; use name=<host interface>",
    "fabric": "MAAS fabrics exist only in MAAS; use vlan=, subnet= or space=",
    "fabric_class": "MAAS fabric classes exist only in MAAS; use link_speed= or name=",
    "hostname": "MAAS node hostnames select another machine; a vm-host composes on its own host, so leave it out",
    "tag": "MAAS interface tags exist only in MAAS; use name=, type= or space=",
}
_LIST_KEYS = (
    "space",
    "not_space",
    "subnet",
    "not_subnet",
    "subnet_cidr",
    "not_subnet_cidr",
    "vlan",
    "not_vlan",
    "vid",
    "not_vid",
    "not_ip",
    "name_in",
    "not_name",
    "type",
)
_IFACE_KEYS = (
    *(k for k in _LIST_KEYS if k != "name_in"),
    "ip",
    "name",
    "mode",
    "link_speed",
    "attach",
)


@dataclass(frozen=True)
class InterfaceSpec:
    """One interface of a MAAS constraint string: `label:key=value,...`.

    `label` is the guest's interface name (MAAS's get_ifname_for_label). Repeated keys are ORs, as in
    MAAS; repeated `not_` keys exclude each value; different keys must all hold. `type` is MAAS's host
    interface kind (physical, bond, bridge, vlan); `attach` is how the guest NIC attaches (ours).
    `ip` and `more_ips` are the guest's static addresses; `name` one host interface, `name_in` several.
    """

    label: str
    space: tuple[str, ...] = ()
    not_space: tuple[str, ...] = ()
    subnet: tuple[str, ...] = ()
    not_subnet: tuple[str, ...] = ()
    subnet_cidr: tuple[str, ...] = ()
    not_subnet_cidr: tuple[str, ...] = ()
    vlan: tuple[int, ...] = ()
    not_vlan: tuple[int, ...] = ()
    vid: tuple[int, ...] = ()
    not_vid: tuple[int, ...] = ()
    not_ip: tuple[str, ...] = ()
    name_in: tuple[str, ...] = ()
    not_name: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    ip: str | None = None
    more_ips: tuple[str, ...] = ()
    name: str | None = None
    mode: str | None = None
    link_speed: int | None = None
    attach: AttachType | None = None

    @property
    def ips(self) -> tuple[str, ...]:
        """Every static address the guest gets on this interface, in the order given."""
        return ((self.ip,) if self.ip else ()) + self.more_ips

    def to_str(self) -> str:
        parts = []
        for key in _LIST_KEYS:
            for v in getattr(self, key):
                parts.append(f"{'name' if key == 'name_in' else key}={v}")
        for ip in self.ips:
            parts.append(f"ip={ip}")
        for key in ("name", "mode", "link_speed", "attach"):
            v = getattr(self, key)
            if v is not None:
                parts.append(f"{key}={v}")
        return f"{self.label}:{','.join(parts)}"


_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,14}")
_IFACE_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def guest_ifname(label: str) -> str:
    """The guest interface name for a label, as MAAS names it (get_ifname_for_label).

    A numeric label N is ethN; a name longer than 15 bytes (the kernel's limit) becomes
    eth-<last 5 hex digits of its CRC-32>-<its last 5 characters>.
    """
    if label.isdigit():
        label = f"eth{int(label)}"
    raw = label.encode()
    if len(raw) > 15:
        digest = f"{zlib.crc32(raw) & 0xFFFFFFFF:05x}"[-5:]
        label = f"eth-{digest}-{raw[-5:].decode(errors='replace')}"
    return label


def parse_interfaces(value: str | None) -> tuple[InterfaceSpec, ...]:
    """Interfaces from "eth0:space=public;eth1:subnet=10.20.0.0/24,attach=sriov" (MAAS's labeled constraint map).

    Unlabeled entries (ours) are eth0, eth1... by position.
    """
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
        if not _IFACE_LABEL_RE.fullmatch(label):
            raise ParseError(f"interface label {clip(label)} is not valid; use letters, digits, '-', '_' or '.'")
        ifname = guest_ifname(label)
        if any(o.label == ifname for o in out):
            raise ParseError(
                f"interface label {clip(label)} names guest interface {ifname} twice; each interface needs its own label"
            )
        out.append(_interface(label, ifname, body))
    return tuple(out)


def _interface(label: str, ifname: str, body: str) -> InterfaceSpec:
    lists: dict[str, list] = {k: [] for k in _LIST_KEYS}
    ips: list[str] = []
    single: dict[str, object] = {}
    for pair in body.split(","):
        pair = pair.strip()
        if not pair:
            continue
        if "=" not in pair:
            raise ParseError(
                f"interface constraint {clip(pair)} in {clip(label)} is not key=value; keys: {', '.join(_IFACE_KEYS)}"
            )
        key, val = (x.strip() for x in pair.split("=", 1))
        key = key.lower()
        base = key.removeprefix("not_")
        if base in _MAAS_ONLY:
            raise ParseError(f"interface constraint {clip(key)} in {clip(label)} is refused: {_MAAS_ONLY[base]}")
        if key not in _IFACE_KEYS:
            raise ParseError(
                f"interface constraint key {clip(key)} in {clip(label)} is unknown; keys: {', '.join(_IFACE_KEYS)}"
            )
        if not val:
            raise ParseError(f"interface constraint {clip(key)} in {clip(label)} has no value")
        v = _check_iface_value(label, key, val)
        if key == "type" and v in ("macvlan", "sriov"):
            key = "attach"  # the old spelling of attach=: no MAAS host kind has these names
        if key == "ip":
            if v in ips:
                raise ParseError(f"ip {v} is given twice in {clip(label)}; give each address once")
            ips.append(v)
        elif key == "name":
            lists["name_in"].append(v)
        elif key == "link_speed":
            single[key] = min(v, single.get(key, v))  # link_speed>=a OR >=b: the smaller bound
        elif key in ("mode", "attach"):
            if single.get(key, v) != v:
                raise ParseError(
                    f"interface constraint {clip(key)} is given twice in {clip(label)} with different values; give it once"
                )
            single[key] = v
        elif v not in lists[key]:
            lists[key].append(v)
    names = lists.pop("name_in")
    mode = single.get("mode")
    if mode == "static" and not ips:
        raise ParseError(f"interface {clip(label)} has mode=static but no ip=; give the address with ip=")
    if ips and mode in ("dhcp", "link_up", "unconfigured"):
        raise ParseError(f"interface {clip(label)} has ip= and mode={mode}; an address needs mode=static (or no mode)")
    return InterfaceSpec(
        label=ifname,
        **{k: tuple(v) for k, v in lists.items()},
        name_in=tuple(names) if len(names) > 1 else (),
        name=names[0] if len(names) == 1 else None,
        ip=ips[0] if ips else None,
        more_ips=tuple(ips[1:]),
        mode=mode,  # type: ignore[arg-type]
        link_speed=single.get("link_speed"),  # type: ignore[arg-type]
        attach=single.get("attach"),  # type: ignore[arg-type]
    )


def _vid(label: str, key: str, val: str) -> int:
    """A VLAN id as MAAS reads it: decimal, 0x hex or 0b binary, or `untagged` (0); 0-4094."""
    text = val.lower()
    if key in ("vlan", "not_vlan") and text.startswith("vid:"):
        text = text[4:].strip()
    if text == "untagged":
        return 0
    m = re.fullmatch(r"(0x[0-9a-f]{1,4}|0b[01]{1,16}|[0-9]{1,5})", text)
    if m is None:
        if key in ("vlan", "not_vlan"):
            raise ParseError(
                f"vlan {clip(val)} in {clip(label)} is a MAAS VLAN name or object, which exist only in MAAS; "
                "give the VLAN id (vlan=100, vlan=0x64 or vlan=untagged)"
            )
        raise ParseError(f"{key} {clip(val)} in {clip(label)} is not a VLAN id; use 0-4094, 0x hex or untagged")
    vid = int(text, 0) if text.startswith(("0x", "0b")) else int(text)
    if not 0 <= vid <= 4094:
        raise ParseError(f"{key} {clip(val)} in {clip(label)} is out of range; VLAN ids are 0-4094 (0 for untagged)")
    return vid


def _check_iface_value(label: str, key: str, val: str):
    if key in ("subnet", "not_subnet", "subnet_cidr", "not_subnet_cidr"):
        text = val[5:].strip() if val.lower().startswith("cidr:") else val
        try:
            if "/" not in text:
                raise ValueError(text)
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ParseError(
                f"subnet {clip(val)} in {clip(label)} is not a CIDR; MAAS subnet names and ids exist only in MAAS, "
                "so give the subnet as a CIDR, e.g. 10.20.0.0/24"
            ) from None
    if key in ("vlan", "not_vlan", "vid", "not_vid"):
        return _vid(label, key, val)
    if key in ("ip", "not_ip"):
        try:
            return str(ipaddress.ip_address(val))
        except ValueError:
            raise ParseError(f"ip {clip(val)} in {clip(label)} is not an IP address; e.g. 10.20.0.50") from None
    if key == "type":
        kind = val.lower()
        if kind not in (*HOST_KINDS, "macvlan", "sriov"):
            raise ParseError(
                f"interface type {clip(val)} in {clip(label)} is not a host interface type; allowed: "
                f"{', '.join(HOST_KINDS)} (MAAS's meaning); how the guest attaches is attach={'|'.join(ATTACH_TYPES)}"
            )
        return kind
    if key == "attach":
        if val.lower() not in ATTACH_TYPES:
            raise ParseError(f"attach {clip(val)} in {clip(label)} is unknown; allowed: {', '.join(ATTACH_TYPES)}")
        return val.lower()
    if key == "mode":
        mode = val.lower()
        if mode not in INTERFACE_MODES:
            raise ParseError(f"mode {clip(val)} in {clip(label)} is unknown; allowed: {', '.join(INTERFACE_MODES)}")
        return None if mode == "auto" else mode
    if key == "link_speed":
        if not re.fullmatch(r"[0-9]{1,8}", val) or int(val) > MAX_LINK_SPEED:
            raise ParseError(
                f"link_speed {clip(val)} in {clip(label)} is not a speed; give Mbit/s from 0 to {MAX_LINK_SPEED}"
            )
        return int(val)
    if key in ("name", "not_name"):
        if not _IFNAME_RE.fullmatch(val):
            raise ParseError(f"interface name {clip(val)} in {clip(label)} is not a host interface name")
        return val
    if not _LABEL_RE.fullmatch(val):
        raise ParseError(f"space {clip(val)} in {clip(label)} is not a valid space name")
    return val


T = TypeVar("T")


class ParseCache(Generic[T]):
    """Values parsed from raw text (a VM's metadata), kept by that text: what did not change between two
    reads of the hypervisor is not parsed again, and comes back as the very same object (which is what
    lets a placement.UsageIndex skip it). Owned by its reader (a provider) and passed in explicitly,
    never module state. `end_read` after each full read forgets what that read did not see.
    """

    def __init__(self) -> None:
        self._last: dict[str, T] = {}
        self._this: dict[str, T] = {}

    def get(self, text: str, parse: Callable[[str], T]) -> T:
        value = self._this.get(text)
        if value is None:
            value = self._last.get(text)
            if value is None:
                value = parse(text)
            self._this[text] = value
        return value

    def end_read(self) -> None:
        self._last, self._this = self._this, {}
