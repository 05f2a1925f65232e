"""The allocator: which host threads, NUMA nodes, hugepages, pools and NICs a new VM gets.

Pure and deterministic: no I/O, no module state, ties broken by node id, thread id, name. `place()`
below applies the rules of docs/design.md §4; its parts live beside it, one idea each:

- usage.py     usage accounting (and the caller's opt-in UsageIndex), shared with the resources view
- capacity.py  host-wide limits: pinnable threads, shared vCPUs, general memory (rules 1-3)
- numa.py      NUMA fitting: the nodes, the even split, the fit measure, whole cores (rules 4-5)
- nics.py      NIC resolution: MAAS interface constraints, attachment, static addresses, VFs
- disks.py     storage pools for the disks
- errors.py    PlacementError and the per-node form of its messages (rule 7)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vmhost.model import Allocation, Cell, HostTopology, HugepageAllocation, Nic, Policy, VmRequest, even_split
from vmhost.parse import HUGEPAGE_SIZES, format_cpuset, human_size
from vmhost.placement.capacity import (
    check_explicit_cpus,
    check_general_memory,
    check_pinnable_threads,
    check_shared_vcpus,
)
from vmhost.placement.disks import place_disks
from vmhost.placement.errors import PlacementError, per_node
from vmhost.placement.nics import (
    ResolvedInterface,
    assign_vfs,
    check_static_addresses,
    nic_allocations,
    resolve_interfaces,
    vf_shortage,
    without_soft_sriov,
)
from vmhost.placement.numa import NumaNeed, choose_nodes, free_table, numa_shortage
from vmhost.placement.usage import HostUsage, NodeUsage, UsageIndex, UsageState, compute_usage, usage_state

__all__ = ["HostUsage", "NodeUsage", "PlacementError", "UsageIndex", "compute_usage", "place"]

DEFAULT_NAME = "vm"
# Largest first: fewer, bigger pages mean fewer TLB misses.
SIZES_LARGEST_FIRST = tuple(sorted(HUGEPAGE_SIZES, key=HUGEPAGE_SIZES.__getitem__, reverse=True))


@dataclass(frozen=True)
class NumaPlacement:
    """Where a NUMA-bound VM goes: its threads (None when unpinned), nodes, pages, guest cells and VFs."""

    pinned: tuple[int, ...] | None
    numa_nodes: tuple[int, ...]
    hugepages: HugepageAllocation | None
    cells: tuple[Cell, ...]
    threads_per_core: int
    vfs: Mapping[str, Nic]  # interface label -> the NIC giving its VF
    interfaces: tuple[ResolvedInterface, ...]  # as attached: preferred SR-IOV may have fallen back to macvlan


@dataclass(frozen=True)
class GuestCells:
    """Guest NUMA cells in node order, and the host thread (or a 0 placeholder) behind each guest vCPU."""

    cells: tuple[Cell, ...]
    threads: tuple[int, ...]


def place(
    host: HostTopology,
    allocations: Iterable[Allocation],
    request: VmRequest,
    policy: Policy,
    *,
    index: UsageIndex | None = None,
) -> Allocation:
    """The allocation for `request` on `host` next to `allocations`, or PlacementError saying what is short.

    The rules (docs/design.md §4):
    1. A pinned thread belongs to exactly one VM: never shared, never overcommitted. Reserved threads
       are never used.
    2. Unpinned vCPUs are overcommitted by `cpu_overcommit_ratio` against the threads that are neither
       reserved nor pinned. Pinned VMs count against nothing else twice.
    3. Hugepages are never overcommitted: free pages of the requested size, on the chosen nodes, cover
       the VM. General memory (total - hugepages - reserved, times `memory_overcommit_ratio`) holds
       the memory that is not hugepages.
    4. A pinned or hugepage VM, or one that names `numa_nodes`, goes on ONE node when any node can hold
       all of it, else on the FEWEST nodes (or exactly `numa_nodes`), split evenly, guest cells
       mirroring the split; among the sets that hold it, best fit by the shares of threads and memory
       each node is left with.
    5. `pinned_cores=auto` takes whole cores before lone threads and shows them to the guest as threads
       of one core; an explicit list is validated and its nodes hold the memory and pages.
    6. Cost: usage is summed once per decision (with the caller's `index`, only the VMs that changed),
       and nodes are counted, never permuted.
    7. A refusal says what is short, where and by how much.

    Disks and interfaces are resolved first; then a floating VM is held to rules 2 and 3 host-wide, and a
    NUMA-bound one to rules 3, 1-2, 4 and 5 in that order, trying each hugepage size that fits, largest
    first (general memory is checked before CPUs so that refusal reads as it always has).
    """
    if request.cores < 1 or request.memory <= 0:
        raise PlacementError(
            f"a VM needs at least 1 core and some memory; got cores={request.cores}, memory={request.memory}"
        )
    state = usage_state(host, allocations, policy, index)  # rule 6: counted once, or only what changed
    usage = state.usage
    disks = place_disks(host, request, policy, usage.storage_committed)  # §4 "Storage"
    interfaces = resolve_interfaces(host, request.interfaces, usage.vfs_used)  # §4 "Interfaces"
    check_static_addresses(host, allocations, request.interfaces)
    common = {
        "name": request.name or DEFAULT_NAME,
        "vcpus": request.cores,
        "memory": request.memory,
        "disks": disks,
        "resource_pool": request.pool,
        "owner": request.owner,
    }
    if not request.numa_bound:
        check_shared_vcpus(usage, request.cores, policy)  # rule 2
        check_general_memory(usage, request.memory, policy)  # rule 3
        vfs = assign_vfs(interfaces, None, usage.vfs_used)
        if vfs is None:  # not every SR-IOV interface can have a VF at once: soft ones fall back to macvlan
            interfaces = without_soft_sriov(interfaces)
            vfs = assign_vfs(interfaces, None, usage.vfs_used)
            if vfs is None:
                raise PlacementError(vf_shortage(interfaces, usage.vfs_used))  # rule 7
        return Allocation(**common, nics=nic_allocations(interfaces, vfs))
    placed = _place_numa_bound(state, request, policy, interfaces)
    return Allocation(
        **common,
        pinned=placed.pinned,
        numa_nodes=placed.numa_nodes,
        hugepages=placed.hugepages,
        cells=placed.cells,
        threads_per_core=placed.threads_per_core,
        nics=nic_allocations(placed.interfaces, placed.vfs),
    )


def _place_numa_bound(
    state: UsageState, request: VmRequest, policy: Policy, interfaces: list[ResolvedInterface]
) -> NumaPlacement:
    """Each hugepage size that fits in turn (rule 3), largest first; the last refusal when none fits."""
    sizes = _hugepage_sizes(request) if request.hugepages_backed else [None]
    error: PlacementError | None = None
    for size in sizes:
        try:
            return _with_sriov_fallback(state, request, policy, size, interfaces)
        except PlacementError as refusal:
            error = refusal
    assert error is not None
    try:
        raise error
    finally:
        error = None  # no frame <-> traceback cycle left for the garbage collector to find


def _with_sriov_fallback(
    state: UsageState, request: VmRequest, policy: Policy, size: str | None, interfaces: list[ResolvedInterface]
) -> NumaPlacement:
    """SR-IOV that was only preferred (not forced) falls back to macvlan when no local VF fits."""
    try:
        return _place_on_nodes(state, request, policy, size, interfaces)
    except PlacementError:
        downgraded = without_soft_sriov(interfaces)
        if downgraded == interfaces:
            raise
        return _place_on_nodes(state, request, policy, size, downgraded)


def _hugepage_sizes(request: VmRequest) -> list[str | None]:
    """Rule 3: the page sizes the VM's memory is a whole number of, largest first (or the one it names)."""
    if request.hugepage_size:
        return [request.hugepage_size]
    sizes: list[str | None] = [size for size in SIZES_LARGEST_FIRST if request.memory % HUGEPAGE_SIZES[size] == 0]
    if not sizes:
        smallest = SIZES_LARGEST_FIRST[-1]
        raise PlacementError(
            f"memory {human_size(request.memory)} is not a whole number of {smallest} hugepages; "
            f"use a multiple of {smallest} for hugepages_backed"
        )
    return sizes


def _place_on_nodes(
    state: UsageState, request: VmRequest, policy: Policy, size: str | None, interfaces: list[ResolvedInterface]
) -> NumaPlacement:
    """A pinned or hugepage VM on NUMA nodes, with pages of `size` (None: general memory)."""
    host, usage = state.host, state.usage
    pin = request.pinned_cores is not None
    if size:
        need = NumaNeed(request.cores, pin, size, request.memory // HUGEPAGE_SIZES[size], 1, request.numa_nodes)
    else:
        need = NumaNeed(request.cores, pin, None, request.memory, 1024, request.numa_nodes)
        check_general_memory(usage, request.memory, policy)  # rule 3
    if not pin:
        check_shared_vcpus(usage, request.cores, policy)  # rule 2
    elif isinstance(request.pinned_cores, tuple):
        return _place_explicit_cpus(host, usage, request, policy, need, interfaces)  # rule 5
    else:
        check_pinnable_threads(usage, request.cores, policy)  # rule 1
    free = free_table(state, need)
    choice = choose_nodes(free, need, interfaces, usage.vfs_used)  # rule 4
    if choice is None:
        sriov = any(interface.attach == "sriov" for interface in interfaces)
        raise PlacementError(numa_shortage(free, need, sriov))  # rule 7
    node_ids = [node.id for node in choice.nodes]
    groups: dict[int, list[int]] = {}
    whole_cores_only = True
    sibling_counts: set[int] = set()
    for node in choice.nodes:
        if pin:
            taken = node.take_threads(choice.vcpus_by_node[node.id])  # rule 5: whole cores first
            whole_cores_only = (
                whole_cores_only and not taken.splits_core and not set(taken.threads) & set(node.lone_threads)
            )
            sibling_counts.update(len(host.siblings[thread]) for thread in taken.threads)
            groups[node.id] = taken.threads
        else:
            groups[node.id] = [0] * choice.vcpus_by_node[node.id]
    amounts = choice.amount_by_node
    memory = {node: amounts[node] * HUGEPAGE_SIZES[size] for node in node_ids} if size else dict(amounts)
    guest = _guest_cells(node_ids, groups, memory)
    threads_per_core = 1
    if pin and whole_cores_only and len(sibling_counts) == 1:
        siblings = sibling_counts.pop()
        if siblings > 1 and all(len(cell.vcpus) % siblings == 0 for cell in guest.cells):
            threads_per_core = siblings  # rule 5: whole cores show to the guest as threads of one core
    return NumaPlacement(
        pinned=guest.threads if pin else None,
        numa_nodes=tuple(node_ids),
        hugepages=HugepageAllocation(size=size, per_node={node: amounts[node] for node in node_ids}) if size else None,
        cells=guest.cells,
        threads_per_core=threads_per_core,
        vfs=assign_vfs(interfaces, set(node_ids), usage.vfs_used) or {},
        interfaces=tuple(interfaces),
    )


def _place_explicit_cpus(
    host: HostTopology,
    usage: HostUsage,
    request: VmRequest,
    policy: Policy,
    need: NumaNeed,
    interfaces: list[ResolvedInterface],
) -> NumaPlacement:
    """Rule 5's explicit list: validated (rule 1), and its nodes hold the memory and pages (rule 3)."""
    cpus = request.pinned_cores
    assert isinstance(cpus, tuple)
    if len(cpus) != request.cores:
        raise PlacementError(f"pinned cores {format_cpuset(cpus)} list {len(cpus)} cpus but cores is {request.cores}")
    check_explicit_cpus(host, usage, cpus, policy)
    check_pinnable_threads(usage, len(cpus), policy)
    thread_node = host.thread_node
    node_ids = sorted({thread_node[thread] for thread in cpus})
    if need.nodes is not None and len(node_ids) != need.nodes:
        raise PlacementError(
            f"numa_nodes {need.nodes}: pinned cores {format_cpuset(cpus)} are on {len(node_ids)} NUMA node(s) "
            f"({format_cpuset(node_ids)}); list cpus of exactly {need.nodes} node(s) or leave numa_nodes out"
        )
    groups = {node: sorted(thread for thread in cpus if thread_node[thread] == node) for node in node_ids}
    shares = even_split(need.amount, len(node_ids), need.unit)
    node_usage = {usage_here.node: usage_here for usage_here in usage.nodes}
    # Larger shares to the roomier nodes: with the nodes fixed by the cpus, the surest fit.
    have = {
        node: (node_usage[node].hugepages_free(need.size) if need.size else node_usage[node].memory_free)
        for node in node_ids
    }
    order = sorted(node_ids, key=lambda node: (-have[node], node))
    amounts = dict(zip(order, shares, strict=False))
    if any(amounts[node] > have[node] for node in node_ids):
        if need.size:
            raise PlacementError(
                f"hugepages {need.size}: need {need.amount} on the nodes of cpus {format_cpuset(cpus)} "
                f"({', '.join(f'{amounts[node]} on node {node}' for node in node_ids)}), "
                + per_node([(node, str(have[node])) for node in node_ids])
            )
        raise PlacementError(
            f"memory: need {human_size(need.amount)} on the nodes of cpus {format_cpuset(cpus)} "
            f"({', '.join(f'{human_size(amounts[node])} on node {node}' for node in node_ids)}), "
            + per_node([(node, human_size(have[node])) for node in node_ids])
        )
    vfs: dict[str, Nic] = {}
    if any(interface.attach == "sriov" for interface in interfaces):
        found = assign_vfs(interfaces, set(node_ids), usage.vfs_used)
        if found is None:
            raise PlacementError(
                f"sriov: no free VF on a NIC local to NUMA node(s) {format_cpuset(node_ids)} "
                f"of cpus {format_cpuset(cpus)}"
            )
        vfs = found
    memory = {node: amounts[node] * HUGEPAGE_SIZES[need.size] for node in node_ids} if need.size else amounts
    guest = _guest_cells(node_ids, groups, memory)
    return NumaPlacement(
        pinned=guest.threads,
        numa_nodes=tuple(node_ids),
        hugepages=HugepageAllocation(size=need.size, per_node={node: amounts[node] for node in node_ids})
        if need.size
        else None,
        cells=guest.cells,
        threads_per_core=1,
        vfs=vfs,
        interfaces=tuple(interfaces),
    )


def _guest_cells(nodes: list[int], vcpu_groups: dict[int, list[int]], memory: dict[int, int]) -> GuestCells:
    """Guest cells mirroring the split (rule 4), in node order, numbering guest vCPUs as they come."""
    cells = []
    threads: list[int] = []
    for node in nodes:
        group = vcpu_groups[node]
        cells.append(Cell(node=node, vcpus=tuple(range(len(threads), len(threads) + len(group))), memory=memory[node]))
        threads.extend(group)
    return GuestCells(tuple(cells), tuple(threads))
