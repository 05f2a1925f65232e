"""The data every part shares: what the host has, what a VM asks for, what it was given.

Plain frozen dataclasses with `from_dict`/`to_dict` in the JSON shapes of docs/design.md §4, so the
placement engine, the providers (which store allocations in hypervisor metadata), the CLI and the
charm all speak one language. Sizes are bytes, hugepages are page counts keyed by "2M"/"1G".

Over ~400 lines on purpose: the one shared vocabulary (design §4 JSON shapes, the compose plan and VM info)
lives in one file so every layer above imports the same names from one place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal, get_args

from vmhost.parse import (
    HUGEPAGE_SIZES,
    MAX_DISKS,
    MAX_INTERFACES,
    MAX_VM_CORES,
    MAX_VM_MEMORY,
    MIN_VM_MEMORY,
    DiskSpec,
    InterfaceSpec,
    ParseError,
    check_size,
    clip,
    parse_cpuset,
    parse_hugepage_size,
    parse_interfaces,
    parse_size,
    parse_storage,
    parse_vm_name,
)

__all__ = [
    "BOOT_MODES",
    "DEFAULT_LOGIN_USER",
    "HUGEPAGE_SIZES",
    "RATIO_BOUNDS",
    "Allocation",
    "BootMode",
    "Cell",
    "CloudInit",
    "ComposePlan",
    "Core",
    "DiskAllocation",
    "HostKey",
    "HostTopology",
    "HugepageAllocation",
    "HugepageSetting",
    "Nic",
    "NicAllocation",
    "NicType",
    "NumaNode",
    "Policy",
    "Quota",
    "StoragePool",
    "VmInfo",
    "VmRequest",
    "even_split",
    "overcommit_ratio",
]


def even_split(total: int, parts: int, unit: int = 1) -> list[int]:
    """`total` in `parts` shares that differ by at most `unit` (by one when `total` is not whole units),
    larger shares first: the lowest NUMA nodes take the remainder. The one rule for VMs and host pages."""
    if total % unit:
        unit = 1
    base, extra = divmod(total // unit, parts)
    return [(base + (1 if i < extra else 0)) * unit for i in range(parts)]


def _int(d: dict, key: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParseError(f"{key} {v!r} must be a whole number")
    return v


@dataclass(frozen=True)
class Core:
    """A physical core and its sibling hardware threads (host CPU ids)."""

    id: int
    threads: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: dict) -> Core:
        return cls(id=_int(d, "id"), threads=tuple(sorted(int(t) for t in d["threads"])))

    def to_dict(self) -> dict:
        return {"id": self.id, "threads": list(self.threads)}


@dataclass(frozen=True)
class NumaNode:
    """One NUMA node: its online cores, memory in bytes and hugepages (total pages per size)."""

    id: int
    memory: int
    cores: tuple[Core, ...]
    hugepages: dict[str, int] = field(default_factory=dict, hash=False)

    @classmethod
    def from_dict(cls, d: dict) -> NumaNode:
        pages = {parse_hugepage_size(k): int(v) for k, v in (d.get("hugepages") or {}).items()}
        return cls(
            id=_int(d, "id"),
            memory=int(parse_size(d.get("memory", 0))),
            cores=tuple(Core.from_dict(c) for c in d.get("cores", ())),
            hugepages=pages,
        )

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "memory": self.memory,
            "cores": [c.to_dict() for c in self.cores],
            "hugepages": dict(self.hugepages),
        }

    @property
    def threads(self) -> tuple[int, ...]:
        return tuple(t for c in self.cores for t in c.threads)

    def hugepage_bytes(self) -> int:
        return sum(HUGEPAGE_SIZES[s] * n for s, n in self.hugepages.items())


@dataclass(frozen=True)
class Nic:
    """A host network interface the VMs can attach to.

    `kind` is physical, bridge, vlan or bond; `bridge` is the bridge this interface is a port of;
    `vlan` its VLAN id when it is a VLAN interface (or the bridge carries one); `space` is the Juju
    space it serves, when known; `gateways` the routers the host reaches through it (never a VM's address);
    `link_speed` in Mbit/s when the kernel reports one (None: unknown, e.g. a bridge or a link that is down).
    """

    name: str
    numa_node: int | None = None
    sriov_max_vfs: int = 0
    bridge: str | None = None
    vlan: int | None = None
    addresses: tuple[str, ...] = ()
    space: str | None = None
    kind: str = "physical"
    gateways: tuple[str, ...] = ()
    link_speed: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> Nic:
        return cls(
            name=str(d["name"]),
            numa_node=d.get("numa_node"),
            sriov_max_vfs=int(d.get("sriov_max_vfs") or 0),
            bridge=d.get("bridge"),
            vlan=d.get("vlan"),
            addresses=tuple(d.get("addresses") or ()),
            space=d.get("space"),
            kind=d.get("kind") or "physical",
            gateways=tuple(d.get("gateways") or ()),
            link_speed=d.get("link_speed"),
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "numa_node": self.numa_node,
            "sriov_max_vfs": self.sriov_max_vfs,
            "bridge": self.bridge,
            "vlan": self.vlan,
            "addresses": list(self.addresses),
            "space": self.space,
            "kind": self.kind,
            "gateways": list(self.gateways),
            "link_speed": self.link_speed,
        }


@dataclass(frozen=True)
class StoragePool:
    """A storage pool as the hypervisor reports it (bytes)."""

    name: str
    driver: str = "dir"
    total: int = 0
    used: int = 0

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)

    @classmethod
    def from_dict(cls, d: dict) -> StoragePool:
        return cls(
            name=str(d["name"]),
            driver=str(d.get("driver") or "dir"),
            total=int(d.get("total") or 0),
            used=int(d.get("used") or 0),
        )

    def to_dict(self) -> dict:
        return {"name": self.name, "driver": self.driver, "total": self.total, "used": self.used}


@dataclass(frozen=True)
class HostTopology:
    """What the host has, as discovered by a provider (or made up by a test)."""

    nodes: tuple[NumaNode, ...]
    nics: tuple[Nic, ...] = ()
    storage_pools: tuple[StoragePool, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> HostTopology:
        return cls(
            nodes=tuple(NumaNode.from_dict(n) for n in d.get("nodes", ())),
            nics=tuple(Nic.from_dict(n) for n in d.get("nics", ()) or ()),
            storage_pools=tuple(StoragePool.from_dict(p) for p in d.get("storage_pools", ()) or ()),
        )

    def to_dict(self) -> dict:
        return {
            "nodes": [n.to_dict() for n in self.nodes],
            "nics": [n.to_dict() for n in self.nics],
            "storage_pools": [p.to_dict() for p in self.storage_pools],
        }

    def with_spaces(self, space_bridges: Mapping[str, str]) -> HostTopology:
        """This topology with each bridge NIC carrying the Juju space the operator mapped to it
        (`space-bridges`: space -> bridge); the hypervisor does not know spaces, the config does."""
        bridge_space = {bridge: space for space, bridge in space_bridges.items()}
        if not bridge_space:
            return self
        nics = tuple(replace(n, space=bridge_space[n.name]) if n.name in bridge_space else n for n in self.nics)
        return replace(self, nics=nics)

    @cached_property
    def thread_node(self) -> dict[int, int]:
        """Host CPU id -> NUMA node id, for every online thread."""
        return {t: n.id for n in self.nodes for t in n.threads}

    @cached_property
    def siblings(self) -> dict[int, tuple[int, ...]]:
        """Host CPU id -> all threads of its core."""
        return {t: c.threads for n in self.nodes for c in n.cores for t in c.threads}

    @property
    def threads(self) -> tuple[int, ...]:
        return tuple(sorted(self.thread_node))

    @cached_property
    def node_threads(self) -> dict[int, tuple[int, ...]]:
        """NUMA node id -> its online threads, sorted (computed once per topology)."""
        return {n.id: tuple(sorted(n.threads)) for n in self.nodes}

    def node(self, node_id: int) -> NumaNode:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)


def hugepages_flag(value: object) -> bool:
    """hugepages_backed as MAAS reads it (true/false/1/0, any case); MAAS read every other word as true."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0", ""):
        return False
    raise ParseError(
        f"hugepages_backed {str(value)[:40]!r} is not true or false (MAAS read every word but false and 0, "
        "even 'no', as true); write true or false"
    )


