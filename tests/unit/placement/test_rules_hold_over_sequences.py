"""Rules 1-6 of docs/design.md §4 hold after every step of random compose/decompose sequences.

Hosts of 1-16 NUMA nodes with SMT 1-2, hugepages of both sizes, overcommit ratios, reserved cores and
memory. Every check is made against an oracle written here from the rules, not against
`compute_usage`, so a bug in the shared usage code cannot hide itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.hosts import GiB, MiB, hosts, policies
from vmhost.model import Allocation, HostTopology, Policy, VmRequest
from vmhost.parse import HUGEPAGE_SIZES
from vmhost.placement import PlacementError, UsageIndex, compute_usage, place

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Free:
    """What is left, computed straight from the rules."""

    threads: dict[int, set[int]]  # node -> free threads
    pages: dict[tuple[int, str], int]  # (node, size) -> free pages
    node_memory: dict[int, int]  # node -> general memory left for NUMA-bound VMs
    shared_used: int
    shared_capacity: int
    memory_used: int
    memory_capacity: int

    @property
    def free_total(self) -> int:
        return sum(len(t) for t in self.threads.values())


def even(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def oracle(host: HostTopology, policy: Policy, allocs: list[Allocation]) -> Free:
    reserved = set(policy.reserved_cores)
    pinned = {t for a in allocs for t in (a.pinned or ())}
    threads = {n.id: {t for t in n.threads if t not in reserved and t not in pinned} for n in host.nodes}
    pages = {(n.id, s): n.hugepages.get(s, 0) for n in host.nodes for s in HUGEPAGE_SIZES}
    share = even(policy.reserved_memory, len(host.nodes))
    node_memory = {
        n.id: max(0, int((n.memory - n.hugepage_bytes() - share[i]) * policy.memory_overcommit_ratio))
        for i, n in enumerate(host.nodes)
    }
    for a in allocs:
        if a.hugepages:
            for n, p in a.hugepages.per_node.items():
                pages[n, a.hugepages.size] -= p
        else:
            for c in a.cells:
                node_memory[c.node] -= c.memory
    free_total = sum(len(t) for t in threads.values())
    general = sum(n.memory - n.hugepage_bytes() for n in host.nodes) - policy.reserved_memory
    return Free(
        threads=threads,
        pages=pages,
        node_memory=node_memory,
        shared_used=sum(a.vcpus for a in allocs if a.pinned is None),
        shared_capacity=math.floor(free_total * policy.cpu_overcommit_ratio + 1e-9),
        memory_used=sum(a.memory for a in allocs if a.hugepages is None),
        memory_capacity=max(0, int(general * policy.memory_overcommit_ratio)),
    )


def check_invariants(host: HostTopology, policy: Policy, allocs: list[Allocation]) -> None:
    free = oracle(host, policy, allocs)
    # Rule 1: a pinned thread belongs to one VM, exists, and is never reserved.
    pinned = [t for a in allocs for t in (a.pinned or ())]
    assert len(pinned) == len(set(pinned))
    assert set(pinned) <= set(host.thread_node)
    assert not set(pinned) & set(policy.reserved_cores)
    # Rule 2: shared vCPUs within capacity (pinning never shrank it below use).
    assert free.shared_used <= free.shared_capacity
    # Rule 3: hugepages never overcommitted; general memory within capacity, host-wide and per node.
    assert all(v >= 0 for v in free.pages.values()), free.pages
    assert free.memory_used <= free.memory_capacity
    assert all(v >= 0 for v in free.node_memory.values()), free.node_memory
    # The usage view agrees with the oracle.
    usage = compute_usage(host, allocs, policy)
    assert usage.shared_vcpus_used == free.shared_used and usage.shared_vcpus_capacity == free.shared_capacity
    assert usage.memory_used == free.memory_used and usage.memory_capacity == free.memory_capacity
    for nu in usage.nodes:
        assert set(nu.free_threads) == free.threads[nu.node]
        for s, (total, used) in nu.hugepages.items():
            assert total - used == free.pages[nu.node, s]
    for a in allocs:
        check_shape(host, a)


def check_shape(host: HostTopology, a: Allocation) -> None:
    """Rule 4/5 shape: cells mirror the host split, evenly; pinned vCPUs sit on their cell's node."""
    if a.pinned is None and a.hugepages is None:
        assert a.cells == () and a.numa_nodes == ()
        return
    assert [c.node for c in a.cells] == list(a.numa_nodes) == sorted(set(a.numa_nodes))
    assert sorted(v for c in a.cells for v in c.vcpus) == list(range(a.vcpus))
    assert sum(c.memory for c in a.cells) == a.memory
    sizes = [len(c.vcpus) for c in a.cells]
    assert all(s >= 1 for s in sizes)
    if a.pinned is not None:
        assert len(a.pinned) == a.vcpus
        for c in a.cells:
            assert {host.thread_node[a.pinned[v]] for v in c.vcpus} == {c.node}
    if a.hugepages is not None:
        page = HUGEPAGE_SIZES[a.hugepages.size]
        assert {c.node: c.memory // page for c in a.cells} == a.hugepages.per_node
        assert all(c.memory % page == 0 for c in a.cells)


def single_node_fits(free: Free, policy: Policy, r: VmRequest, size: str | None) -> list[int]:
    """Nodes that could hold all of an automatically placed NUMA-bound request on their own."""
    if r.pinned_cores == "auto":
        keep = math.ceil(free.shared_used / policy.cpu_overcommit_ratio - 1e-9) if free.shared_used else 0
        if free.free_total - r.cores < keep:
            return []
    elif free.shared_used + r.cores > free.shared_capacity:
        return []
    if size is None and free.memory_used + r.memory > free.memory_capacity:
        return []
    out = []
    for n, threads in free.threads.items():
        if r.pinned_cores == "auto" and len(threads) < r.cores:
            continue
        if size is not None and free.pages[n, size] < r.memory // HUGEPAGE_SIZES[size]:
            continue
        if size is None and free.node_memory[n] < r.memory:
            continue
        out.append(n)
    return out


@st.composite
def requests(draw, host: HostTopology) -> VmRequest:
    threads = sorted(host.thread_node)
    kind = draw(st.sampled_from(["floating", "auto", "explicit", "hugepages", "auto-hugepages", "explicit-hugepages"]))
    hp = "hugepages" in kind
    size = draw(st.sampled_from([None, "2M", "1G"])) if hp else None
    if size == "1G" or (hp and size is None and draw(st.booleans())):
        memory = draw(st.integers(1, 4)) * GiB
    else:
        memory = draw(st.sampled_from([128, 256, 512, 1024, 2048, 3072])) * MiB
    per_node = len(host.nodes[0].threads)
    cores = draw(st.integers(1, min(len(threads), max(2, per_node * 2 + 1))))
    pinned: object = None
    if kind.startswith("auto"):
        pinned = "auto"
    elif kind.startswith("explicit"):
        pinned = draw(st.lists(st.sampled_from(threads), min_size=cores, max_size=cores, unique=True))
    return VmRequest.from_dict(
        {
            "cores": cores,
            "memory": memory,
            "pinned_cores": pinned,
            "hugepages_backed": hp,
            "hugepage_size": size,
        }
    )


def step_compose(host, policy, allocs, r: VmRequest, name: str) -> Allocation | None:
    before = oracle(host, policy, allocs)
    r = replace(r, name=name)
    try:
        a = place(host, allocs, r, policy)
    except PlacementError as e:
        assert str(e)  # one sentence, never empty
        event("refused: " + re.sub(r"\d+", "N", str(e))[:28])
        assert_truly_infeasible(host, policy, allocs, before, r)
        return None
    assert a.name == name and a.vcpus == r.cores and a.memory == r.memory
    event(f"placed on {min(len(a.numa_nodes), 3)} node(s), pinned={a.pinned is not None}, tpc={a.threads_per_core}")
    if isinstance(r.pinned_cores, tuple):
        assert sorted(a.pinned) == sorted(r.pinned_cores)
    if r.hugepages_backed:
        assert a.hugepages is not None
        assert r.hugepage_size in (None, a.hugepages.size)
        assert a.hugepages.pages * HUGEPAGE_SIZES[a.hugepages.size] == r.memory
    if r.numa_bound and r.pinned_cores in ("auto", None):
        size = a.hugepages.size if a.hugepages else None
        # Rule 4: one node whenever one node could hold it all (exactly numa_nodes when the request says).
        if r.numa_nodes is not None:
            assert len(a.numa_nodes) == r.numa_nodes
        elif single_node_fits(before, policy, r, size):
            assert len(a.numa_nodes) == 1, (a, single_node_fits(before, policy, r, size))
    if r.pinned_cores == "auto":
        # Rule 5: whole cores first. Per node, at most one core is split leaving a free sibling behind.
        free_before = set().union(*before.threads.values())
        taken = set(a.pinned)
        for n in a.numa_nodes:
            split = [c for c in host.node(n).cores if taken & set(c.threads) and (set(c.threads) & free_before) - taken]
            assert len(split) <= 1, (n, split)
        if a.threads_per_core > 1:
            assert all(set(host.siblings[t]) <= taken for t in taken)
    return a


def assert_truly_infeasible(host, policy, allocs, before: Free, r: VmRequest) -> None:
    """A refusal is only allowed when the request could not fit in the obvious ways."""
    if not r.numa_bound:
        assert (
            before.shared_used + r.cores > before.shared_capacity
            or before.memory_used + r.memory > before.memory_capacity
        )
        return
    if r.numa_nodes not in (None, 1):
        return  # exactly N nodes: test_placement_minimal's oracle checks that split
    if r.pinned_cores in ("auto", None):
        sizes = [None]
        if r.hugepages_backed:
            sizes = (
                [r.hugepage_size] if r.hugepage_size else [s for s in ("1G", "2M") if r.memory % HUGEPAGE_SIZES[s] == 0]
            )
        for size in sizes:
            assert not single_node_fits(before, policy, r, size), f"refused but node(s) could hold it with {size}"
        return
    # Explicit list: refused only if a thread is taken/reserved/offline, or its nodes lack memory/pages.
    cpus = r.pinned_cores
    free_threads = set().union(*before.threads.values())
    if not set(cpus) <= free_threads:
        return
    keep = math.ceil(before.shared_used / policy.cpu_overcommit_ratio - 1e-9) if before.shared_used else 0
    if before.free_total - len(cpus) < keep:
        return
    nodes = sorted({host.thread_node[t] for t in cpus})
    if r.numa_nodes is not None and len(nodes) != r.numa_nodes:
        return
    sizes = [None]
    if r.hugepages_backed:
        sizes = [r.hugepage_size] if r.hugepage_size else [s for s in ("1G", "2M") if r.memory % HUGEPAGE_SIZES[s] == 0]
    for size in sizes:
        if size is None:
            if before.memory_used + r.memory > before.memory_capacity:
                continue
            need = sorted(even(r.memory // 1024, len(nodes)), reverse=True)
            have = sorted((before.node_memory[n] // 1024 for n in nodes), reverse=True)
        else:
            need = sorted(even(r.memory // HUGEPAGE_SIZES[size], len(nodes)), reverse=True)
            have = sorted((before.pages[n, size] for n in nodes), reverse=True)
        assert not all(h >= x for h, x in zip(have, need, strict=True)), "explicit list refused though it fits"


@SETTINGS
@given(data=st.data())
def test_rules_hold_over_compose_decompose_sequences(data):
    host = data.draw(hosts())
    policy = data.draw(policies(host))
    allocs: list[Allocation] = []
    for i in range(data.draw(st.integers(1, 25), label="steps")):
        if allocs and data.draw(st.integers(0, 3)) == 0:
            allocs.pop(data.draw(st.integers(0, len(allocs) - 1)))
        else:
            a = step_compose(host, policy, allocs, data.draw(requests(host)), f"vm{i}")
            if a is not None:
                allocs.append(a)
        check_invariants(host, policy, allocs)


@SETTINGS
@given(data=st.data())
def test_a_usage_index_always_agrees_with_counting_from_scratch(data):
    """Rule 6 (cost): the index is updated by name and content: VMs added, removed, changed in place (same name,
    other resources), re-read as equal new objects, listed in another order, under another policy."""
    host = data.draw(hosts(max_nodes=8))
    policy = data.draw(policies(host))
    index = UsageIndex()
    allocs: list[Allocation] = []
    for i in range(data.draw(st.integers(1, 20), label="steps")):
        op = data.draw(st.sampled_from(["compose", "compose", "decompose", "change", "reread", "shuffle", "policy"]))
        if op == "decompose" and allocs:
            allocs.pop(data.draw(st.integers(0, len(allocs) - 1)))
        elif op == "change" and allocs:
            j = data.draw(st.integers(0, len(allocs) - 1))
            a = step_compose(host, policy, allocs[:j] + allocs[j + 1 :], data.draw(requests(host)), allocs[j].name)
            if a is not None:
                allocs[j] = a
        elif op == "reread":
            allocs = [Allocation.from_dict(a.to_dict()) for a in allocs]
        elif op == "shuffle":
            allocs = data.draw(st.permutations(allocs))
        elif op == "policy":
            policy = data.draw(policies(host))
        else:
            r = data.draw(requests(host))
            if data.draw(st.booleans()):  # numa_nodes binds even a VM neither pinned nor on hugepages
                r = replace(r, numa_nodes=data.draw(st.integers(1, min(len(host.nodes), r.cores))))
            a = step_compose(host, policy, allocs, r, f"vm{i}")
            if a is not None:
                allocs.append(a)
        event(op)
        assert compute_usage(host, allocs, policy, index=index) == compute_usage(host, allocs, policy)
        r = data.draw(requests(host))
        assert outcome(host, allocs, r, policy, index) == outcome(host, allocs, r, policy, None)


def outcome(host, allocs, r, policy, index) -> dict | str:
    try:
        return place(host, allocs, r, policy, index=index).to_dict()
    except PlacementError as e:
        return str(e)


@SETTINGS
@given(data=st.data())
def test_requests_beyond_free_capacity_are_refused(data):
    host = data.draw(hosts(max_nodes=8))
    policy = data.draw(policies(host))
    allocs: list[Allocation] = []
    for i in range(data.draw(st.integers(0, 6))):
        a = step_compose(host, policy, allocs, data.draw(requests(host)), f"vm{i}")
        if a is not None:
            allocs.append(a)
    free = oracle(host, policy, allocs)
    too_many_threads = VmRequest(cores=free.free_total + 1, memory=128 * MiB, pinned_cores="auto")
    total_2m = sum(v for (_, s), v in free.pages.items() if s == "2M")
    too_many_pages = VmRequest(
        cores=len(host.nodes), memory=(total_2m + 1) * 2 * MiB, hugepages_backed=True, hugepage_size="2M"
    )
    too_much_memory = VmRequest(cores=1, memory=free.memory_capacity - free.memory_used + MiB)
    too_many_shared = VmRequest(cores=free.shared_capacity - free.shared_used + 1, memory=128 * MiB)
    for r in (too_many_threads, too_many_pages, too_much_memory, too_many_shared):
        try:
            place(host, allocs, r, policy)
        except PlacementError as e:
            assert str(e)
        else:
            raise AssertionError(f"{r} was placed beyond free capacity")


@SETTINGS
@given(data=st.data())
def test_placement_is_deterministic(data):
    host = data.draw(hosts(max_nodes=8))
    policy = data.draw(policies(host))
    rs = data.draw(st.lists(requests(host), min_size=1, max_size=8))

    def run() -> list[dict | str]:
        allocs, out = [], []
        for i, r in enumerate(rs):
            try:
                a = place(host, allocs, replace(r, name=f"vm{i}"), policy)
            except PlacementError as e:
                out.append(str(e))
            else:
                allocs.append(a)
                out.append(a.to_dict())
        return out

    assert run() == run()
    # Fresh copies of every object give the same answers (no caching by identity leaks through).
    host2 = HostTopology.from_dict(host.to_dict())
    allocs_a: list[Allocation] = []
    allocs_b: list[Allocation] = []
    for i, r in enumerate(rs):
        r = replace(r, name=f"vm{i}")
        try:
            a = place(host, allocs_a, r, policy)
        except PlacementError as e:
            try:
                place(host2, [Allocation.from_dict(x.to_dict()) for x in allocs_b], r, policy)
            except PlacementError as e2:
                assert str(e) == str(e2)
            else:
                raise AssertionError("copies disagree") from None
            continue
        b = place(host2, [Allocation.from_dict(x.to_dict()) for x in allocs_b], r, policy)
        assert a == b
        allocs_a.append(a)
        allocs_b.append(b)
