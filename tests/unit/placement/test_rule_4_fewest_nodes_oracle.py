"""Rule 4 exactly: a NUMA-bound VM spans the FEWEST nodes an even split allows, never one more.

The oracle here tries every node subset by size (fine for 2-6 nodes, which is the point: the
engine must match it without trying subsets). It reads free threads, pages and memory per node
from `compute_usage` and checks the even split directly: over k nodes, the k vCPU shares and the k
amount shares (each differing by at most one unit) must each fit some order of the chosen nodes.
"""

from __future__ import annotations

import math
from itertools import combinations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.unit.hosts import GiB, MiB, synthetic_host
from vmhost.model import Allocation, Cell, HostTopology, HugepageAllocation, Nic, Policy, VmRequest
from vmhost.parse import HUGEPAGE_SIZES
from vmhost.placement import PlacementError, compute_usage, place

SETTINGS = settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def even(total: int, parts: int, unit: int = 1) -> list[int]:
    """Shares of `total` differing by at most `unit` (1 when `total` is not a multiple), larger first."""
    if total % unit:
        unit = 1
    base, extra = divmod(total // unit, parts)
    return [(base + (i < extra)) * unit for i in range(parts)]


def fits(shares: list[int], have: list[int]) -> bool:
    """Shares can be given one per node without exceeding any: largest share to the roomiest node."""
    return all(s <= h for s, h in zip(shares, sorted(have, reverse=True), strict=True))


def oracle(host: HostTopology, allocs: list[Allocation], r: VmRequest, policy: Policy) -> tuple[str | None, int]:
    """(hugepage size, fewest nodes) the request can be placed on, or (None, 0) when nothing fits.

    With `numa_nodes` set, only that many nodes count (rule 4 as the request narrows it)."""
    usage = compute_usage(host, allocs, policy)
    pin = r.pinned_cores is not None
    if pin:
        free_total = sum(len(n.free_threads) for n in usage.nodes)
        used = usage.shared_vcpus_used
        keep = math.ceil(used / policy.cpu_overcommit_ratio - 1e-9) if used else 0
        if r.cores > free_total - keep:
            return None, 0
    elif usage.shared_vcpus_used + r.cores > usage.shared_vcpus_capacity:
        return None, 0
    if not r.hugepages_backed:
        sizes = [None]
    elif r.hugepage_size:
        sizes = [r.hugepage_size]
    else:
        sizes = [s for s in ("1G", "2M") if r.memory % HUGEPAGE_SIZES[s] == 0]
    for size in sizes:
        if size is None and usage.memory_used + r.memory > usage.memory_capacity:
            continue
        amount = r.memory // HUGEPAGE_SIZES[size] if size else r.memory
        unit = 1 if size else 1024
        top = min(len(usage.nodes), r.cores, amount // unit)
        ks = range(1, top + 1) if r.numa_nodes is None else [r.numa_nodes] if r.numa_nodes <= top else []
        for k in ks:
            cpu, amt = even(r.cores, k), even(amount, k, unit)
            for nodes in combinations(usage.nodes, k):
                if pin and not fits(cpu, [len(n.free_threads) for n in nodes]):
                    continue
                have = [n.hugepages_free(size) if size else n.memory_free for n in nodes]
                if fits(amt, have):
                    return size, k
    return None, 0


@st.composite
def loaded_hosts(draw) -> tuple[HostTopology, list[Allocation], Policy]:
    """2-6 nodes with uneven residents: pinned threads, used 2M/1G pages and bound memory per node."""
    n_nodes = draw(st.sampled_from([3, 4, 5, 6, 2]))
    cores = draw(st.integers(1, 4))
    tpc = draw(st.integers(1, 2))
    # Few pages per node, so that a node holding exactly the low share (not the high) is common.
    pages = [{"2M": draw(st.sampled_from([0, 3, 4, 6, 8, 512])), "1G": draw(st.integers(0, 4))} for _ in range(n_nodes)]
    host = synthetic_host(n_nodes, cores, tpc, 8 * GiB, pages)
    policy = Policy(cpu_overcommit_ratio=16.0)  # residents' shared vCPUs barely limit pinning
    allocs: list[Allocation] = []
    for node in host.nodes:
        n = node.id
        threads = list(host.node_threads[n])
        pinned = draw(st.lists(st.sampled_from(threads), unique=True, max_size=len(threads)))
        memory = draw(st.integers(0, 6 * 1024)) * MiB  # of the node's 8G less its hugepages
        memory = min(memory, node.memory - node.hugepage_bytes())
        if pinned or memory:
            vcpus = max(1, len(pinned))
            cell = Cell(node=n, vcpus=tuple(range(vcpus)), memory=memory or MiB)
            allocs.append(
                Allocation(
                    name=f"r{n}",
                    vcpus=vcpus,
                    memory=cell.memory,
                    pinned=tuple(pinned) or None,
                    numa_nodes=(n,),
                    cells=(cell,),
                )
            )
        for size, total in node.hugepages.items():
            used = draw(st.integers(0, total)) if total else 0
            if used:
                mem = used * HUGEPAGE_SIZES[size]
                hp = HugepageAllocation(size=size, per_node={n: used})
                cell = Cell(node=n, vcpus=(0,), memory=mem)
                allocs.append(
                    Allocation(f"h{n}-{size}", 1, mem, pinned=None, numa_nodes=(n,), hugepages=hp, cells=(cell,))
                )
    return host, allocs, policy


@st.composite
def bound_requests(draw, host: HostTopology, allocs: list[Allocation], policy: Policy) -> VmRequest:
    """Pinned, hugepage or both, sized to what some nodes have free (less a little): the boundary,
    where whether k nodes do depends on which of them can take a remainder."""
    usage = compute_usage(host, allocs, policy)
    ids = [n.node for n in usage.nodes]
    kind = draw(st.sampled_from(["pinned", "hugepages", "both"]))
    on = draw(st.permutations(ids))[: draw(st.integers(1, len(ids)))]
    cores = max(1, sum(len(usage.node(i).free_threads) for i in on) - draw(st.integers(0, 2)))
    if draw(st.booleans()):  # the amount from other nodes than the vCPUs, half the time
        on = draw(st.permutations(ids))[: draw(st.integers(1, len(ids)))]
    less = draw(st.integers(0, 2))
    size = None
    if kind == "pinned":
        memory = max(1, sum(usage.node(i).memory_free for i in on) // MiB - less) * MiB
    else:
        size = draw(st.sampled_from(["2M", "1G", None]))
        basis = "1G" if size == "1G" or (size is None and draw(st.booleans())) else "2M"
        memory = max(1, sum(usage.node(i).hugepages_free(basis) for i in on) - less) * HUGEPAGE_SIZES[basis]
    return VmRequest(
        cores=cores,
        memory=memory,
        pinned_cores="auto" if kind != "hugepages" else None,
        hugepages_backed=kind != "pinned",
        hugepage_size=size,
        name="new",
        # A third of the requests name their node count (often one that does not fit), like Nova's hw:numa_nodes.
        numa_nodes=draw(st.one_of(st.none(), st.none(), st.integers(1, len(ids)))),
    )


def check_fewest_nodes(place_fn, host, allocs, r, policy) -> None:
    size, k = oracle(host, allocs, r, policy)
    try:
        a = place_fn(host, allocs, r, policy)
    except PlacementError as e:
        assert k == 0, f"refused ({e}) but {k} node(s) of {size} hold it"
        event("refused")
        return
    assert k, f"placed on {a.numa_nodes} but no even split fits"
    event(f"placed on {k} node(s)")
    assert len(a.numa_nodes) == k, (a, size, k)
    assert (a.hugepages.size if a.hugepages else None) == size
    # What was given fits what was free, node by node, and is split evenly.
    usage = compute_usage(host, allocs, policy)
    for c in a.cells:
        nu = usage.node(c.node)
        if a.pinned is not None:
            assert {a.pinned[v] for v in c.vcpus} <= set(nu.free_threads)
        if size:
            assert a.hugepages.per_node[c.node] <= nu.hugepages_free(size)
        else:
            assert c.memory <= nu.memory_free
    assert max(len(c.vcpus) for c in a.cells) - min(len(c.vcpus) for c in a.cells) <= 1
    amounts = [a.hugepages.per_node[c.node] for c in a.cells] if size else [c.memory for c in a.cells]
    assert max(amounts) - min(amounts) <= (1 if size else 1024)


@SETTINGS
@given(data=st.data())
def test_engine_uses_exactly_the_fewest_nodes_an_even_split_allows(data):
    host, allocs, policy = data.draw(loaded_hosts())
    for _ in range(6):  # several requests per host: the host is the costly part to draw
        check_fewest_nodes(place, host, allocs, data.draw(bound_requests(host, allocs, policy)), policy)


# --- hand-made remainder cases ---------------------------------------------------------------------


def pin(name: str, threads: tuple[int, ...], node: int) -> Allocation:
    return Allocation(name=name, vcpus=len(threads), memory=GiB, pinned=threads, numa_nodes=(node,))


def pages(name: str, node: int, n: int, size: str = "2M") -> Allocation:
    mem = n * HUGEPAGE_SIZES[size]
    return Allocation(
        name=name,
        vcpus=1,
        memory=mem,
        numa_nodes=(node,),
        hugepages=HugepageAllocation(size=size, per_node={node: n}),
        cells=(Cell(node=node, vcpus=(0,), memory=mem),),
    )


def shares(a: Allocation) -> dict[int, tuple[int, int]]:
    """node -> (vCPUs, pages or bytes)."""
    if a.hugepages:
        return {c.node: (len(c.vcpus), a.hugepages.per_node[c.node]) for c in a.cells}
    return {c.node: (len(c.vcpus), c.memory) for c in a.cells}


def test_odd_vcpus_over_two_nodes_where_only_one_takes_the_extra():
    # 4 nodes x 4 threads. Free: node 0 has 2, node 1 has 3, nodes 2 and 3 have 2.
    host = synthetic_host(nodes=4, cores_per_node=4, threads_per_core=1, memory_per_node=8 * GiB)
    allocs = [pin("a", (0, 1), 0), pin("b", (4,), 1), pin("c", (8, 9), 2), pin("d", (12, 13), 3)]
    a = place(host, allocs, VmRequest(cores=5, memory=2 * GiB, pinned_cores="auto"), Policy())
    # 3 + 2: node 1 is the only node with 3 free, so it must be in the set and take the 3.
    assert len(a.numa_nodes) == 2 and 1 in a.numa_nodes
    assert shares(a)[1][0] == 3
    assert a.numa_nodes == (0, 1)  # best fit ties between nodes 0, 2, 3 go to the lowest id


def test_pages_remainder_on_a_different_node_than_the_vcpu_remainder():
    # 3 nodes x 2 threads, 100 x 2M pages each. Node 0: 2 threads, 40 pages free; node 1: 1 thread,
    # 41 pages free; node 2: no pages. 3 vCPUs and 81 pages over 2 nodes: 2 + 1 vCPUs, 41 + 40 pages.
    host = synthetic_host(nodes=3, cores_per_node=2, threads_per_core=1, memory_per_node=8 * GiB, hugepages={"2M": 100})
    allocs = [pages("p0", 0, 60), pin("t1", (2,), 1), pages("p1", 1, 59), pages("p2", 2, 100)]
    r = VmRequest(cores=3, memory=81 * 2 * MiB, pinned_cores="auto", hugepages_backed=True, hugepage_size="2M")
    a = place(host, allocs, r, Policy(cpu_overcommit_ratio=4.0))
    # The vCPU remainder can only go to node 0 and the page remainder only to node 1.
    assert shares(a) == {0: (2, 40), 1: (1, 41)}


def test_both_remainders_need_a_node_that_takes_both_high_shares():
    # 3 vCPUs and 3G of 1G pages over 2 nodes: 2 + 1 of each. Node 0 has 2 threads but 1 page,
    # node 1 has 1 thread and 2 pages, node 2 has 2 threads and 2 pages: over 2 nodes the split
    # fits {0, 1} (each takes one remainder) and {0, 2}, {1, 2}; best fit is the tightest.
    host = synthetic_host(nodes=3, cores_per_node=2, threads_per_core=1, memory_per_node=8 * GiB, hugepages={"1G": 2})
    allocs = [pages("p0", 0, 1, "1G"), pin("t1", (2,), 1)]
    r = VmRequest(cores=3, memory=3 * GiB, pinned_cores="auto", hugepages_backed=True, hugepage_size="1G")
    a = place(host, allocs, r, Policy())
    assert shares(a) == {0: (2, 1), 1: (1, 2)}


def test_three_nodes_with_both_remainders_not_overlapping():
    # 4 vCPUs (2+1+1) and 5 pages (2+2+1) over 3 nodes, each node able to take only one remainder
    # kind: one takes the 2 threads, two the 2 pages; the fourth node holds only the low shares.
    host = synthetic_host(nodes=4, cores_per_node=2, threads_per_core=1, memory_per_node=8 * GiB, hugepages={"1G": 2})
    allocs = [
        pages("p0", 0, 1, "1G"),  # node 0: 2 threads, 1 page -> vCPU remainder only
        pin("t1", (2,), 1),  # node 1: 1 thread, 2 pages -> page remainder only
        pin("t2", (4,), 2),  # node 2: 1 thread, 2 pages -> page remainder only
        pin("t3", (6,), 3),
        pages("p3", 3, 1, "1G"),  # node 3: 1 thread, 1 page -> low shares only
    ]
    policy = Policy(cpu_overcommit_ratio=4.0)
    r = VmRequest(cores=4, memory=5 * GiB, pinned_cores="auto", hugepages_backed=True, hugepage_size="1G")
    a = place(host, allocs, r, policy)
    assert shares(a) == {0: (2, 1), 1: (1, 2), 2: (1, 2)}


def test_remainders_that_need_a_node_holding_both_move_to_more_nodes():
    # 5 vCPUs and 5 pages over 3 nodes is 2+2+1 of each: 2 + 2 remainder takers among 3 nodes means
    # one node takes both high shares, and none can (2 threads and 1 page, or 1 thread and 2 pages).
    # Over 4 nodes (2+1+1+1 of each, the remainders on different nodes) it fits, and 4 is the fewest.
    host = synthetic_host(nodes=4, cores_per_node=2, threads_per_core=1, memory_per_node=8 * GiB, hugepages={"1G": 2})
    allocs = [pages("p0", 0, 1, "1G"), pages("p1", 1, 1, "1G"), pin("t2", (4,), 2), pin("t3", (6,), 3)]
    r = VmRequest(cores=5, memory=5 * GiB, pinned_cores="auto", hugepages_backed=True, hugepage_size="1G")
    a = place(host, allocs, r, Policy(cpu_overcommit_ratio=4.0))
    assert a.numa_nodes == (0, 1, 2, 3)
    assert sorted(shares(a).values()) == [(1, 1), (1, 1), (1, 2), (2, 1)]
    assert oracle(host, allocs, r, Policy(cpu_overcommit_ratio=4.0)) == ("1G", 4)


def test_high_shares_go_to_the_node_the_fit_measure_prefers():
    # 2 nodes x 4 threads, 8G each: node 0 has 3 threads and 7G free, node 1 has 4 and 8G. 5 vCPUs over 2:
    # the 3 goes to node 1; on node 0 it would take every thread and strand its 6.5G (rule 4's fit measure).
    host = synthetic_host(nodes=2, cores_per_node=4, threads_per_core=1, memory_per_node=8 * GiB)
    a = place(host, [pin("a", (0,), 0)], VmRequest(cores=5, memory=GiB, pinned_cores="auto"), Policy())
    assert {n: c for n, (c, _) in shares(a).items()} == {0: 2, 1: 3}
    # With node 0's memory in proportion to its threads (3 of 4 free), it takes the 3: nothing is stranded.
    heavy = Allocation(name="a", vcpus=1, memory=2 * GiB, pinned=(0,), numa_nodes=(0,))
    b = place(host, [heavy], VmRequest(cores=5, memory=2 * GiB, pinned_cores="auto"), Policy())
    assert {n: c for n, (c, _) in shares(b).items()} == {0: 3, 1: 2}


def test_sriov_local_node_is_in_the_fewest_node_set_even_when_it_takes_only_low_shares():
    # 3 nodes x 4 threads; the VF asked for is local to node 2 only, which has 2 threads free.
    # 5 vCPUs need 2 nodes (3 + 2); node 2 takes the 2 and node 0 or 1 the 3.
    nics = (Nic(name="pf2", numa_node=2, sriov_max_vfs=4, addresses=("10.20.0.5/24",)),)
    host = synthetic_host(nodes=3, cores_per_node=4, threads_per_core=1, memory_per_node=8 * GiB, nics=nics)
    allocs = [pin("a", (8, 9), 2)]
    r = VmRequest.from_dict(
        {"cores": 5, "memory": "2G", "pinned_cores": "auto", "interfaces": "eth0:name=pf2,type=sriov"}
    )
    a = place(host, allocs, r, Policy())
    assert a.numa_nodes == (0, 2)
    assert shares(a)[2][0] == 2 and shares(a)[0][0] == 3
    assert (a.nics[0].type, a.nics[0].parent) == ("sriov", "pf2")


def test_a_vm_never_gets_a_guest_cell_without_memory():
    """One 1G page cannot be split over nodes: if no single node has it free, the VM does not fit."""
    host = synthetic_host(3, 2, 1, 8 * GiB, [{"1G": 0}, {"1G": 0}, {"1G": 1}])
    placed = place(
        host, [], VmRequest.from_dict({"cores": 3, "memory": "1G", "hugepage_size": "1G", "name": "a"}), Policy()
    )
    assert [c.node for c in placed.cells] == [2] and all(c.memory > 0 for c in placed.cells)
    host = synthetic_host(3, 2, 1, 8 * GiB, [{"1G": 1}, {"1G": 1}, {"1G": 1}])
    two = VmRequest.from_dict({"cores": 3, "memory": "2G", "hugepage_size": "1G", "pinned_cores": "auto", "name": "b"})
    placed = place(host, [], two, Policy())
    assert len(placed.cells) == 2 and all(c.memory == GiB for c in placed.cells)