# MAAS's compose defaults (DEFAULT_COMPOSED_MEMORY, in MiB); cores: 1, or one per pinned CPU.
DEFAULT_MEMORY = "2048M"
_POOL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True)
class VmRequest:
    """What an operator (or a remote model) asks for. Parsed and checked on construction via from_dict."""

    cores: int
    memory: int
    pinned_cores: str | tuple[int, ...] | None = None
    hugepages_backed: bool = False
    hugepage_size: str | None = None
    storage: tuple[DiskSpec, ...] = ()
    interfaces: tuple[InterfaceSpec, ...] = ()
    name: str | None = None
    pool: str | None = None
    owner: str | None = None
    numa_nodes: int | None = None  # exactly this many NUMA nodes (1: never span); None: the fewest that hold it

    @classmethod
    def from_dict(cls, d: dict) -> VmRequest:
        cores = d.get("cores")
        if cores in (None, ""):
            cores = None  # MAAS: 1, or as many as pinned_cores lists
        elif isinstance(cores, str) and re.fullmatch(r"[0-9]{1,6}", cores.strip()):
            cores = int(cores)
        if cores is not None and (
            isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= MAX_VM_CORES
        ):
            raise ParseError(f"cores {clip(cores)} must be a whole number from 1 to {MAX_VM_CORES}")
        raw_memory = d.get("memory")
        if raw_memory in (None, ""):
            raw_memory = DEFAULT_MEMORY
        memory = parse_size(raw_memory, default_unit="M" if isinstance(raw_memory, str) else "")
        check_size(f"memory {clip(raw_memory)}", memory, MIN_VM_MEMORY, MAX_VM_MEMORY)
        pinned = d.get("pinned_cores")
        if pinned in (None, "", False):
            pinned = None
        elif isinstance(pinned, str) and pinned.strip().lower() == "auto":
            pinned = "auto"
        else:
            pinned = parse_cpuset(pinned)
            if cores is None:
                cores = len(pinned)  # as MAAS: one vCPU per pinned CPU
            if len(pinned) != cores:
                raise ParseError(
                    f"pinned_cores {clip(d.get('pinned_cores'))} lists {len(pinned)} CPUs but cores is {cores} "
                    "(MAAS ignored cores then); leave cores out or list one CPU per core"
                )
            if cores > MAX_VM_CORES:
                raise ParseError(f"pinned_cores lists {cores} CPUs; at most {MAX_VM_CORES} are allowed")
        cores = 1 if cores is None else cores
        numa_nodes = _numa_nodes(d.get("numa_nodes"), cores)
        hp_size = d.get("hugepage_size")
        hp_size = parse_hugepage_size(hp_size) if hp_size not in (None, "") else None
        backed = hugepages_flag(d.get("hugepages_backed")) or hp_size is not None
        if backed and hp_size and memory % HUGEPAGE_SIZES[hp_size]:
            raise ParseError(f"memory {clip(raw_memory)} is not a whole number of {hp_size} hugepages")
        storage = d["storage"] if isinstance(d.get("storage"), tuple) else parse_storage(d.get("storage"))
        interfaces = (
            d["interfaces"] if isinstance(d.get("interfaces"), tuple) else parse_interfaces(d.get("interfaces"))
        )
        # Parsed strings are counted by the parsers; specs built in code (the relation's) are counted here.
        if len(storage) > MAX_DISKS:
            raise ParseError(f"storage lists {len(storage)} disks; at most {MAX_DISKS} are allowed")
        if len(interfaces) > MAX_INTERFACES:
            raise ParseError(f"interfaces lists {len(interfaces)} interfaces; at most {MAX_INTERFACES} are allowed")
        pool = d.get("pool") or None
        if pool is not None and not (isinstance(pool, str) and _POOL_RE.fullmatch(pool)):
            raise ParseError(f"pool {clip(pool)} is not a pool name; use letters, digits, '-', '_' or '.' (at most 63)")
        return cls(
            cores=cores,
            memory=memory,
            pinned_cores=pinned,
            hugepages_backed=backed,
            hugepage_size=hp_size,
            storage=storage,
            interfaces=interfaces,
            name=parse_vm_name(d["name"]) if d.get("name") else None,
            pool=pool,
            owner=d.get("owner") or None,
            numa_nodes=numa_nodes,
        )

    def to_dict(self) -> dict:
        return {
            "cores": self.cores,
            "memory": self.memory,
            "pinned_cores": list(self.pinned_cores) if isinstance(self.pinned_cores, tuple) else self.pinned_cores,
            "hugepages_backed": self.hugepages_backed,
            "hugepage_size": self.hugepage_size,
            "storage": ",".join(d.to_str() for d in self.storage),
            "interfaces": ";".join(i.to_str() for i in self.interfaces),
            "name": self.name,
            "pool": self.pool,
            "owner": self.owner,
            "numa_nodes": self.numa_nodes,
        }

    @property
    def numa_bound(self) -> bool:
        """Pinned, hugepage and `numa_nodes` VMs are placed on NUMA nodes (rule 4); others float."""
        return self.pinned_cores is not None or self.hugepages_backed or self.numa_nodes is not None


