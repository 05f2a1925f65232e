"""Usage accounting: what the VMs on a host take, per NUMA node and host-wide (docs/design.md §3, §4).

Usage is always recomputed from the allocations the hypervisor reports, and placement uses the very
same `compute_usage` that the resources view shows, so the two can never disagree. Rule 6 (cost):
summing 2,000 residents costs about a millisecond; a caller deciding repeatedly passes a `UsageIndex`
(opt-in, owned and passed in by the caller, never module state), which counts again only the VMs
that changed since its last call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import filterfalse
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from vmhost.model import Allocation, HostTopology, Policy, even_split
from vmhost.parse import HUGEPAGE_SIZES

if TYPE_CHECKING:
    from vmhost.placement.numa import NodeFree

__all__ = ["HostUsage", "NodeUsage", "UsageIndex", "UsageState", "compute_usage", "usage_state"]

# Float slack for overcommit ratios (1.1 * 10 threads is 11 shared vCPUs, not 10).
EPSILON = 1e-9


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
            "pinned": {str(thread): name for thread, name in sorted(self.pinned.items())},
            "free_threads": list(self.free_threads),
            "hugepages": {
                size: {"total": total, "used": used, "free": max(0, total - used)}
                for size, (total, used) in self.hugepages.items()
            },
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
        return {thread: name for node in self.nodes for thread, name in node.pinned.items()}

    def node(self, node_id: int) -> NodeUsage:
        for node in self.nodes:
            if node.node == node_id:
                return node
        raise KeyError(node_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [node.to_dict() for node in self.nodes],
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


class UsageTotals:
    """What a set of allocations takes, summed; can be updated by adding and removing allocations."""

    def __init__(self) -> None:
        self.pinned: dict[int, str] = {}
        self.shared = 0
        self.memory = 0
        self.node_memory: dict[int, int] = {}
        self.pages: dict[tuple[str, int], int] = {}  # (size, node) -> pages in use
        self.node_vms: dict[int, list[str]] = {}
        self.vfs: dict[str, int] = {}
        self.disks: dict[str, int] = {}
        self.count = 0
        self.conflict = False  # two VMs pin one thread (only VMs made by others can): no removal then

    def add(self, allocations: Iterable[Allocation], sign: int = 1) -> None:
        """One pass; floating VMs (the many) take the short path. sign=-1 removes."""
        pinned, node_memory, pages, node_vms = self.pinned, self.node_memory, self.pages, self.node_vms
        shared = memory = count = 0
        for allocation in allocations:
            count += 1
            hugepages = allocation.hugepages
            if allocation.pinned is None and hugepages is None and not allocation.numa_nodes and not allocation.cells:
                # Floating VMs are most of a busy host: shared vCPUs and general memory only.
                shared += allocation.vcpus
                memory += allocation.memory
                if allocation.nics or allocation.disks:
                    self._devices(allocation, sign)
                continue
            if allocation.pinned is None:
                shared += allocation.vcpus
            elif sign > 0:
                for thread in allocation.pinned:
                    if pinned.setdefault(thread, allocation.name) != allocation.name:
                        self.conflict = True
            else:
                for thread in allocation.pinned:
                    if pinned.get(thread) == allocation.name:
                        del pinned[thread]
            if hugepages is None:
                memory += allocation.memory
            nodes = allocation.numa_nodes or (
                tuple(hugepages.per_node) if hugepages is not None else tuple({cell.node for cell in allocation.cells})
            )
            if nodes:
                if hugepages is not None:
                    size = hugepages.size
                    for node, pages_here in hugepages.per_node.items():
                        pages[size, node] = pages.get((size, node), 0) + sign * pages_here
                elif allocation.cells:
                    for cell in allocation.cells:
                        node_memory[cell.node] = node_memory.get(cell.node, 0) + sign * cell.memory
                else:
                    for node, share in zip(nodes, even_split(allocation.memory, len(nodes), 1024), strict=True):
                        node_memory[node] = node_memory.get(node, 0) + sign * share
                for node in nodes:
                    names = node_vms.get(node)
                    if sign < 0:
                        if names is not None and allocation.name in names:
                            names.remove(allocation.name)
                    elif names is None:
                        node_vms[node] = [allocation.name]
                    else:
                        names.append(allocation.name)
            if allocation.nics or allocation.disks:
                self._devices(allocation, sign)
        self.shared += sign * shared
        self.memory += sign * memory
        self.count += sign * count

    def _devices(self, allocation: Allocation, sign: int) -> None:
        for nic in allocation.nics:
            if nic.type == "sriov":
                self.vfs[nic.parent] = self.vfs.get(nic.parent, 0) + sign
        for disk in allocation.disks:
            self.disks[disk.pool] = self.disks.get(disk.pool, 0) + sign * disk.size


class UsageState:
    """Usage of one (host, totals, policy) plus what placement derives from it, computed once.

    `previous` and `touched`: a state these totals were updated from, and the nodes the update touched;
    what the others had (their NodeUsage, their free-resource tables) is taken over unchanged.
    """

    def __init__(
        self,
        host: HostTopology,
        policy: Policy,
        totals: UsageTotals,
        previous: UsageState | None = None,
        touched: frozenset[int] = frozenset(),
    ):
        self.host = host
        self.policy = policy
        self.totals = totals
        self.previous, self.touched = previous, touched
        self.usage = _host_usage(host, totals, policy, previous.usage if previous else None, touched)
        # (pinned?, hugepage size) -> each node's free resources for such a request (vmhost.placement.numa)
        self.free_tables: dict[tuple[bool, str | None], list[NodeFree]] = {}


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
        self._last_given: tuple[Allocation, ...] = ()  # the allocations of the last call, as given
        self._state: UsageState | None = None

    def state(self, host: HostTopology, allocations: Iterable[Allocation], policy: Policy) -> UsageState:
        allocations = allocations if isinstance(allocations, tuple) else tuple(allocations)
        state = self._state
        if state is None or state.policy != policy or (host is not state.host and host != state.host):
            return self._rebuild(host, allocations, policy)
        if allocations == self._last_given:  # the same objects again: one identity test each, in C
            return state
        self._last_given = allocations
        by_name = self._by_name
        gone = by_name.copy()
        added: list[Allocation] = []
        removed: list[Allocation] = []
        for allocation in allocations:
            old = gone.pop(allocation.name, None)
            if old is allocation:
                continue
            if old is None:
                if allocation.name in by_name:  # a name seen twice: no per-name bookkeeping can hold that
                    return self._rebuild(host, allocations, policy)
                added.append(allocation)
            elif old == allocation:
                by_name[allocation.name] = allocation  # equal content in a new object: nothing to count
            else:
                removed.append(old)
                added.append(allocation)
        removed += gone.values()
        if not added and not removed:
            return state
        if state.totals.conflict:
            return self._rebuild(host, allocations, policy)
        totals = state.totals  # the old state is replaced below, so its totals can be updated in place
        totals.add(removed, -1)
        totals.add(added)
        for allocation in gone.values():
            del by_name[allocation.name]
        for allocation in added:
            by_name[allocation.name] = allocation
        touched = nodes_touched_by(state.host, (*removed, *added))
        state.previous = None  # the chain is one state long: its node tables are taken over, not kept
        # An equal host keeps the object already measured (its derived tables are cached on it).
        self._state = UsageState(state.host, policy, totals, state, touched)
        return self._state

    def _rebuild(self, host: HostTopology, allocations: tuple[Allocation, ...], policy: Policy) -> UsageState:
        by_name = {allocation.name: allocation for allocation in allocations}
        state = usage_state(host, allocations, policy, None)
        # Duplicate names cannot be tracked by name: such a state is used once and never updated.
        trackable = len(by_name) == len(allocations)
        self._by_name, self._last_given, self._state = (by_name, allocations, state) if trackable else ({}, (), None)
        return state


def nodes_touched_by(host: HostTopology, allocations: Iterable[Allocation]) -> frozenset[int]:
    """The NUMA nodes whose use these allocations change (none for floating VMs)."""
    out: set[int] = set()
    thread_node = host.thread_node
    for allocation in allocations:
        out.update(allocation.numa_nodes)
        out.update(cell.node for cell in allocation.cells)
        if allocation.hugepages is not None:
            out.update(allocation.hugepages.per_node)
        if allocation.pinned is not None:
            out.update(thread_node.get(thread, -1) for thread in allocation.pinned)
    return frozenset(out)


def usage_state(
    host: HostTopology, allocations: Iterable[Allocation], policy: Policy, index: UsageIndex | None
) -> UsageState:
    """Rule 6 (cost): usage summed once per decision, or, with the caller's `index`, only what changed."""
    if index is not None:
        return index.state(host, allocations, policy)
    totals = UsageTotals()
    totals.add(allocations)
    return UsageState(host, policy, totals)


