"""The allocator: which host threads, NUMA nodes, hugepages, pools and NICs a new VM gets.

Pure and deterministic (no I/O; ties broken by node id, thread id, name). Usage is always
recomputed from the allocations the hypervisor reports (DESIGN.md §3), and placement uses the
very same `compute_usage` that the resources view shows, so the two can never disagree.

Rule 4's best fit (DESIGN.md §4, reworded by issue 12): among the node sets that hold the VM, split
evenly over the fewest nodes (or exactly `numa_nodes`), each node is scored by the shares of its
threads and of its memory (general memory and hugepages of every size together, in bytes) that it
would have left free: first the node whose two shares end up closest (to the percent), so no node is
left with threads but no memory or memory but no threads; then the one left fullest. The same score
gives a spanning VM's larger shares to nodes. SR-IOV locality and not splitting a whole core come first.

Cost (rule 6): nodes are never permuted. For k = 1, 2, ... nodes, counting the nodes that can
take the low and the high even shares decides exactly whether some k nodes hold the VM, and the
best-fitting such k are taken in one sorted pass (O(nodes log nodes) per k; see `_choose`). Summing
2,000 residents costs about a millisecond; a caller deciding repeatedly passes a `UsageIndex`, which
counts again only the VMs that changed since its last call.

Over ~400 lines for now, not on purpose: it holds usage accounting, NIC resolution, disks and NUMA
fitting, which issue 11 (item 1) splits into a `vmhost.placement` package; until then the four parts
follow each other in that order and share only the usage snapshot.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import filterfalse
from types import MappingProxyType
from typing import Any

from vmhost import nic_match
from vmhost.model import (
    Allocation,
    Cell,
    DiskAllocation,
    HostTopology,
    HugepageAllocation,
    Nic,
    NicAllocation,
    Policy,
    VmRequest,
    even_split,
)
from vmhost.parse import DEFAULT_ROOT_DISK, HUGEPAGE_SIZES, InterfaceSpec, format_cpuset, human_size

__all__ = ["HostUsage", "NodeUsage", "PlacementError", "UsageIndex", "compute_usage", "place"]

DEFAULT_NAME = "vm"
# Largest first: fewer, bigger pages mean fewer TLB misses.
_SIZES_LARGEST_FIRST = tuple(sorted(HUGEPAGE_SIZES, key=HUGEPAGE_SIZES.__getitem__, reverse=True))
_MACVLAN_KINDS = ("physical", "vlan", "bond")
_EPS = 1e-9


class PlacementError(ValueError):
    """The host cannot hold the request; `str(e)` says what is short, where and by how much."""


# ---------------------------------------------------------------------------------------------
# Usage


@dataclass(frozen=True)
class NodeUsage:
    """One NUMA node's capacity and use, as placement and the resources view see it."""

    node: int
    threads: tuple[int, ...]
    reserved: tuple[int, ...]
    pinned: Mapping[int, str] = field(hash=False)
    free_threads: tuple[int, ...]
    hugepages: Mapping[str, tuple[int, int]] = field(hash=False)  # size -> (total, used)
    memory_capacity: int  # general memory (not hugepages, not reserved) times the overcommit ratio
    memory_bound: int  # general memory of NUMA-bound VMs placed on this node
    vms: tuple[str, ...]

    def hugepages_free(self, size: str) -> int:
        total, used = self.hugepages.get(size, (0, 0))
        return max(0, total - used)

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_capacity - self.memory_bound)

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "threads": list(self.threads),
            "reserved": list(self.reserved),
            "pinned": {str(t): n for t, n in sorted(self.pinned.items())},
            "free_threads": list(self.free_threads),
            "hugepages": {s: {"total": t, "used": u, "free": max(0, t - u)} for s, (t, u) in self.hugepages.items()},
            "memory_capacity": self.memory_capacity,
            "memory_bound": self.memory_bound,
            "memory_free": self.memory_free,
            "vms": list(self.vms),
        }


@dataclass(frozen=True)
class HostUsage:
    """Host-wide capacity and use: per node, shared vCPUs, general memory, VFs and pools."""

    nodes: tuple[NodeUsage, ...]
    shared_vcpus_used: int
    shared_vcpus_capacity: int  # floor((threads neither reserved nor pinned) * cpu_overcommit_ratio)
    memory_used: int  # general memory of every VM that is not hugepage-backed
    memory_capacity: int  # (memory - hugepages - reserved) * memory_overcommit_ratio
    vfs_used: Mapping[str, int] = field(hash=False)  # NIC -> SR-IOV VFs in use
    storage_committed: Mapping[str, int] = field(hash=False)  # pool -> bytes of our allocations' disks
    vms: int = 0

    @property
    def shared_vcpus_free(self) -> int:
        return max(0, self.shared_vcpus_capacity - self.shared_vcpus_used)

    @property
    def memory_free(self) -> int:
        return max(0, self.memory_capacity - self.memory_used)

    @property
    def pinned(self) -> dict[int, str]:
        return {t: n for nu in self.nodes for t, n in nu.pinned.items()}

    def node(self, node_id: int) -> NodeUsage:
        for n in self.nodes:
            if n.node == node_id:
                return n
        raise KeyError(node_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [n.to_dict() for n in self.nodes],
            "shared_vcpus": {
                "used": self.shared_vcpus_used,
                "capacity": self.shared_vcpus_capacity,
                "free": self.shared_vcpus_free,
            },
            "memory": {"used": self.memory_used, "capacity": self.memory_capacity, "free": self.memory_free},
            "vfs_used": dict(sorted(self.vfs_used.items())),
            "storage_committed": dict(sorted(self.storage_committed.items())),
            "vms": self.vms,
        }