MAX_NUMA_NODES = 64  # more than any host vm-host runs on has; the host's own node count is checked at placement


def _numa_nodes(value: object, cores: int) -> int | None:
    """`numa_nodes` (Nova's hw:numa_nodes): absent or empty for the fewest nodes, else a whole number of nodes."""
    if value is None or value == "":
        return None
    n = value
    if isinstance(n, str) and re.fullmatch(r"\s*[0-9]{1,3}\s*", n):
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NUMA_NODES:
        raise ParseError(f"numa_nodes {value!r} must be a whole number from 1 to {MAX_NUMA_NODES} (1: never span)")
    if n > cores:
        raise ParseError(f"numa_nodes {n} needs at least {n} cores (one per guest NUMA cell); cores is {cores}")
    return n


# Overcommit ratios an operator may set (README "Limits"): finite, and far enough from 0 and from
# infinity that capacity arithmetic stays exact in floats and ints.
@dataclass(frozen=True)
class HugepageSetting:
    """Pages of one size wanted on one NUMA node (node None: the host total, split evenly over nodes)."""

    size: str
    count: int
    node: int | None = None


@dataclass(frozen=True)
class Quota:
    """Per remote application limits for the vm-allocation relation (None: unlimited)."""

    vms: int | None = None
    cores: int | None = None
    memory: int | None = None
    storage: int | None = None  # bytes of disk, summed over the VMs' disks


