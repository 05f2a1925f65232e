"""NUMA fitting, rule 4 (docs/design.md §4): which nodes a pinned, hugepage-backed or `numa_nodes` VM
goes on, and how its vCPUs and memory split over them.

Among the node sets that hold the VM, split evenly over the fewest nodes (or exactly `numa_nodes`),
each node is scored by the shares of its threads and of its memory (general memory and hugepages of
every size together, in bytes) that it would have left free: first the node whose two shares end up
closest (to the percent), so no node is left with threads but no memory or memory but no threads;
then the one left fullest. The same score gives a spanning VM's larger shares to nodes. SR-IOV
locality and not splitting a whole core (rule 5) come first.

Rule 6 (cost): nodes are never permuted. For k = 1, 2, ... nodes, counting the nodes that can take
the low and the high even shares decides exactly whether some k nodes hold the VM, and the
best-fitting such k are taken in one sorted pass (O(nodes log nodes) per k; see `choose_nodes`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from vmhost.model import HostTopology, even_split
from vmhost.parse import HUGEPAGE_SIZES, human_size
from vmhost.placement.errors import per_node
from vmhost.placement.nics import ResolvedInterface, assign_vfs
from vmhost.placement.usage import HostUsage, UsageState

__all__ = ["NodeChoice", "NodeFree", "NumaNeed", "ThreadPick", "choose_nodes", "free_table", "numa_shortage"]


@dataclass(frozen=True, order=True)
class Fit:
    """Rule 4's fit measure for one node after it takes its share, lower is better: `balance` is
    |threads share left - memory share left| to the percent, `free_share` their sum (fullest first)."""

    balance: float
    free_share: float


@dataclass(frozen=True)
class ThreadPick:
    """Threads taken on one node, and whether taking them split a whole core."""

    threads: list[int]
    splits_core: bool


@dataclass(frozen=True)
class NodeFree:
    """What one node can still give a NUMA-bound VM."""

    id: int
    whole_cores: list[tuple[int, ...]]  # cores with every thread free
    lone_threads: list[int]  # free threads of partly used cores
    amount: int  # free hugepages of the requested size, or free general memory (bytes)
    threads: int  # len(threads in whole_cores) + len(lone_threads): what a pinned VM can take here
    core_size: int  # threads per whole core when all are alike, else 0
    # For the fit measure (rule 4): capacities and what the other memory pools have free, in bytes.
    thread_capacity: int  # threads not reserved
    unit_bytes: int  # bytes per unit of `amount`
    other_free: int  # free bytes of every memory pool the request does not draw on
    memory_capacity: int  # bytes of every memory pool (general capacity + all hugepages)
    free_threads: int  # every free thread, also for an unpinned request (which takes none)

    def fit(self, vcpus: int, amount: int) -> Fit:
        """Rule 4's fit measure after taking `vcpus` threads and `amount` units here.

        The shares of the node's threads and of its memory (every pool: general memory and hugepages of
        each size, in bytes) left free. First their difference to the percent, so the node keeps threads
        and memory in proportion and neither is stranded without the other; then their sum, so among
        balanced nodes the fullest is filled (best fit).
        """
        thread_share = (self.free_threads - vcpus) / self.thread_capacity if self.thread_capacity else 0.0
        memory_share = (
            ((self.amount - amount) * self.unit_bytes + self.other_free) / self.memory_capacity
            if self.memory_capacity
            else 0.0
        )
        return Fit(round(abs(thread_share - memory_share), 2), thread_share + memory_share)

    def splits_a_core(self, count: int) -> int:
        """Rule 5: how many whole cores taking `count` threads would split (0 or 1); arithmetic when cores are alike."""
        if self.core_size:
            remainder = count - min(len(self.whole_cores), count // self.core_size) * self.core_size
            return 1 if remainder > len(self.lone_threads) else 0
        return 1 if self.take_threads(count).splits_core else 0

    def take_threads(self, count: int) -> ThreadPick:
        """Rule 5: whole cores first, then lone threads, then (only for a remainder) split a core."""
        taken: list[int] = []
        used: set[int] = set()
        remainder = count
        for position, core in enumerate(self.whole_cores):
            if len(core) <= remainder:
                taken.extend(core)
                used.add(position)
                remainder -= len(core)
                if not remainder:
                    return ThreadPick(taken, False)
        lone = self.lone_threads[:remainder]
        taken.extend(lone)
        remainder -= len(lone)
        splits = False
        for position, core in enumerate(self.whole_cores):
            if not remainder:
                break
            if position not in used:
                taken.extend(core[:remainder])
                remainder -= min(remainder, len(core))
                splits = True
        return ThreadPick(taken, splits)


@dataclass(frozen=True)
class NumaNeed:
    """A NUMA-bound request, reduced to numbers."""

    vcpus: int
    pin: bool
    size: str | None  # hugepage size, None for general memory
    amount: int  # pages (hugepages) or bytes (general memory)
    unit: int  # split granularity of `amount`
    nodes: int | None = None  # exactly this many nodes (the request's numa_nodes); None: the fewest

    def spans(self, node_count: int) -> range:
        """The node counts to try, fewest first: each guest cell needs a vCPU and a unit of memory."""
        top = min(node_count, self.vcpus, self.amount // self.unit)
        if self.nodes is not None:
            return range(self.nodes, self.nodes + 1) if self.nodes <= top else range(0)
        return range(1, top + 1)


@dataclass(frozen=True)
class NodeChoice:
    """Rule 4's answer: the nodes (by id) and each one's share of the vCPUs and of the amount."""

    nodes: tuple[NodeFree, ...]
    vcpus_by_node: Mapping[int, int]
    amount_by_node: Mapping[int, int]


def free_table(state: UsageState, need: NumaNeed) -> list[NodeFree]:
    """Per node: free whole cores, lone threads and the free amount the request draws on (cached per state)."""
    key = (need.pin, need.size)
    table = state.free_tables.get(key)
    if table is None:
        old = state.previous.free_tables.get(key) if state.previous is not None else None
        table = state.free_tables[key] = _free_table(state.host, state.usage, need, old, state.touched)
    return table


def _free_table(
    host: HostTopology,
    usage: HostUsage,
    need: NumaNeed,
    old: list[NodeFree] | None = None,
    touched: frozenset[int] = frozenset(),
) -> list[NodeFree]:
    """`old`: the same table of a previous state, taken over for the nodes not `touched` since."""
    out = []
    unit_bytes = HUGEPAGE_SIZES[need.size] if need.size else 1
    for position, (node, node_usage) in enumerate(zip(host.nodes, usage.nodes, strict=False)):
        if old is not None and node.id not in touched:
            out.append(old[position])
            continue
        whole: list[tuple[int, ...]] = []
        lone: list[int] = []
        if need.pin:
            if len(node_usage.free_threads) == len(node_usage.threads):
                whole = [core.threads for core in node.cores]
            else:
                free = set(node_usage.free_threads)
                for core in node.cores:
                    if free.issuperset(core.threads):
                        whole.append(core.threads)
                    else:
                        lone.extend(thread for thread in core.threads if thread in free)
            whole.sort()
            lone.sort()
        amount = node_usage.hugepages_free(need.size) if need.size else node_usage.memory_free
        pool_bytes = {
            size: (HUGEPAGE_SIZES[size] * total, HUGEPAGE_SIZES[size] * max(0, total - used))
            for size, (total, used) in node_usage.hugepages.items()
        }
        other = sum(free for size, (_, free) in pool_bytes.items() if size != need.size)
        core_sizes = {len(core) for core in whole}
        out.append(
            NodeFree(
                id=node_usage.node,
                whole_cores=whole,
                lone_threads=lone,
                amount=amount,
                threads=sum(map(len, whole)) + len(lone),
                core_size=core_sizes.pop() if len(core_sizes) == 1 else 0,
                thread_capacity=len(node_usage.threads) - len(node_usage.reserved),
                unit_bytes=unit_bytes,
                other_free=other + (node_usage.memory_free if need.size else 0),
                memory_capacity=node_usage.memory_capacity + sum(total for total, _ in pool_bytes.values()),
                free_threads=len(node_usage.free_threads),
            )
        )
    return out


# Share classes: index = 2 * (takes the high vCPU share) + (takes the high amount share).
LOW_ONLY, AMOUNT_HIGH, VCPUS_HIGH, BOTH_HIGH = range(4)


def _share_class(node: NodeFree, vcpu_highs: int, high_vcpus: int, amount_highs: int, high_amount: int) -> int:
    """Which high shares `node` can take; it always can take one that no node is asked for."""
    return ((not vcpu_highs or node.threads >= high_vcpus) << 1) | (not amount_highs or node.amount >= high_amount)


def _split_completes(counts: list[int], span: int, vcpu_highs: int, amount_highs: int) -> bool:
    """Whether `span` nodes can be taken from a pool with `counts` per share class so that at least
    `vcpu_highs` of them take the high vCPU share and at least `amount_highs` the high amount share.

    Nodes of class BOTH_HIGH count for both, so `vcpu_highs + amount_highs - span` of them are needed
    when the two exceed `span`.
    """
    vcpu_highs, amount_highs = max(vcpu_highs, 0), max(amount_highs, 0)
    both = counts[BOTH_HIGH]
    return (
        vcpu_highs <= span
        and amount_highs <= span
        and sum(counts) >= span
        and both + counts[VCPUS_HIGH] >= vcpu_highs
        and both + counts[AMOUNT_HIGH] >= amount_highs
        and vcpu_highs + amount_highs - span <= both
    )


def _take_best(classes: list[int], span: int, vcpu_highs: int, amount_highs: int, first: int | None) -> list[int]:
    """Positions of the best-scoring `span` nodes that hold the split, given the share class of each
    candidate in score order: each is taken unless the rest could then no longer complete the split
    (exact, by counting). `first` (a position) is taken before any other; [] when no split contains it.
    """
    counts = [0, 0, 0, 0]
    for share_class in classes:
        counts[share_class] += 1
    picked: list[int] = []
    if first is not None:
        counts[classes[first]] -= 1
        vcpu_left, amount_left = vcpu_highs - (classes[first] >> 1), amount_highs - (classes[first] & 1)
        if not _split_completes(counts, span - 1, vcpu_left, amount_left):
            return []
        picked.append(first)
        span, vcpu_highs, amount_highs = span - 1, vcpu_left, amount_left
    for position, share_class in enumerate(classes):
        if not span:
            break
        if position == first:
            continue
        counts[share_class] -= 1
        vcpu_left, amount_left = vcpu_highs - (share_class >> 1), amount_highs - (share_class & 1)
        if _split_completes(counts, span - 1, vcpu_left, amount_left):
            picked.append(position)
            span, vcpu_highs, amount_highs = span - 1, vcpu_left, amount_left
    return picked


def choose_nodes(
    free: list[NodeFree], need: NumaNeed, interfaces: Sequence[ResolvedInterface], vfs_used: Mapping[str, int]
) -> NodeChoice | None:
    """Rule 4: fewest nodes, split evenly, best fit; None when no node set holds the VM.

    Over k nodes the even split gives each node the low or the high share of vCPUs and, on its own,
    the low or the high share of the amount; `vcpu_highs` nodes take the high vCPU share and
    `amount_highs` the high amount share, and which ones is free in each dimension. So k nodes fit
    exactly when every one holds both low shares, vcpu_highs of them can hold the high vCPU share and
    amount_highs the high amount share: counting nodes per class decides it, and best fit takes nodes in
    score order while the count says the rest can still complete the split (O(nodes log nodes) per k,
    no subsets tried). SR-IOV: when the best set has no local VF for every interface, each node in turn
    is forced into the set (best first); exact for one interface, and for several that one node can serve.
    """
    sriov = [interface for interface in interfaces if interface.attach == "sriov"]
    # Every guest cell needs at least one vCPU and one unit of memory (a page): never a cell with nothing in it.
    for span in need.spans(len(free)):
        vcpu_shares = even_split(need.vcpus, span)
        amount_shares = even_split(need.amount, span, need.unit)
        low_vcpus, high_vcpus = vcpu_shares[-1], vcpu_shares[0]
        low_amount, high_amount = amount_shares[-1], amount_shares[0]
        vcpu_highs = vcpu_shares.count(high_vcpus) if need.pin and high_vcpus > low_vcpus else 0
        amount_highs = amount_shares.count(high_amount) if high_amount > low_amount else 0
        candidates = [
            node for node in free if node.amount >= low_amount and (not need.pin or node.threads >= low_vcpus)
        ]
        if len(candidates) < span:
            continue
        counts = [0, 0, 0, 0]
        for node in candidates:
            counts[_share_class(node, vcpu_highs, high_vcpus, amount_highs, high_amount)] += 1
        if not _split_completes(counts, span, vcpu_highs, amount_highs):
            continue
        candidates.sort(key=_best_first(sriov, need.pin, high_vcpus, low_vcpus, high_amount, low_amount))
        classes = [_share_class(node, vcpu_highs, high_vcpus, amount_highs, high_amount) for node in candidates]
        picked = [candidates[position] for position in _take_best(classes, span, vcpu_highs, amount_highs, None)]
        if sriov and assign_vfs(interfaces, {node.id for node in picked}, vfs_used) is None:
            picked = []
            for first in range(len(candidates)):
                forced = [
                    candidates[position] for position in _take_best(classes, span, vcpu_highs, amount_highs, first)
                ]
                if forced and assign_vfs(interfaces, {node.id for node in forced}, vfs_used) is not None:
                    picked = forced
                    break
            if not picked:
                continue
        picked.sort(key=lambda node: node.id)
        # High shares to the nodes that hold them and are left best by them (the fit measure); unpinned
        # vCPUs are bound by no node resource and go by node id.
        pinned_low = low_vcpus * need.pin

        def vcpu_order(node: NodeFree, vcpus: int = high_vcpus, amount: int = low_amount) -> tuple:
            return (node.threads < vcpus, node.splits_a_core(vcpus), node.fit(vcpus, amount), node.id)

        def amount_order(node: NodeFree, amount: int = high_amount, vcpus: int = pinned_low) -> tuple:
            return (node.amount < amount, node.fit(vcpus, amount), node.id)

        return NodeChoice(
            nodes=tuple(picked),
            vcpus_by_node=_assign_shares(picked, vcpu_shares, vcpu_order if need.pin else None),
            amount_by_node=_assign_shares(picked, amount_shares, amount_order),
        )
    return None


def _best_first(
    sriov: list[ResolvedInterface], pin: bool, high_vcpus: int, low_vcpus: int, high_amount: int, low_amount: int
) -> Callable[[NodeFree], tuple]:
    """The candidate order: SR-IOV locality, then not splitting a core (rule 5), then the fit measure, then id."""

    def key(node: NodeFree) -> tuple:
        local = -sum(1 for interface in sriov if any(nic.numa_node in (None, node.id) for nic in interface.nics))
        vcpus = high_vcpus if node.threads >= high_vcpus else low_vcpus
        amount = high_amount if node.amount >= high_amount else low_amount
        if not pin:
            return (local, 0, node.fit(0, amount), node.id)
        return (local, node.splits_a_core(vcpus), node.fit(vcpus, amount), node.id)

    return key


def _assign_shares(nodes: list[NodeFree], shares: list[int], key: Callable[[NodeFree], tuple] | None) -> dict[int, int]:
    """`shares` (larger first) to `nodes` in `key` order (node id order when key is None)."""
    order = sorted(nodes, key=key) if key is not None else nodes
    return {node.id: share for node, share in zip(order, shares, strict=True)}


def _splits_fit(have: list[int], total: int, spans: Iterable[int], unit: int = 1) -> bool:
    """Whether `total`, split evenly over some k in `spans` nodes, fits the free amounts `have`."""
    have = sorted(have, reverse=True)
    return any(
        all(free >= share for free, share in zip(have, even_split(total, span, unit), strict=False))
        for span in spans
        if span <= len(have)
    )


def numa_shortage(free: list[NodeFree], need: NumaNeed, sriov: bool) -> str:
    """Rule 7: the one-sentence reason no node set worked, the first resource short on its own."""
    span = "" if need.vcpus >= len(free) else f" (a {need.vcpus}-vCPU VM spans at most {need.vcpus} nodes)"
    spans = range(1, need.vcpus + 1)
    if need.nodes is not None:
        span = f" (split evenly over numa_nodes={need.nodes})"
        spans = range(need.nodes, need.nodes + 1)
        if need.nodes > len(free):
            return f"numa_nodes {need.nodes}: the host has {len(free)} NUMA node(s)"
        if need.amount // need.unit < need.nodes:
            what = f"{need.amount} {need.size} hugepages" if need.size else human_size(need.amount)
            return f"numa_nodes {need.nodes}: {what} cannot be split over {need.nodes} nodes (each cell needs some)"
    if need.pin and not _splits_fit([node.threads for node in free], need.vcpus, spans):
        pinned = f"pinned cpus: need {need.vcpus}, " + per_node([(node.id, str(node.threads)) for node in free])
        return pinned + (span if need.nodes is not None else "")
    if not _splits_fit([node.amount for node in free], need.amount, spans, need.unit):
        if need.size:
            have = per_node([(node.id, str(node.amount)) for node in free])
            return f"hugepages {need.size}: need {need.amount}, {have}{span}"
        have = per_node([(node.id, human_size(node.amount)) for node in free])
        return f"memory: need {human_size(need.amount)} on NUMA nodes, {have}{span}"
    what = [f"{need.vcpus} pinned cpus" if need.pin else f"{need.vcpus} vCPUs"]
    what.append(f"{need.amount} {need.size} hugepages" if need.size else f"{human_size(need.amount)} memory")
    if sriov:
        what.append("a NUMA-local SR-IOV VF")

    def cpus(node: NodeFree) -> str:
        return f"{node.threads} cpus and " if need.pin else ""

    def amount(node: NodeFree) -> str:
        return f"{node.amount} pages" if need.size else human_size(node.amount)

    have = per_node([(node.id, cpus(node) + amount(node)) for node in free])
    over = f"{need.nodes} NUMA nodes (numa_nodes)" if need.nodes is not None else "NUMA nodes"
    return f"no even split over {over} holds {' and '.join(what)} together; {have}"