class _Totals:
    """What a set of allocations takes, summed; can be updated by adding and removing allocations."""

    def __init__(self) -> None:
        self.pinned: dict[int, str] = {}
        self.shared = 0
        self.memory = 0
        self.node_memory: dict[int, int] = {}
        self.pages: dict[tuple[str, int], int] = {}
        self.node_vms: dict[int, list[str]] = {}
        self.vfs: dict[str, int] = {}
        self.disks: dict[str, int] = {}
        self.count = 0
        self.conflict = False  # two VMs pin one thread (only VMs made by others can): no removal then

    def add(self, allocations: Iterable[Allocation], sign: int = 1) -> None:
        """One pass; floating VMs (the many) take the short path. sign=-1 removes."""
        pinned, node_memory, pages, node_vms = self.pinned, self.node_memory, self.pages, self.node_vms
        shared = memory = count = 0
        for a in allocations:
            count += 1
            hp = a.hugepages
            if a.pinned is None and hp is None and not a.numa_nodes and not a.cells:
                # Floating VMs are most of a busy host: shared vCPUs and general memory only.
                shared += a.vcpus
                memory += a.memory
                if a.nics or a.disks:
                    self._devices(a, sign)
                continue
            if a.pinned is None:
                shared += a.vcpus
            elif sign > 0:
                for t in a.pinned:
                    if pinned.setdefault(t, a.name) != a.name:
                        self.conflict = True
            else:
                for t in a.pinned:
                    if pinned.get(t) == a.name:
                        del pinned[t]
            if hp is None:
                memory += a.memory
            nodes = a.numa_nodes or (tuple(hp.per_node) if hp is not None else tuple({c.node for c in a.cells}))
            if nodes:
                if hp is not None:
                    size = hp.size
                    for n, p in hp.per_node.items():
                        pages[size, n] = pages.get((size, n), 0) + sign * p
                elif a.cells:
                    for c in a.cells:
                        node_memory[c.node] = node_memory.get(c.node, 0) + sign * c.memory
                else:
                    for n, b in zip(nodes, even_split(a.memory, len(nodes), 1024), strict=True):
                        node_memory[n] = node_memory.get(n, 0) + sign * b
                for n in nodes:
                    vms = node_vms.get(n)
                    if sign < 0:
                        if vms is not None and a.name in vms:
                            vms.remove(a.name)
                    elif vms is None:
                        node_vms[n] = [a.name]
                    else:
                        vms.append(a.name)
            if a.nics or a.disks:
                self._devices(a, sign)
        self.shared += sign * shared
        self.memory += sign * memory
        self.count += sign * count

    def _devices(self, a: Allocation, sign: int) -> None:
        for nic in a.nics:
            if nic.type == "sriov":
                self.vfs[nic.parent] = self.vfs.get(nic.parent, 0) + sign
        for d in a.disks:
            self.disks[d.pool] = self.disks.get(d.pool, 0) + sign * d.size


class _State:
    """Usage of one (host, totals, policy) plus what placement derives from it, computed once.

    `prev` and `touched`: a state these totals were updated from, and the nodes the update touched;
    what the others had (their NodeUsage, their free cores and amounts) is taken over unchanged.
    """

    def __init__(
        self, host: HostTopology, policy: Policy, totals: _Totals, prev: _State | None = None, touched=frozenset()
    ):
        self.host = host
        self.policy = policy
        self.totals = totals
        self.prev, self.touched = prev, touched
        self.usage = _compute_usage(host, totals, policy, prev.usage if prev else None, touched)
        self.node_free: dict[tuple[bool, str | None], list[_NodeFree]] = {}


