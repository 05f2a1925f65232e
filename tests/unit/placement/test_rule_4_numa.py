"""Rule 4 (docs/design.md §4): one node when possible, else the fewest nodes (or exactly `numa_nodes`),
split evenly, guest cells mirroring the split, best fit; SR-IOV locality comes first."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.hosts import GiB, MiB, synthetic_host
from tests.unit.placement.common import req, sriov_host
from vmhost.model import Allocation, HugepageAllocation, Policy, VmRequest
from vmhost.parse import ParseError
from vmhost.placement import PlacementError, compute_usage, place


def test_one_node_when_one_node_can_hold_it():
    host = synthetic_host(nodes=4, cores_per_node=4, threads_per_core=2, memory_per_node=16 * GiB)
    a = place(host, [], req(cores=8, memory="8G", pinned_cores="auto"), Policy())
    assert a.numa_nodes == (0,)
    assert {host.thread_node[t] for t in a.pinned} == {0}
    assert a.cells == (a.cells[0],) and a.cells[0].vcpus == tuple(range(8)) and a.cells[0].memory == 8 * GiB


def test_spans_fewest_nodes_evenly_with_mirrored_cells():
    host = synthetic_host(nodes=4, cores_per_node=4, threads_per_core=2, memory_per_node=16 * GiB, hugepages={"1G": 8})
    a = place(host, [], req(cores=16, memory="16G", pinned_cores="auto", hugepage_size="1G"), Policy())
    assert a.numa_nodes == (0, 1)  # 2 nodes of 8 threads, not 3 or 4
    assert a.hugepages.per_node == {0: 8, 1: 8}
    assert [c.node for c in a.cells] == [0, 1]
    assert [c.vcpus for c in a.cells] == [tuple(range(8)), tuple(range(8, 16))]
    assert [c.memory for c in a.cells] == [8 * GiB, 8 * GiB]
    for cell in a.cells:  # each cell's vCPUs are pinned to threads of its own node
        assert {host.thread_node[a.pinned[v]] for v in cell.vcpus} == {cell.node}
    assert a.threads_per_core == 2


def test_uneven_split_differs_by_at_most_one():
    host = synthetic_host(nodes=3, cores_per_node=2, threads_per_core=1, memory_per_node=8 * GiB)
    a = place(host, [], req(cores=5, memory="3G", pinned_cores="auto"), Policy())
    assert len(a.numa_nodes) == 3
    assert sorted(len(c.vcpus) for c in a.cells) == [1, 2, 2]
    assert sum(c.memory for c in a.cells) == 3 * GiB
    assert max(c.memory for c in a.cells) - min(c.memory for c in a.cells) <= 1024


def test_hugepage_memory_is_split_evenly_in_pages():
    host = synthetic_host(
        nodes=2, cores_per_node=1, threads_per_core=1, memory_per_node=4 * GiB, hugepages={"2M": 1000}
    )
    a = place(host, [], req(cores=2, memory=f"{1500 * 2}M", hugepage_size="2M"), Policy())
    assert sorted(a.hugepages.per_node.values()) == [750, 750]
    assert [c.memory for c in a.cells] == [750 * 2 * MiB] * 2


def test_best_fit_picks_the_node_with_least_left_over():
    host = synthetic_host(nodes=3, cores_per_node=4, threads_per_core=1, memory_per_node=16 * GiB)
    # Node 0 all free; node 1 with 2 threads and 8G free; node 2 with 1 thread and 12G free: each in proportion.
    allocs = [
        Allocation(name="x", vcpus=2, memory=8 * GiB, pinned=(4, 5), numa_nodes=(1,)),
        Allocation(name="y", vcpus=3, memory=4 * GiB, pinned=(8, 9, 10), numa_nodes=(2,)),
    ]
    a = place(host, allocs, req(cores=2, memory="8G", pinned_cores="auto"), Policy())
    assert a.numa_nodes == (1,) and set(a.pinned) == {6, 7}


def test_fit_keeps_threads_and_memory_of_a_node_in_proportion():
    # Node 0: 1 thread and 12G free; node 1: 3 threads and 4G free. Threads-first best fit would take
    # node 0's last thread and strand its 10G; weighing both leaves node 0 for a memory-heavy VM.
    host = synthetic_host(nodes=2, cores_per_node=4, threads_per_core=1, memory_per_node=16 * GiB)
    allocs = [
        Allocation(name="x", vcpus=3, memory=4 * GiB, pinned=(0, 1, 2), numa_nodes=(0,)),
        Allocation(name="y", vcpus=1, memory=12 * GiB, pinned=(4,), numa_nodes=(1,)),
    ]
    a = place(host, allocs, req(cores=1, memory="2G", pinned_cores="auto"), Policy())
    assert a.numa_nodes == (1,)
    # Hugepages count as the node's memory too. Node 0: 7G general free, no pages; node 1: 5G general
    # and 8G of pages free. General-memory best fit alone would take node 1.
    host = synthetic_host(
        nodes=2, cores_per_node=4, threads_per_core=1, memory_per_node=16 * GiB, hugepages={"2M": 4096}
    )
    allocs = [
        Allocation(name="x", vcpus=2, memory=GiB, pinned=(0, 1), numa_nodes=(0,)),
        Allocation(name="h", vcpus=1, memory=8 * GiB, numa_nodes=(0,), hugepages=HugepageAllocation("2M", {0: 4096})),
        Allocation(name="y", vcpus=2, memory=3 * GiB, pinned=(4, 5), numa_nodes=(1,)),
    ]
    b = place(host, allocs, req(cores=2, memory="4G", pinned_cores="auto"), Policy())
    assert b.numa_nodes == (0,)  # node 1 would keep 9G with no thread free


def test_numa_nodes_1_never_spans_and_says_so():
    host = synthetic_host(
        nodes=2, cores_per_node=4, threads_per_core=2, memory_per_node=16 * GiB, hugepages={"2M": 4096}
    )
    spanning = req(cores=4, memory="12G", pinned_cores="auto", hugepage_size="2M")
    assert place(host, [], spanning, Policy()).numa_nodes == (0, 1)  # absent: the fewest nodes, here 2
    with pytest.raises(PlacementError) as e:
        place(host, [], replace(spanning, numa_nodes=1), Policy())
    assert (
        str(e.value)
        == "hugepages 2M: need 6144, node 0 has 4096 free, node 1 has 4096 (split evenly over numa_nodes=1)"
    )


def test_numa_nodes_n_takes_exactly_n_nodes_split_evenly_with_matching_cells():
    host = synthetic_host(nodes=4, cores_per_node=4, threads_per_core=2, memory_per_node=16 * GiB, hugepages={"1G": 8})
    a = place(host, [], req(cores=6, memory="4G", pinned_cores="auto", hugepage_size="1G", numa_nodes=2), Policy())
    assert len(a.numa_nodes) == 2 and sorted(a.hugepages.per_node.values()) == [2, 2]
    assert [len(c.vcpus) for c in a.cells] == [3, 3] and [c.memory for c in a.cells] == [2 * GiB, 2 * GiB]
    for cell in a.cells:
        assert {host.thread_node[a.pinned[v]] for v in cell.vcpus} == {cell.node}
    b = place(host, [], req(cores=5, memory="3G", numa_nodes=3), Policy())  # general memory, not pinned
    assert len(b.numa_nodes) == 3 and b.pinned is None and b.hugepages is None
    assert sorted(len(c.vcpus) for c in b.cells) == [1, 2, 2] and sum(c.memory for c in b.cells) == 3 * GiB


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"cores": 8, "pinned_cores": "auto", "numa_nodes": 4}, "numa_nodes 4: the host has 2 NUMA node(s)"),
        (
            {"cores": 2, "memory": "1G", "hugepage_size": "1G", "numa_nodes": 2},
            "numa_nodes 2: 1 1G hugepages cannot be split over 2 nodes (each cell needs some)",
        ),
        (
            {"cores": 2, "pinned_cores": [0, 1], "numa_nodes": 2},
            "numa_nodes 2: pinned cores 0-1 are on 1 NUMA node(s) (0); list cpus of exactly 2 node(s) "
            "or leave numa_nodes out",
        ),
        (
            {"cores": 10, "pinned_cores": "auto", "numa_nodes": 1},
            "pinned cpus: need 10, node 0 has 8 free, node 1 has 8 (split evenly over numa_nodes=1)",
        ),
    ],
)
def test_numa_nodes_refusals_name_the_constraint(request_, message):
    host = synthetic_host(nodes=2, cores_per_node=4, threads_per_core=2, memory_per_node=16 * GiB, hugepages={"1G": 1})
    with pytest.raises(PlacementError) as e:
        place(host, [], req(**request_), Policy())
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "numa_nodes 0 must be a whole number from 1 to 64 (1: never span)"),
        (65, "numa_nodes 65 must be a whole number from 1 to 64 (1: never span)"),
        ("two", "numa_nodes 'two' must be a whole number from 1 to 64 (1: never span)"),
        (True, "numa_nodes True must be a whole number from 1 to 64 (1: never span)"),
        (1.5, "numa_nodes 1.5 must be a whole number from 1 to 64 (1: never span)"),
        (5, "numa_nodes 5 needs at least 5 cores (one per guest NUMA cell); cores is 4"),
    ],
)
def test_numa_nodes_bounds(value, message):
    with pytest.raises(ParseError) as e:
        req(cores=4, numa_nodes=value)
    assert str(e.value) == message


def test_numa_nodes_parses_text_round_trips_and_binds_the_vm():
    r = req(cores=4, numa_nodes=" 2 ")
    assert r.numa_nodes == 2 and r.numa_bound and VmRequest.from_dict(r.to_dict()) == r
    assert req(cores=4, numa_nodes="").numa_nodes is None and not req(cores=4).numa_bound


def test_unpinned_hugepage_vm_is_numa_placed_and_counts_as_shared():
    host = synthetic_host(nodes=2, cores_per_node=2, memory_per_node=8 * GiB, hugepages=[{"2M": 256}, {"2M": 1024}])
    a = place(host, [], req(cores=2, memory="1G", hugepage_size="2M"), Policy())
    assert a.pinned is None and a.numa_nodes == (1,) and a.hugepages.per_node == {1: 512}
    assert a.cells[0].node == 1 and a.cells[0].vcpus == (0, 1)
    assert compute_usage(host, [a], Policy()).shared_vcpus_used == 2


def test_infeasible_even_split_is_refused_with_every_node():
    host = synthetic_host(nodes=2, cores_per_node=4, threads_per_core=1, memory_per_node=8 * GiB)
    allocs = [Allocation(name="x", vcpus=3, memory=GiB, pinned=(0, 1, 2), numa_nodes=(0,))]
    # 5 threads are free (1 + 4) but a 2-node split needs 3 + 2 on the two nodes.
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=5, pinned_cores="auto"), Policy())
    assert str(e.value) == "pinned cpus: need 5, node 0 has 1 free, node 1 has 4"


def test_floating_vm_has_no_cells():
    a = place(synthetic_host(nodes=2), [], req(cores=2), Policy())
    assert a.pinned is None and a.cells == () and a.numa_nodes == () and a.hugepages is None


def test_sriov_vf_is_numa_local_to_a_pinned_vm():
    host = sriov_host()
    allocs = [Allocation(name="x", vcpus=2, memory=GiB, pinned=(0, 8), numa_nodes=(0,))]
    # Node 0 would be the best fit for threads, but the only free VF asked for is local to node 1.
    r = req(cores=2, pinned_cores="auto", interfaces="eth0:name=pf1,type=sriov")
    a = place(host, allocs, r, Policy())
    assert a.numa_nodes == (1,)
    assert a.nics[0].type == "sriov" and a.nics[0].parent == "pf1" and a.nics[0].numa_node == 1


def test_pinned_vm_is_refused_when_no_local_vf_fits_unless_sriov_was_only_preferred():
    host = sriov_host()
    allocs = [Allocation(name="a", vcpus=8, memory=GiB, pinned=(4, 5, 6, 7, 12, 13, 14, 15), numa_nodes=(1,))]
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=2, pinned_cores="auto", interfaces="eth0:name=pf1,type=sriov"), Policy())
    assert str(e.value).startswith(
        "no even split over NUMA nodes holds 2 pinned cpus and 1G memory and a NUMA-local SR-IOV VF together; "
        "node 0 has 8 cpus and "
    )
    # Without type=sriov a VF is preferred, and macvlan on the same NIC is the fallback.
    a = place(host, allocs, req(cores=2, pinned_cores="auto", interfaces="eth0:name=pf1"), Policy())
    assert a.numa_nodes == (0,) and (a.nics[0].type, a.nics[0].parent) == ("macvlan", "pf1")