RATIO_BOUNDS = {"cpu_overcommit_ratio": (0.1, 64.0), "memory_overcommit_ratio": (0.1, 4.0)}
MAX_RESERVED_MEMORY = 1024**5


def overcommit_ratio(key: str, raw: Any) -> float:
    """The ratio `raw` as a float inside RATIO_BOUNDS[key], else ParseError naming it and the range."""
    lo, hi = RATIO_BOUNDS[key]
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        value = math.nan
    if not lo <= value <= hi:  # also false for nan
        raise ParseError(f"{key} {clip(raw)} must be a number from {lo:g} to {hi:g} (1.0 means no overcommit)")
    return value


def _flag(value: object, key: str) -> bool:
    """A yes/no setting: a bool, or true/false/yes/no/1/0 as text (environment variables, CLI)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ParseError(f"{key} {str(value)[:40]!r} is not a yes/no value; use true or false")


@dataclass(frozen=True)
class Policy:
    """Operator policy: overcommit ratios, what the host keeps for itself, default pool."""

    cpu_overcommit_ratio: float = 1.0
    memory_overcommit_ratio: float = 1.0
    reserved_cores: tuple[int, ...] = ()
    reserved_memory: int = 0
    default_storage_pool: str | None = None
    # Keep running VMs made by others off pinned threads too (libvirt, live affinity only); off: report them.
    confine_foreign_vms: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> Policy:
        reserved = d.get("reserved_cores") or ()
        reserved_mem = d.get("reserved_memory", 0) or 0
        ratios = {key: overcommit_ratio(key, d.get(key, 1.0)) for key in RATIO_BOUNDS}
        # A bare number in a string is MiB, as for VM memory and the charm option (MAAS habit); ints are bytes.
        reserved_bytes = parse_size(reserved_mem, default_unit="M" if isinstance(reserved_mem, str) else "")
        return cls(
            **ratios,
            reserved_cores=parse_cpuset(reserved) if reserved else (),
            reserved_memory=check_size(f"reserved_memory {clip(reserved_mem)}", reserved_bytes, 0, MAX_RESERVED_MEMORY),
            default_storage_pool=d.get("default_storage_pool") or None,
            confine_foreign_vms=_flag(d.get("confine_foreign_vms", True), "confine_foreign_vms"),
        )

    def to_dict(self) -> dict:
        return {
            "cpu_overcommit_ratio": self.cpu_overcommit_ratio,
            "memory_overcommit_ratio": self.memory_overcommit_ratio,
            "reserved_cores": list(self.reserved_cores),
            "reserved_memory": self.reserved_memory,
            "default_storage_pool": self.default_storage_pool,
            "confine_foreign_vms": self.confine_foreign_vms,
        }


@dataclass(frozen=True, slots=True)
class HugepageAllocation:
    size: str
    per_node: dict[int, int] = field(hash=False)

    @property
    def pages(self) -> int:
        return sum(self.per_node.values())

    def to_dict(self) -> dict:
        return {"size": self.size, "per_node": {str(k): v for k, v in sorted(self.per_node.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> HugepageAllocation:
        return cls(size=parse_hugepage_size(d["size"]), per_node={int(k): int(v) for k, v in d["per_node"].items()})


@dataclass(frozen=True, slots=True)
class Cell:
    """A guest NUMA cell mirroring a host node: guest vCPU ids and memory placed on `node`."""

    node: int
    vcpus: tuple[int, ...]
    memory: int

    def to_dict(self) -> dict:
        return {"node": self.node, "vcpus": list(self.vcpus), "memory": self.memory}

    @classmethod
    def from_dict(cls, d: dict) -> Cell:
        return cls(node=int(d["node"]), vcpus=tuple(int(v) for v in d["vcpus"]), memory=int(d["memory"]))


@dataclass(frozen=True, slots=True)
class DiskAllocation:
    label: str
    size: int
    pool: str
    tags: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"label": self.label, "size": self.size, "pool": self.pool, "tags": list(self.tags)}

    @classmethod
    def from_dict(cls, d: dict) -> DiskAllocation:
        return cls(label=str(d["label"]), size=int(d["size"]), pool=str(d["pool"]), tags=tuple(d.get("tags") or ()))


NicType = Literal["bridge", "macvlan", "sriov", "network"]  # network: a hypervisor-managed network


@dataclass(frozen=True, slots=True)
class NicAllocation:
    """A guest NIC and what it attaches to on the host.

    type: bridge (parent is a bridge), macvlan (parent is a host interface), sriov (a VF of parent),
    network (parent is a hypervisor-managed network). `ip` and `more_ips` are the guest's static
    addresses; `mode` (dhcp, static, link_up, unconfigured; None: static with an ip, else dhcp) is how
    its cloud-init network config brings the interface up.
    """

    label: str
    type: NicType
    parent: str
    vlan: int | None = None
    ip: str | None = None
    mac: str | None = None
    numa_node: int | None = None
    more_ips: tuple[str, ...] = ()
    mode: str | None = None

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "type": self.type,
            "parent": self.parent,
            "vlan": self.vlan,
            "ip": self.ip,
            "mac": self.mac,
            "numa_node": self.numa_node,
            # Only when set: allocations stored before these existed read back equal.
            **({"more_ips": list(self.more_ips)} if self.more_ips else {}),
            **({"mode": self.mode} if self.mode else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> NicAllocation:
        return cls(
            label=str(d["label"]),
            type=str(d["type"]),
            parent=str(d["parent"]),
            vlan=d.get("vlan"),
            ip=d.get("ip"),
            mac=d.get("mac"),
            numa_node=d.get("numa_node"),
            more_ips=tuple(str(x) for x in d.get("more_ips") or ()),
            mode=d.get("mode"),
        )


@dataclass(frozen=True, slots=True)
class Allocation:
    """What a VM was given. Stored in the VM's hypervisor metadata; usage is recomputed from these.

    `pinned[i]` is the host thread of guest vCPU i. `cells` is empty for a floating VM.
    `threads_per_core` is the guest's SMT topology (2 when whole host cores were taken).
    `other` marks a VM made outside vm-host, counted from its own config.
    """

    name: str
    vcpus: int
    memory: int
    pinned: tuple[int, ...] | None = None
    numa_nodes: tuple[int, ...] = ()
    hugepages: HugepageAllocation | None = None
    disks: tuple[DiskAllocation, ...] = ()
    nics: tuple[NicAllocation, ...] = ()
    cells: tuple[Cell, ...] = ()
    threads_per_core: int = 1
    resource_pool: str | None = None  # the operator's grouping of VMs (MAAS's pool), never a storage pool
    owner: str | None = None
    other: bool = False

    @property
    def disk_bytes(self) -> int:
        """What its disks hold in all (the relation's storage quota counts it)."""
        return sum(disk.size for disk in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vcpus": self.vcpus,
            "memory": self.memory,
            "pinned": list(self.pinned) if self.pinned is not None else None,
            "numa_nodes": list(self.numa_nodes),
            "hugepages": self.hugepages.to_dict() if self.hugepages else None,
            "disks": [d.to_dict() for d in self.disks],
            "nics": [n.to_dict() for n in self.nics],
            "cells": [c.to_dict() for c in self.cells],
            "threads_per_core": self.threads_per_core,
            "resource_pool": self.resource_pool,
            "owner": self.owner,
            "other": self.other,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Allocation:
        return cls(
            name=str(d["name"]),
            vcpus=int(d["vcpus"]),
            memory=int(d["memory"]),
            pinned=tuple(int(t) for t in d["pinned"]) if d.get("pinned") is not None else None,
            numa_nodes=tuple(int(n) for n in d.get("numa_nodes") or ()),
            hugepages=HugepageAllocation.from_dict(d["hugepages"]) if d.get("hugepages") else None,
            disks=tuple(DiskAllocation.from_dict(x) for x in d.get("disks") or ()),
            nics=tuple(NicAllocation.from_dict(x) for x in d.get("nics") or ()),
            cells=tuple(Cell.from_dict(x) for x in d.get("cells") or ()),
            threads_per_core=int(d.get("threads_per_core") or 1),
            # "pool": the key VMs recorded before the rename carry
            resource_pool=d["resource_pool"] if "resource_pool" in d else d.get("pool"),
            owner=d.get("owner"),
            other=bool(d.get("other", False)),
        )


BootMode = Literal["network", "image"]  # network: PXE first, as MAAS did; image: from a disk image
BOOT_MODES: tuple[BootMode, ...] = get_args(BootMode)


@dataclass(frozen=True)
class CloudInit:
    """What reaches the guest through a cloud-init seed (NoCloud)."""

    hostname: str
    ssh_authorized_keys: tuple[str, ...] = ()
    user_data: str | None = field(default=None, repr=False)  # may hold secrets: never in a repr or a log


@dataclass(frozen=True)
class ComposePlan:
    """Everything a provider needs to make one VM: the allocation plus how it boots."""

    allocation: Allocation
    start: bool = False
    boot: BootMode = "network"
    image: str | None = None
    cloud_init: CloudInit | None = None
    # Host threads a floating VM may run on (those no VM pins, docs/design.md §4 rule 1); None leaves it unconfined.
    shared_threads: tuple[int, ...] | None = None


# The one login user vm-host's seed creates on every image (sudo, the given SSH keys), so a client knows
# whom to log in as without knowing the image; the same user Ubuntu's cloud images and Juju expect.
DEFAULT_LOGIN_USER = "ubuntu"


@dataclass(frozen=True)
class HostKey:
    """A VM's SSH host public key, generated by vm-host, so a client can pin it instead of trusting first use."""

    algorithm: str  # ssh-ed25519 | ecdsa-sha2-nistp256 | ssh-rsa
    public_key: str  # "<algorithm> <base64>", no comment
    fingerprint: str  # "SHA256:<base64>", as ssh-keygen -l prints it

    def to_dict(self) -> dict:
        return {"algorithm": self.algorithm, "public_key": self.public_key, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class VmInfo:
    """A VM as the hypervisor reports it, with the allocation read back from its metadata."""

    name: str
    state: str  # running | stopped | other hypervisor states, lower case
    allocation: Allocation
    managed: bool = True
    macs: tuple[str, ...] = ()
    phase: str = "ready"  # vm-host's own record: composing | decomposing until that finished, then ready
    # Where the VM can be reached: static ip= addresses at once, DHCP ones as the hypervisor learns them.
    addresses: tuple[str, ...] = ()
    login_user: str | None = None  # None: no seed (network boot), so vm-host knows no user
    host_keys: tuple[HostKey, ...] = ()

    def to_dict(self) -> dict:
        d = self.allocation.to_dict()
        d.update(
            name=self.name,
            state=self.state,
            managed=self.managed,
            mac_addresses=list(self.macs),
            phase=self.phase,
            addresses=list(self.addresses),
            login_user=self.login_user,
            host_keys=[k.to_dict() for k in self.host_keys],
        )
        return d