class UsageIndex:
    """Usage of one host kept by VM name and content between decisions: opt-in, owned and passed in by
    its caller (the service keeps one per VmHost), never module state, so placement stays pure.

    Each call compares the allocations it is given with those it holds, by name: the very object
    (a parse cache hands back the same object for unchanged metadata) or an equal one costs a lookup,
    and only the VMs that appeared, changed or went are added to or taken from the totals. Another
    host or policy, a VM name seen twice or a thread pinned twice rebuilds from scratch.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, Allocation] = {}
        self._seq: tuple[Allocation, ...] = ()  # the allocations of the last call, as given
        self._state: _State | None = None

    def state(self, host: HostTopology, allocations: Iterable[Allocation], policy: Policy) -> _State:
        allocations = allocations if isinstance(allocations, tuple) else tuple(allocations)
        st = self._state
        if st is None or st.policy != policy or (host is not st.host and host != st.host):
            return self._rebuild(host, allocations, policy)
        if allocations == self._seq:  # the same objects again: one identity test each, in C
            return st
        self._seq = allocations
        by_name = self._by_name
        gone = by_name.copy()
        added: list[Allocation] = []
        removed: list[Allocation] = []
        for a in allocations:
            old = gone.pop(a.name, None)
            if old is a:
                continue
            if old is None:
                if a.name in by_name:  # a name seen twice: no per-name bookkeeping can hold that
                    return self._rebuild(host, allocations, policy)
                added.append(a)
            elif old == a:
                by_name[a.name] = a  # equal content in a new object: nothing to count
            else:
                removed.append(old)
                added.append(a)
        removed += gone.values()
        if not added and not removed:
            return st
        if st.totals.conflict:
            return self._rebuild(host, allocations, policy)
        totals = st.totals  # the old state is replaced below, so its totals can be updated in place
        totals.add(removed, -1)
        totals.add(added)
        for a in gone.values():
            del by_name[a.name]
        for a in added:
            by_name[a.name] = a
        touched = _nodes_of(st.host, (*removed, *added))
        st.prev = None  # the chain is one state long: its node tables are taken over, not kept
        # An equal host keeps the object already measured (its derived tables are cached on it).
        self._state = _State(st.host, policy, totals, st, touched)
        return self._state

    def _rebuild(self, host: HostTopology, allocations: tuple[Allocation, ...], policy: Policy) -> _State:
        by_name = {a.name: a for a in allocations}
        st = _state(host, allocations, policy, None)
        # Duplicate names cannot be tracked by name: such a state is used once and never updated.
        ok = len(by_name) == len(allocations)
        self._by_name, self._seq, self._state = (by_name, allocations, st) if ok else ({}, (), None)
        return st


def _nodes_of(host: HostTopology, allocations: Iterable[Allocation]) -> frozenset[int]:
    """The NUMA nodes whose use these allocations change (none for floating VMs)."""
    out: set[int] = set()
    thread_node = host.thread_node
    for a in allocations:
        out.update(a.numa_nodes)
        out.update(c.node for c in a.cells)
        if a.hugepages is not None:
            out.update(a.hugepages.per_node)
        if a.pinned is not None:
            out.update(thread_node.get(t, -1) for t in a.pinned)
    return frozenset(out)


def _state(host: HostTopology, allocations: Iterable[Allocation], policy: Policy, index: UsageIndex | None) -> _State:
    if index is not None:
        return index.state(host, allocations, policy)
    totals = _Totals()
    totals.add(allocations)
    return _State(host, policy, totals)


def _shared_capacity(free_threads: int, ratio: float) -> int:
    return max(0, math.floor(free_threads * ratio + _EPS))


def compute_usage(
    host: HostTopology, allocations: Iterable[Allocation], policy: Policy, *, index: UsageIndex | None = None
) -> HostUsage:
    """Capacity and use per NUMA node and host-wide, from the host and every VM on it (ours or not).

    With an `index`, only what changed since its last call is counted again (the result is then
    shared with later calls: treat it as read-only).
    """
    return _state(host, allocations, policy, index).usage


def _compute_usage(
    host: HostTopology, t: _Totals, policy: Policy, prev: HostUsage | None = None, touched=frozenset()
) -> HostUsage:
    reserved = set(policy.reserved_cores)
    thread_node = host.thread_node
    node_threads = host.node_threads
    node_names: dict[int, set[str]] = {n: set(v) for n, v in t.node_vms.items() if v}
    node_pinned: dict[int, dict[int, str]] = {}  # one pass over pinned threads, not over every thread
    for th, name in t.pinned.items():
        n = thread_node.get(th)
        if n is not None:
            node_names.setdefault(n, set()).add(name)
            node_pinned.setdefault(n, {})[th] = name
    n_nodes = max(1, len(host.nodes))
    reserved_share = even_split(policy.reserved_memory, n_nodes)
    mem_ratio = policy.memory_overcommit_ratio
    nodes = []
    free_total = 0
    for i, node in enumerate(host.nodes):
        if prev is not None and node.id not in touched:
            nodes.append(prev.nodes[i])
            free_total += len(prev.nodes[i].free_threads)
            continue
        threads = node_threads[node.id]
        pinned = dict(sorted(node_pinned.get(node.id, {}).items()))
        if reserved:
            res = tuple(th for th in threads if th in reserved)
            blocked = reserved | pinned.keys()
        else:
            res, blocked = (), pinned.keys()
        free = tuple(filterfalse(blocked.__contains__, threads)) if blocked else threads
        free_total += len(free)
        sizes = sorted(set(node.hugepages) | {s for s, n in t.pages if n == node.id}, key=HUGEPAGE_SIZES.get)
        hp = {s: (node.hugepages.get(s, 0), t.pages.get((s, node.id), 0)) for s in sizes}
        general = node.memory - node.hugepage_bytes() - reserved_share[i]
        nodes.append(
            NodeUsage(
                node=node.id,
                threads=threads,
                reserved=res,
                pinned=MappingProxyType(pinned),
                free_threads=free,
                hugepages=MappingProxyType(hp),
                memory_capacity=max(0, int(general * mem_ratio)),
                memory_bound=t.node_memory.get(node.id, 0),
                vms=tuple(sorted(node_names.get(node.id, ()))),
            )
        )
    general_total = sum(n.memory - n.hugepage_bytes() for n in host.nodes) - policy.reserved_memory
    return HostUsage(
        nodes=tuple(nodes),
        shared_vcpus_used=t.shared,
        shared_vcpus_capacity=_shared_capacity(free_total, policy.cpu_overcommit_ratio),
        memory_used=t.memory,
        memory_capacity=max(0, int(general_total * mem_ratio)),
        vfs_used=MappingProxyType({k: v for k, v in t.vfs.items() if v}),
        storage_committed=MappingProxyType({k: v for k, v in t.disks.items() if v}),
        vms=t.count,
    )


# ---------------------------------------------------------------------------------------------
# Messages


def _gb(n: int) -> str:
    """Disks are sized in decimal GB (MAAS storage syntax)."""
    return f"{round(n / 10**9, 2):g} GB"


def _per_node(values: Sequence[tuple[int, str]]) -> str:
    """ "node 0 has 1024 free, node 1 has 0" (rule 7's form)."""
    parts = [f"node {n} has {v}" + (" free" if i == 0 else "") for i, (n, v) in enumerate(values)]
    return ", ".join(parts) if parts else "the host has no NUMA nodes"


# ---------------------------------------------------------------------------------------------
# Interfaces


@dataclass
class _Iface:
    spec: InterfaceSpec
    type: str  # bridge | network | macvlan | sriov
    nics: list[Nic]  # candidates, best first (bridge/macvlan use the first)
    fallback: list[Nic]  # macvlan candidates when SR-IOV was only preferred, not forced


def _contains_ip(nic: Nic, ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return any(i is not None and i.version == addr.version and addr in i.network for i in map(_iface, nic.addresses))


def _describe(s: InterfaceSpec) -> str:
    body = s.to_str().split(":", 1)[1]
    return body or "no constraints"


def _resolve_interfaces(host: HostTopology, specs: Sequence[InterfaceSpec], vfs_used: dict[str, int]) -> list[_Iface]:
    by_name = {n.name: n for n in host.nics}
    out = []
    for s in specs:
        matched = [n for n in host.nics if nic_match.matches(n, s)]
        if s.ips:  # every address on the interface's subnets (MAAS ORed them and moved the NIC to the last one's VLAN)
            matched = [
                n for n in matched if all(_contains_ip(n, ip) or _bridge_contains(by_name, n, ip) for ip in s.ips)
            ]
        if not matched:
            why = f" with subnets containing ip {' and '.join(s.ips)}" if s.ips else ""
            known = ", ".join(sorted(by_name)) or "none"
            unknown = nic_match.unknown_speeds(host.nics, s)
            speed = f" (link speed unknown on {', '.join(unknown)})" if unknown else ""
            raise PlacementError(
                f"interface {s.label}: no host interface matches {_describe(s)}{why}{speed}; host interfaces: {known}"
            )
        bridges: dict[str, Nic] = {}
        for n in matched:
            if n.kind == "bridge":
                bridges[n.name] = n
            elif n.bridge:  # a port attaches through its bridge, which must pass the filters too
                parent = by_name.get(n.bridge) or Nic(name=n.bridge, kind="bridge")
                if nic_match.matches(parent, s, as_bridge_of_port=True):
                    bridges.setdefault(n.bridge, parent)
        bridge = sorted(bridges.values(), key=lambda n: n.name)
        # Hypervisor-managed networks (libvirt's "default" NAT network, say) attach like a bridge.
        networks = sorted((n for n in matched if n.kind == "network"), key=lambda n: n.name)
        sriov = sorted(
            (n for n in matched if n.sriov_max_vfs > 0),
            key=lambda n: (vfs_used.get(n.name, 0) - n.sriov_max_vfs, n.name),
        )
        macvlan = sorted((n for n in matched if n.kind in _MACVLAN_KINDS and not n.bridge), key=lambda n: n.name)
        if s.ips:
            bridge = [n for n in bridge if all(_contains_ip(n, ip) for ip in s.ips)] or bridge
        free_sriov = [n for n in sriov if vfs_used.get(n.name, 0) < n.sriov_max_vfs]
        names = ", ".join(sorted(n.name for n in matched))
        if s.attach == "bridge" or (s.attach is None and (bridge or networks)):
            if bridge:
                out.append(_Iface(s, "bridge", bridge, []))
            elif networks:
                out.append(_Iface(s, "network", networks, []))
            else:
                raise PlacementError(f"interface {s.label}: no bridge matches {_describe(s)}; matching: {names}")
        elif s.attach == "sriov" or (s.attach is None and free_sriov):
            if not free_sriov:
                full = ", ".join(f"{n.name} {vfs_used.get(n.name, 0)}/{n.sriov_max_vfs}" for n in sriov)
                raise PlacementError(
                    f"interface {s.label}: sriov needs a free VF on a NIC matching {_describe(s)}; "
                    + (f"all VFs are in use ({full})" if sriov else f"none of {names} has SR-IOV VFs")
                )
            out.append(_Iface(s, "sriov", free_sriov, macvlan if s.attach is None else []))
        else:
            if not macvlan:
                ports = sorted(f"{n.name} is a port of bridge {n.bridge}" for n in matched if n.bridge)
                why = (
                    f" ({'; '.join(ports)}: macvlan cannot use a bridge port, attach through the bridge)"
                    if ports
                    else ""
                )
                raise PlacementError(
                    f"interface {s.label}: no physical or VLAN interface for macvlan matches {_describe(s)}; "
                    f"matching: {names}{why}"
                )
            out.append(_Iface(s, "macvlan", macvlan, []))
    return out


def _check_addresses(host: HostTopology, allocations: Sequence[Allocation], specs: Sequence[InterfaceSpec]) -> None:
    """A static ip is one no one else has: not a subnet's network or broadcast address, not the host's own
    or a gateway's, not another VM's (whoever made it) nor another NIC's of this VM."""
    wanted = [(s.label, _ip(ip)) for s in specs for ip in s.ips]
    if not wanted:
        return
    given: dict[Any, str] = {}
    for a in allocations:
        for n in a.nics:
            if n.ip and (ip := _ip(n.ip)) is not None:
                given.setdefault(ip, a.name)
    for i, (label, ip) in enumerate(wanted):
        why = next(filter(None, (_host_conflict(nic, ip) for nic in host.nics)), None)
        if why is None and ip in given:
            why = f"is already given to VM {given[ip]}"
        if why is None and (twice := next((lb for lb, other in wanted[:i] if other == ip), None)):
            why = f"is already given to interface {twice} of this VM"
        if why:
            raise PlacementError(f"interface {label}: ip {ip} {why}; choose another address")


def _host_conflict(nic: Nic, ip: Any) -> str | None:
    """Why `ip` is not free on the subnets of host interface `nic` (None when it is)."""
    for addr in nic.addresses:
        iface = _iface(addr)
        if iface is None or iface.version != ip.version:
            continue
        net = iface.network
        if ip == iface.ip:
            return f"is an address of this host ({nic.name})"
        if ip in net and net.num_addresses > 2:
            if ip == net.network_address:
                return f"is the network address of {net}"
            if net.version == 4 and ip == net.broadcast_address:
                return f"is the broadcast address of {net}"
    if any(_ip(g) == ip for g in nic.gateways):
        return f"is the gateway on {nic.name}"
    return None


def _iface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        return None


def _ip(text: str) -> Any:
    """The address of "10.0.0.5" or "10.0.0.5/24" (allocations may carry a prefix); None when malformed."""
    iface = _iface(text)
    return iface.ip if iface is not None else None


def _bridge_contains(by_name: dict[str, Nic], nic: Nic, ip: str) -> bool:
    parent = by_name.get(nic.bridge) if nic.bridge else None
    return parent is not None and _contains_ip(parent, ip)


def _assign_vfs(ifaces: Sequence[_Iface], nodes: set[int] | None, vfs_used: dict[str, int]) -> dict[str, Nic] | None:
    """A VF per SR-IOV interface, local to `nodes` (None: anywhere); None when impossible."""
    left: dict[str, int] = {}
    out: dict[str, Nic] = {}
    for f in ifaces:
        if f.type != "sriov":
            continue
        best = None
        for n in f.nics:
            if nodes is not None and n.numa_node is not None and n.numa_node not in nodes:
                continue
            free = left.get(n.name, n.sriov_max_vfs - vfs_used.get(n.name, 0))
            if free > 0 and (
                best is None or free > left.get(best.name, best.sriov_max_vfs - vfs_used.get(best.name, 0))
            ):
                best = n
        if best is None:
            return None
        left[best.name] = left.get(best.name, best.sriov_max_vfs - vfs_used.get(best.name, 0)) - 1
        out[f.spec.label] = best
    return out


def _nic_allocations(ifaces: Sequence[_Iface], vfs: dict[str, Nic]) -> tuple[NicAllocation, ...]:
    out = []
    for f in ifaces:
        nic = vfs[f.spec.label] if f.type == "sriov" else f.nics[0]
        out.append(
            NicAllocation(
                label=f.spec.label,
                type=f.type,
                parent=nic.name,
                vlan=nic.vlan,
                ip=f.spec.ip,
                numa_node=nic.numa_node,
                more_ips=f.spec.more_ips,
                mode=f.spec.mode,
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Storage


def _place_disks(host: HostTopology, request: VmRequest, policy: Policy, committed: dict[str, int]):
    pools = {p.name: p for p in host.storage_pools}
    taken: dict[str, int] = {}

    def free(name: str) -> int:
        p = pools[name]
        return p.total - max(p.used, committed.get(name, 0)) - taken.get(name, 0)

    out = []
    # No storage asked for: MAAS's default root disk, where the host has somewhere to put it.
    for d in request.storage or ((DEFAULT_ROOT_DISK,) if pools else ()):
        named = [t for t in d.tags if t in pools]
        if named:
            pool = named[0]
            why = f"tagged {pool}"
        elif policy.default_storage_pool:
            pool = policy.default_storage_pool
            why = "the default pool"
            if pool not in pools:
                raise PlacementError(
                    f"disk {d.label}: default storage pool {pool!r} does not exist; pools: {', '.join(pools) or 'none'}"
                )
        else:
            fits = [p for p in pools if free(p) >= d.size]
            if not fits:
                have = (
                    ", ".join(f"{p} has {_gb(max(0, free(p)))} free" for p in pools) or "the host has no storage pools"
                )
                raise PlacementError(f"disk {d.label}: need {_gb(d.size)} in one pool, {have}")
            pool, why = fits[0], ""
        if free(pool) < d.size:
            raise PlacementError(
                f"disk {d.label}: need {_gb(d.size)} in pool {pool} ({why}), it has {_gb(max(0, free(pool)))} free"
            )
        taken[pool] = taken.get(pool, 0) + d.size
        out.append(DiskAllocation(label=d.label, size=d.size, pool=pool, tags=d.tags))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# NUMA placement


@dataclass
class _NodeFree:
    """What one node can still give a NUMA-bound VM."""

    id: int
    whole: list[tuple[int, ...]]  # cores with every thread free
    lone: list[int]  # free threads of partly used cores
    amount: int  # free hugepages of the requested size, or free general memory (bytes)
    threads: int = 0
    core_size: int = 0  # threads per whole core when all are alike, else 0
    # For the fit measure (rule 4): capacities and what the other memory pools have free, in bytes.
    thread_cap: int = 0  # threads not reserved
    unit_bytes: int = 1  # bytes per unit of `amount`
    other_free: int = 0  # free bytes of every memory pool the request does not draw on
    memory_cap: int = 0  # bytes of every memory pool (general capacity + all hugepages)
    free_threads: int = 0  # every free thread, also for an unpinned request (which takes none)

    def __post_init__(self) -> None:
        self.threads = sum(map(len, self.whole)) + len(self.lone)
        sizes = {len(c) for c in self.whole}
        self.core_size = sizes.pop() if len(sizes) == 1 else 0

    def left(self, c: int, a: int) -> tuple[float, float]:
        """The fit measure (rule 4) after taking `c` threads and `a` units here, lower is better.

        t and m are the shares of the node's threads and of its memory (every pool: general memory and
        hugepages of each size, in bytes) left free. First: |t - m| to the percent, so the node keeps
        threads and memory in proportion and neither is stranded without the other; then t + m, so
        among balanced nodes the fullest is filled (best fit).
        """
        t = (self.free_threads - c) / self.thread_cap if self.thread_cap else 0.0
        m = ((self.amount - a) * self.unit_bytes + self.other_free) / self.memory_cap if self.memory_cap else 0.0
        return round(abs(t - m), 2), t + m

    def breaks(self, n: int) -> int:
        """How many whole cores taking `n` threads would split (0 or 1); arithmetic when cores are alike."""
        if self.core_size:
            rem = n - min(len(self.whole), n // self.core_size) * self.core_size
            return 1 if rem > len(self.lone) else 0
        return 1 if self._pick(n)[1] else 0

    def pick(self, n: int) -> tuple[list[int], bool]:
        return self._pick(n)

    def _pick(self, n: int) -> tuple[list[int], bool]:
        """Whole cores first, then lone threads, then (only for a remainder) split a core."""
        got: list[int] = []
        used: set[int] = set()
        rem = n
        for i, core in enumerate(self.whole):
            if len(core) <= rem:
                got.extend(core)
                used.add(i)
                rem -= len(core)
                if not rem:
                    return got, False
        take = self.lone[:rem]
        got.extend(take)
        rem -= len(take)
        split = False
        for i, core in enumerate(self.whole):
            if not rem:
                break
            if i not in used:
                got.extend(core[:rem])
                rem -= min(rem, len(core))
                split = True
        return got, split


@dataclass
class _Need:
    """A NUMA-bound request, reduced to numbers."""

    vcpus: int
    pin: bool
    size: str | None  # hugepage size, None for general memory
    amount: int  # pages (hugepages) or bytes (general memory)
    unit: int  # split granularity of `amount`
    nodes: int | None = None  # exactly this many nodes (the request's numa_nodes); None: the fewest

    def spans(self, n_nodes: int) -> range:
        """The node counts to try, fewest first: each guest cell needs a vCPU and a unit of memory."""
        top = min(n_nodes, self.vcpus, self.amount // self.unit)
        if self.nodes is not None:
            return range(self.nodes, self.nodes + 1) if self.nodes <= top else range(0)
        return range(1, top + 1)


def _node_free(st: _State, need: _Need) -> list[_NodeFree]:
    """Per node: free whole cores, lone threads and the free amount the request draws on (cached per state)."""
    key = (need.pin, need.size)
    got = st.node_free.get(key)
    if got is None:
        old = st.prev.node_free.get(key) if st.prev is not None else None
        got = st.node_free[key] = _node_free_uncached(st.host, st.usage, need, old, st.touched)
    return got


def _node_free_uncached(
    host: HostTopology, usage: HostUsage, need: _Need, old: list[_NodeFree] | None = None, touched=frozenset()
) -> list[_NodeFree]:
    """`old`: the same table of a previous state, taken over for the nodes not `touched` since."""
    out = []
    unit_bytes = HUGEPAGE_SIZES[need.size] if need.size else 1
    for i, (node, nu) in enumerate(zip(host.nodes, usage.nodes, strict=False)):
        if old is not None and node.id not in touched:
            out.append(old[i])
            continue
        whole: list[tuple[int, ...]] = []
        lone: list[int] = []
        if need.pin:
            if len(nu.free_threads) == len(nu.threads):
                whole = [core.threads for core in node.cores]
            else:
                free = set(nu.free_threads)
                for core in node.cores:
                    if free.issuperset(core.threads):
                        whole.append(core.threads)
                    else:
                        lone.extend(t for t in core.threads if t in free)
            whole.sort()
            lone.sort()
        amount = nu.hugepages_free(need.size) if need.size else nu.memory_free
        pages = {s: (HUGEPAGE_SIZES[s] * t, HUGEPAGE_SIZES[s] * max(0, t - u)) for s, (t, u) in nu.hugepages.items()}
        other = sum(free for s, (_, free) in pages.items() if s != need.size)
        out.append(
            _NodeFree(
                nu.node,
                whole,
                lone,
                amount,
                thread_cap=len(nu.threads) - len(nu.reserved),
                unit_bytes=unit_bytes,
                other_free=other + (nu.memory_free if need.size else 0),
                memory_cap=nu.memory_capacity + sum(t for t, _ in pages.values()),
                free_threads=len(nu.free_threads),
            )
        )
    return out


def _klass(n: _NodeFree, r_c: int, hi_c: int, r_a: int, hi_a: int) -> int:
    """2 * (can take the high vCPU share) + (can take the high amount share); always can when none is asked."""
    return ((not r_c or n.threads >= hi_c) << 1) | (not r_a or n.amount >= hi_a)


def _completes(counts: list[int], k: int, c: int, a: int) -> bool:
    """Whether `k` nodes can be taken from a pool with `counts` per class so that at least `c` of them
    take the high vCPU share and at least `a` the high amount share.

    Classes (index = 2 * vCPU-high + amount-high): 0 low only, 1 amount high, 2 vCPU high, 3 both.
    Nodes of class 3 count for both, so `c + a - k` of them are needed when c + a exceeds k.
    """
    c, a = max(c, 0), max(a, 0)
    both = counts[3]
    return (
        c <= k and a <= k and sum(counts) >= k and both + counts[2] >= c and both + counts[1] >= a and c + a - k <= both
    )


def _take(cls: list[int], k: int, r_c: int, r_a: int, first: int | None) -> list[int]:
    """Positions of the best-scoring k nodes that hold the split, given the class of each candidate
    in score order: each is taken unless the rest could then no longer complete the split (exact, by
    counting). `first` (a position) is taken before any other; [] when no split contains it.
    """
    counts = [0, 0, 0, 0]
    for x in cls:
        counts[x] += 1
    picked: list[int] = []
    if first is not None:
        counts[cls[first]] -= 1
        if not _completes(counts, k - 1, r_c - (cls[first] >> 1), r_a - (cls[first] & 1)):
            return []
        picked.append(first)
        k, r_c, r_a = k - 1, r_c - (cls[first] >> 1), r_a - (cls[first] & 1)
    for i, x in enumerate(cls):
        if not k:
            break
        if i == first:
            continue
        counts[x] -= 1
        if _completes(counts, k - 1, r_c - (x >> 1), r_a - (x & 1)):
            picked.append(i)
            k, r_c, r_a = k - 1, r_c - (x >> 1), r_a - (x & 1)
    return picked


def _choose(
    free: list[_NodeFree], need: _Need, ifaces: Sequence[_Iface], vfs_used: dict[str, int]
) -> tuple[list[_NodeFree], dict[int, int], dict[int, int]] | None:
    """Fewest nodes, split evenly, best fit. Returns (nodes by id, vCPUs by node, amount by node).

    Over k nodes the even split gives each node the low or the high share of vCPUs and, on its own,
    the low or the high share of the amount; `r_c` nodes take the high vCPU share and `r_a` the high
    amount share, and which ones is free in each dimension. So k nodes fit exactly when every one
    holds both low shares, r_c of them can hold the high vCPU share and r_a the high amount share:
    counting nodes per class decides it, and best fit takes nodes in score order while the count
    says the rest can still complete the split (O(nodes log nodes) per k, no subsets tried).
    SR-IOV: when the best set has no local VF for every interface, each node in turn is forced
    into the set (best first); exact for one interface, and for several that one node can serve.
    """
    sriov = [f for f in ifaces if f.type == "sriov"]
    # Every guest cell needs at least one vCPU and one unit of memory (a page): never a cell with nothing in it.
    for k in need.spans(len(free)):
        cpu = even_split(need.vcpus, k)
        amt = even_split(need.amount, k, need.unit)
        lo_c, hi_c = cpu[-1], cpu[0]
        lo_a, hi_a = amt[-1], amt[0]
        r_c = cpu.count(hi_c) if need.pin and hi_c > lo_c else 0
        r_a = amt.count(hi_a) if hi_a > lo_a else 0
        cand = [n for n in free if n.amount >= lo_a and (not need.pin or n.threads >= lo_c)]
        if len(cand) < k:
            continue
        counts = [0, 0, 0, 0]
        for n in cand:
            counts[_klass(n, r_c, hi_c, r_a, hi_a)] += 1
        if not _completes(counts, k, r_c, r_a):
            continue

        def score(n: _NodeFree, c: int = hi_c, a: int = hi_a, lo: int = lo_c, lo_a: int = lo_a) -> tuple:
            local = -sum(1 for f in sriov if any(x.numa_node in (None, n.id) for x in f.nics))
            c = c if n.threads >= c else lo
            a = a if n.amount >= a else lo_a
            if not need.pin:
                return (local, 0, n.left(0, a), n.id)
            return (local, n.breaks(c), n.left(c, a), n.id)

        cand.sort(key=score)
        cls = [_klass(n, r_c, hi_c, r_a, hi_a) for n in cand]
        picked = [cand[i] for i in _take(cls, k, r_c, r_a, None)]
        if sriov and _assign_vfs(ifaces, {n.id for n in picked}, vfs_used) is None:
            picked = []
            for first in range(len(cand)):
                got = [cand[i] for i in _take(cls, k, r_c, r_a, first)]
                if got and _assign_vfs(ifaces, {n.id for n in got}, vfs_used) is not None:
                    picked = got
                    break
            if not picked:
                continue
        picked.sort(key=lambda n: n.id)
        # High shares to the nodes that hold them and are left best by them (the fit measure); unpinned
        # vCPUs are bound by no node resource and go by node id.
        by_cpu = (lambda n, c=hi_c, a=lo_a: (n.threads < c, n.breaks(c), n.left(c, a), n.id)) if need.pin else None
        return (
            picked,
            _assign_shares(picked, cpu, by_cpu),
            _assign_shares(picked, amt, lambda n, a=hi_a, c=lo_c * need.pin: (n.amount < a, n.left(c, a), n.id)),
        )
    return None


def _assign_shares(nodes: list[_NodeFree], shares: list[int], key) -> dict[int, int]:
    """`shares` (larger first) to `nodes` in `key` order (node id order when key is None)."""
    order = sorted(nodes, key=key) if key is not None else nodes
    return {n.id: s for n, s in zip(order, shares, strict=True)}


def _splits_fit(have: list[int], total: int, ks: Iterable[int], unit: int = 1) -> bool:
    """Whether `total`, split evenly over some k in `ks` nodes, fits the free amounts `have`."""
    have = sorted(have, reverse=True)
    return any(
        all(h >= s for h, s in zip(have, even_split(total, k, unit), strict=False)) for k in ks if k <= len(have)
    )


def _shortage(free: list[_NodeFree], need: _Need, sriov: bool) -> str:
    """The one-sentence reason no node set worked (rule 7): the first resource short on its own."""
    span = "" if need.vcpus >= len(free) else f" (a {need.vcpus}-vCPU VM spans at most {need.vcpus} nodes)"
    ks = range(1, need.vcpus + 1)
    if need.nodes is not None:
        span = f" (split evenly over numa_nodes={need.nodes})"
        ks = range(need.nodes, need.nodes + 1)
        if need.nodes > len(free):
            return f"numa_nodes {need.nodes}: the host has {len(free)} NUMA node(s)"
        if need.amount // need.unit < need.nodes:
            what = f"{need.amount} {need.size} hugepages" if need.size else human_size(need.amount)
            return f"numa_nodes {need.nodes}: {what} cannot be split over {need.nodes} nodes (each cell needs some)"
    if need.pin and not _splits_fit([n.threads for n in free], need.vcpus, ks):
        pinned = f"pinned cpus: need {need.vcpus}, " + _per_node([(n.id, str(n.threads)) for n in free])
        return pinned + (span if need.nodes is not None else "")
    if not _splits_fit([n.amount for n in free], need.amount, ks, need.unit):
        if need.size:
            have = _per_node([(n.id, str(n.amount)) for n in free])
            return f"hugepages {need.size}: need {need.amount}, {have}{span}"
        have = _per_node([(n.id, human_size(n.amount)) for n in free])
        return f"memory: need {human_size(need.amount)} on NUMA nodes, {have}{span}"
    what = [f"{need.vcpus} pinned cpus" if need.pin else f"{need.vcpus} vCPUs"]
    what.append(f"{need.amount} {need.size} hugepages" if need.size else f"{human_size(need.amount)} memory")
    if sriov:
        what.append("a NUMA-local SR-IOV VF")
    cpus = (lambda n: f"{n.threads} cpus and ") if need.pin else (lambda n: "")
    amount = (lambda n: f"{n.amount} pages") if need.size else (lambda n: human_size(n.amount))
    have = _per_node([(n.id, cpus(n) + amount(n)) for n in free])
    over = f"{need.nodes} NUMA nodes (numa_nodes)" if need.nodes is not None else "NUMA nodes"
    return f"no even split over {over} holds {' and '.join(what)} together; {have}"


def _max_pin(usage: HostUsage, ratio: float) -> int:
    """Threads that can still be pinned without shrinking shared capacity below what is in use."""
    free = sum(len(n.free_threads) for n in usage.nodes)
    if usage.shared_vcpus_used <= 0:
        return free
    if ratio <= 0:
        return 0
    keep = math.ceil(usage.shared_vcpus_used / ratio - _EPS)
    return max(0, free - keep)


def _check_shared(usage: HostUsage, vcpus: int, policy: Policy) -> None:
    if usage.shared_vcpus_used + vcpus > usage.shared_vcpus_capacity:
        raise PlacementError(
            f"shared vCPUs: need {vcpus}, the host has {usage.shared_vcpus_free} free "
            f"({usage.shared_vcpus_used} of {usage.shared_vcpus_capacity} in use at cpu overcommit {policy.cpu_overcommit_ratio:g})"
        )


def _check_memory(usage: HostUsage, memory: int, policy: Policy) -> None:
    if usage.memory_used + memory > usage.memory_capacity:
        raise PlacementError(
            f"memory: need {human_size(memory)}, the host has {human_size(usage.memory_free)} of general memory free "
            f"({human_size(usage.memory_used)} of {human_size(usage.memory_capacity)} in use at memory overcommit "
            f"{policy.memory_overcommit_ratio:g}; hugepages and reserved memory excluded)"
        )


def _check_pin(usage: HostUsage, n: int, policy: Policy) -> None:
    max_pin = _max_pin(usage, policy.cpu_overcommit_ratio)
    if n > max_pin:
        free = sum(len(x.free_threads) for x in usage.nodes)
        if max_pin == free:
            raise PlacementError(
                f"pinned cpus: need {n}, " + _per_node([(x.node, str(len(x.free_threads))) for x in usage.nodes])
            )
        raise PlacementError(
            f"pinned cpus: need {n}, only {max_pin} of the {free} free threads can be pinned without leaving "
            f"fewer shared vCPUs than the {usage.shared_vcpus_used} in use"
        )


def _cells(
    nodes: list[int], vcpu_groups: dict[int, list[int]], memory: dict[int, int]
) -> tuple[tuple[Cell, ...], list[int]]:
    """Guest cells in node order; returns the cells and the guest-vCPU -> host-thread list (or vCPU counts)."""
    cells = []
    flat: list[int] = []
    for n in nodes:
        group = vcpu_groups[n]
        cells.append(Cell(node=n, vcpus=tuple(range(len(flat), len(flat) + len(group))), memory=memory[n]))
        flat.extend(group)
    return tuple(cells), flat


def _validate_explicit(host: HostTopology, usage: HostUsage, cpus: tuple[int, ...], policy: Policy) -> None:
    thread_node = host.thread_node
    reserved = set(policy.reserved_cores)
    pinned = usage.pinned
    for t in cpus:
        if t not in thread_node:
            online = format_cpuset(thread_node) if thread_node else "none"
            raise PlacementError(f"pinned cpu {t} does not exist or is offline on this host; online cpus: {online}")
        if t in reserved:
            raise PlacementError(
                f"pinned cpu {t} is reserved for the host (reserved cores {format_cpuset(reserved)}); choose other cpus"
            )
        if t in pinned:
            raise PlacementError(f"pinned cpu {t} is already pinned by VM {pinned[t]}; choose other cpus")


def _place_bound(
    st: _State,
    request: VmRequest,
    policy: Policy,
    size: str | None,
    ifaces: list[_Iface],
) -> tuple:
    """Place a pinned or hugepage VM on NUMA nodes. Returns (pinned, nodes, hugepages, cells, tpc, vfs)."""
    host, usage = st.host, st.usage
    pin = request.pinned_cores is not None
    if size:
        page = HUGEPAGE_SIZES[size]
        need = _Need(request.cores, pin, size, request.memory // page, 1, request.numa_nodes)
    else:
        need = _Need(request.cores, pin, None, request.memory, 1024, request.numa_nodes)
        _check_memory(usage, request.memory, policy)
    if not pin:
        _check_shared(usage, request.cores, policy)
    elif isinstance(request.pinned_cores, tuple):
        return _place_explicit(host, usage, request, policy, need, ifaces)
    else:
        _check_pin(usage, request.cores, policy)
    free = _node_free(st, need)
    got = _choose(free, need, ifaces, usage.vfs_used)
    if got is None:
        sriov = any(f.type == "sriov" for f in ifaces)
        raise PlacementError(_shortage(free, need, sriov))
    nodes, cpu_by, amt_by = got
    ids = [n.id for n in nodes]
    groups: dict[int, list[int]] = {}
    whole = True
    sibs: set[int] = set()
    for n in nodes:
        if pin:
            threads, split = n.pick(cpu_by[n.id])
            whole = whole and not split and not set(threads) & set(n.lone)
            sibs.update(len(host.siblings[t]) for t in threads)
            groups[n.id] = threads
        else:
            groups[n.id] = [0] * cpu_by[n.id]
    mem = {i: amt_by[i] * HUGEPAGE_SIZES[size] for i in ids} if size else dict(amt_by)
    cells, flat = _cells(ids, groups, mem)
    tpc = 1
    if pin and whole and len(sibs) == 1:
        t = sibs.pop()
        if t > 1 and all(len(c.vcpus) % t == 0 for c in cells):
            tpc = t
    hp = HugepageAllocation(size=size, per_node={i: amt_by[i] for i in ids}) if size else None
    vfs = _assign_vfs(ifaces, set(ids), usage.vfs_used) or {}
    return (tuple(flat) if pin else None), tuple(ids), hp, cells, tpc, vfs


def _place_explicit(
    host: HostTopology, usage: HostUsage, request: VmRequest, policy: Policy, need: _Need, ifaces: list[_Iface]
) -> tuple:
    cpus = request.pinned_cores
    assert isinstance(cpus, tuple)
    if len(cpus) != request.cores:
        raise PlacementError(f"pinned cores {format_cpuset(cpus)} list {len(cpus)} cpus but cores is {request.cores}")
    _validate_explicit(host, usage, cpus, policy)
    _check_pin(usage, len(cpus), policy)
    thread_node = host.thread_node
    ids = sorted({thread_node[t] for t in cpus})
    if need.nodes is not None and len(ids) != need.nodes:
        raise PlacementError(
            f"numa_nodes {need.nodes}: pinned cores {format_cpuset(cpus)} are on {len(ids)} NUMA node(s) "
            f"({format_cpuset(ids)}); list cpus of exactly {need.nodes} node(s) or leave numa_nodes out"
        )
    groups = {i: sorted(t for t in cpus if thread_node[t] == i) for i in ids}
    shares = even_split(need.amount, len(ids), need.unit)
    free = {nu.node: nu for nu in usage.nodes}
    # Larger shares to the roomier nodes: with the nodes fixed by the cpus, the surest fit.
    have = {i: (free[i].hugepages_free(need.size) if need.size else free[i].memory_free) for i in ids}
    order = sorted(ids, key=lambda i: (-have[i], i))
    amt = {i: s for i, s in zip(order, shares, strict=False)}
    short = [i for i in ids if amt[i] > have[i]]
    if short:
        if need.size:
            raise PlacementError(
                f"hugepages {need.size}: need {need.amount} on the nodes of cpus {format_cpuset(cpus)} "
                f"({', '.join(f'{amt[i]} on node {i}' for i in ids)}), " + _per_node([(i, str(have[i])) for i in ids])
            )
        raise PlacementError(
            f"memory: need {human_size(need.amount)} on the nodes of cpus {format_cpuset(cpus)} "
            f"({', '.join(f'{human_size(amt[i])} on node {i}' for i in ids)}), "
            + _per_node([(i, human_size(have[i])) for i in ids])
        )
    vfs: dict[str, Nic] = {}
    if any(f.type == "sriov" for f in ifaces):
        got = _assign_vfs(ifaces, set(ids), usage.vfs_used)
        if got is None:
            raise PlacementError(
                f"sriov: no free VF on a NIC local to NUMA node(s) {format_cpuset(ids)} of cpus {format_cpuset(cpus)}"
            )
        vfs = got
    mem = {i: amt[i] * HUGEPAGE_SIZES[need.size] for i in ids} if need.size else amt
    cells, flat = _cells(ids, groups, mem)
    hp = HugepageAllocation(size=need.size, per_node={i: amt[i] for i in ids}) if need.size else None
    return tuple(flat), tuple(ids), hp, cells, 1, vfs


def _hugepage_sizes(request: VmRequest) -> list[str]:
    if request.hugepage_size:
        return [request.hugepage_size]
    sizes = [s for s in _SIZES_LARGEST_FIRST if request.memory % HUGEPAGE_SIZES[s] == 0]
    if not sizes:
        smallest = _SIZES_LARGEST_FIRST[-1]
        raise PlacementError(
            f"memory {human_size(request.memory)} is not a whole number of {smallest} hugepages; "
            f"use a multiple of {smallest} for hugepages_backed"
        )
    return sizes


def place(
    host: HostTopology,
    allocations: Iterable[Allocation],
    request: VmRequest,
    policy: Policy,
    *,
    index: UsageIndex | None = None,
) -> Allocation:
    """The allocation for `request` on `host` next to `allocations`, or PlacementError saying what is short.

    `index` (optional, the caller's) keeps usage between calls, so only VMs that changed are counted again.
    """
    if request.cores < 1 or request.memory <= 0:
        raise PlacementError(
            f"a VM needs at least 1 core and some memory; got cores={request.cores}, memory={request.memory}"
        )
    st = _state(host, allocations, policy, index)
    usage = st.usage
    disks = _place_disks(host, request, policy, usage.storage_committed)
    ifaces = _resolve_interfaces(host, request.interfaces, usage.vfs_used)
    _check_addresses(host, allocations, request.interfaces)
    name = request.name or DEFAULT_NAME
    common = {"name": name, "vcpus": request.cores, "memory": request.memory, "disks": disks}
    common.update(resource_pool=request.pool, owner=request.owner)
    if not request.numa_bound:
        _check_shared(usage, request.cores, policy)
        _check_memory(usage, request.memory, policy)
        vfs = _assign_vfs(ifaces, None, usage.vfs_used)
        if vfs is None:  # not every SR-IOV interface can have a VF at once: soft ones fall back to macvlan
            ifaces = _without_soft_sriov(ifaces)
            vfs = _assign_vfs(ifaces, None, usage.vfs_used)
            if vfs is None:
                raise PlacementError(_vf_shortage(ifaces, usage.vfs_used))
        return Allocation(**common, nics=_nic_allocations(ifaces, vfs))
    sizes = _hugepage_sizes(request) if request.hugepages_backed else [None]
    error: PlacementError | None = None
    for size in sizes:
        try:
            result = _place_bound_with_fallback(st, request, policy, size, ifaces)
        except PlacementError as e:
            error = e
            continue
        pinned, nodes, hp, cells, tpc, vfs, ifaces_used = result
        return Allocation(
            **common,
            pinned=pinned,
            numa_nodes=nodes,
            hugepages=hp,
            cells=cells,
            threads_per_core=tpc,
            nics=_nic_allocations(ifaces_used, vfs),
        )
    assert error is not None
    try:
        raise error
    finally:
        error = None  # no frame <-> traceback cycle left for the garbage collector to find


def _place_bound_with_fallback(st, request, policy, size, ifaces):
    """SR-IOV that was only preferred (not forced) falls back to macvlan when no local VF fits."""
    try:
        return (*_place_bound(st, request, policy, size, ifaces), ifaces)
    except PlacementError:
        downgraded = _without_soft_sriov(ifaces)
        if downgraded == ifaces:
            raise
        return (*_place_bound(st, request, policy, size, downgraded), downgraded)


def _without_soft_sriov(ifaces: list[_Iface]) -> list[_Iface]:
    """SR-IOV that was only preferred (no `attach=sriov`) becomes macvlan on its fallback NICs."""
    return [_Iface(f.spec, "macvlan", f.fallback, []) if f.type == "sriov" and f.fallback else f for f in ifaces]


def _vf_shortage(ifaces: Sequence[_Iface], vfs_used: Mapping[str, int]) -> str:
    """Rule 7 for VFs: how many are needed and what each candidate NIC has free."""
    need = [f for f in ifaces if f.type == "sriov"]
    nics = sorted({n.name: n for f in need for n in f.nics}.values(), key=lambda n: n.name)
    have = ", ".join(f"{n.name} has {max(0, n.sriov_max_vfs - vfs_used.get(n.name, 0))} free" for n in nics)
    return f"sriov: need {len(need)} VFs at once, {have}"