def shared_capacity(free_threads: int, ratio: float) -> int:
    """Rule 2: shared vCPUs the threads neither reserved nor pinned can carry at the overcommit ratio."""
    return max(0, math.floor(free_threads * ratio + EPSILON))


def compute_usage(
    host: HostTopology, allocations: Iterable[Allocation], policy: Policy, *, index: UsageIndex | None = None
) -> HostUsage:
    """Capacity and use per NUMA node and host-wide, from the host and every VM on it (ours or not).

    With an `index`, only what changed since its last call is counted again (the result is then
    shared with later calls: treat it as read-only).
    """
    return usage_state(host, allocations, policy, index).usage


def _host_usage(
    host: HostTopology,
    totals: UsageTotals,
    policy: Policy,
    previous: HostUsage | None = None,
    touched: frozenset[int] = frozenset(),
) -> HostUsage:
    reserved = set(policy.reserved_cores)
    thread_node = host.thread_node
    node_threads = host.node_threads
    node_names: dict[int, set[str]] = {node: set(names) for node, names in totals.node_vms.items() if names}
    node_pinned: dict[int, dict[int, str]] = {}  # one pass over pinned threads, not over every thread
    for thread, name in totals.pinned.items():
        node = thread_node.get(thread)
        if node is not None:
            node_names.setdefault(node, set()).add(name)
            node_pinned.setdefault(node, {})[thread] = name
    reserved_share = even_split(policy.reserved_memory, max(1, len(host.nodes)))
    memory_ratio = policy.memory_overcommit_ratio
    nodes = []
    free_total = 0
    for position, node in enumerate(host.nodes):
        if previous is not None and node.id not in touched:
            nodes.append(previous.nodes[position])
            free_total += len(previous.nodes[position].free_threads)
            continue
        threads = node_threads[node.id]
        pinned = dict(sorted(node_pinned.get(node.id, {}).items()))
        if reserved:
            reserved_here = tuple(thread for thread in threads if thread in reserved)
            blocked = reserved | pinned.keys()
        else:
            reserved_here, blocked = (), pinned.keys()
        free = tuple(filterfalse(blocked.__contains__, threads)) if blocked else threads
        free_total += len(free)
        sizes = sorted(
            set(node.hugepages) | {size for size, page_node in totals.pages if page_node == node.id},
            key=HUGEPAGE_SIZES.get,
        )
        hugepages = {size: (node.hugepages.get(size, 0), totals.pages.get((size, node.id), 0)) for size in sizes}
        general = node.memory - node.hugepage_bytes() - reserved_share[position]
        nodes.append(
            NodeUsage(
                node=node.id,
                threads=threads,
                reserved=reserved_here,
                pinned=MappingProxyType(pinned),
                free_threads=free,
                hugepages=MappingProxyType(hugepages),
                memory_capacity=max(0, int(general * memory_ratio)),
                memory_bound=totals.node_memory.get(node.id, 0),
                vms=tuple(sorted(node_names.get(node.id, ()))),
            )
        )
    general_total = sum(node.memory - node.hugepage_bytes() for node in host.nodes) - policy.reserved_memory
    return HostUsage(
        nodes=tuple(nodes),
        shared_vcpus_used=totals.shared,
        shared_vcpus_capacity=shared_capacity(free_total, policy.cpu_overcommit_ratio),
        memory_used=totals.memory,
        memory_capacity=max(0, int(general_total * memory_ratio)),
        vfs_used=MappingProxyType({nic: vfs for nic, vfs in totals.vfs.items() if vfs}),
        storage_committed=MappingProxyType({pool: size for pool, size in totals.disks.items() if size}),
        vms=totals.count,
    )
