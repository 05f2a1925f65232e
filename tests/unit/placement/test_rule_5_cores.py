"""Rule 5 (docs/design.md §4): `pinned_cores=auto` takes whole cores first and shows them as SMT;
an explicit list is validated and its nodes hold the memory and pages."""

from __future__ import annotations

import pytest

from tests.unit.hosts import GiB, synthetic_host
from tests.unit.placement.common import req
from vmhost.model import Allocation, Policy
from vmhost.placement import PlacementError, place


def test_auto_takes_whole_cores_and_exposes_smt():
    host = synthetic_host(nodes=1, cores_per_node=4, threads_per_core=2)  # core c: threads c, c+4
    a = place(host, [], req(cores=4, pinned_cores="auto"), Policy())
    assert a.pinned == (0, 4, 1, 5)  # two whole cores, siblings adjacent in guest order
    assert a.threads_per_core == 2


def test_auto_fills_lone_threads_before_breaking_a_core():
    host = synthetic_host(nodes=1, cores_per_node=4, threads_per_core=2)
    allocs = [Allocation(name="x", vcpus=1, memory=GiB, pinned=(0,), numa_nodes=(0,))]  # thread 4 is lone
    a = place(host, allocs, req(cores=1, pinned_cores="auto"), Policy())
    assert a.pinned == (4,)
    b = place(host, allocs, req(cores=3, pinned_cores="auto"), Policy())
    assert b.pinned == (1, 5, 4) and b.threads_per_core == 1


def test_explicit_list_uses_its_nodes_for_memory_and_pages():
    host = synthetic_host(nodes=2, cores_per_node=2, threads_per_core=1, memory_per_node=8 * GiB, hugepages={"2M": 512})
    a = place(host, [], req(cores=2, memory="2G", pinned_cores=[1, 2], hugepage_size="2M"), Policy())
    assert a.pinned == (1, 2) and a.numa_nodes == (0, 1)
    assert a.hugepages.per_node == {0: 512, 1: 512}
    assert [(c.node, c.vcpus) for c in a.cells] == [(0, (0,)), (1, (1,))]


@pytest.mark.parametrize(
    ("cpus", "policy", "message"),
    [
        ([99], Policy(), "pinned cpu 99 does not exist or is offline on this host; online cpus: 0-7"),
        (
            [0],
            Policy(reserved_cores=(0, 1)),
            "pinned cpu 0 is reserved for the host (reserved cores 0-1); choose other cpus",
        ),
        ([3], Policy(), "pinned cpu 3 is already pinned by VM web; choose other cpus"),
    ],
)
def test_explicit_list_errors(cpus, policy, message):
    host = synthetic_host(nodes=2, cores_per_node=2, threads_per_core=2)
    allocs = [Allocation(name="web", vcpus=1, memory=GiB, pinned=(3,), numa_nodes=(1,))]
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=1, pinned_cores=cpus), policy)
    assert str(e.value) == message


def test_explicit_list_short_of_pages_on_its_node():
    host = synthetic_host(nodes=2, cores_per_node=2, threads_per_core=1, hugepages=[{"2M": 10}, {"2M": 4096}])
    with pytest.raises(PlacementError) as e:
        place(host, [], req(cores=1, memory="1G", pinned_cores=[0], hugepage_size="2M"), Policy())
    assert str(e.value) == "hugepages 2M: need 512 on the nodes of cpus 0 (512 on node 0), node 0 has 10 free"


def test_other_vms_count_like_ours():
    host = synthetic_host(nodes=1, cores_per_node=1, threads_per_core=2)
    other = Allocation(name="legacy", vcpus=1, memory=GiB, pinned=(0,), numa_nodes=(0,), other=True)
    a = place(host, [other], req(cores=1, pinned_cores="auto"), Policy())
    assert a.pinned == (1,)
