"""Rule 2 (docs/design.md §4): unpinned vCPUs are overcommitted against the threads neither
reserved nor pinned; pinned VMs count against nothing else twice."""

from __future__ import annotations

import pytest

from tests.unit.hosts import synthetic_host
from tests.unit.placement.common import req, run
from vmhost.model import Policy
from vmhost.placement import PlacementError, compute_usage, place


def test_shared_vcpus_overcommit_and_exact_message():
    host = synthetic_host(nodes=1, cores_per_node=2, threads_per_core=2)  # 4 threads
    policy = Policy(cpu_overcommit_ratio=2.0, reserved_cores=(0,))  # 3 threads * 2 = 6 shared vCPUs
    allocs = run(host, [req(cores=4), req(cores=2)], policy)
    usage = compute_usage(host, allocs, policy)
    assert (usage.shared_vcpus_used, usage.shared_vcpus_capacity) == (6, 6)
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=1), policy)
    assert str(e.value) == "shared vCPUs: need 1, the host has 0 free (6 of 6 in use at cpu overcommit 2)"


def test_pinning_cannot_shrink_shared_capacity_below_use():
    host = synthetic_host(nodes=1, cores_per_node=2, threads_per_core=2)  # 4 threads
    policy = Policy(cpu_overcommit_ratio=1.0)
    allocs = run(host, [req(cores=3)], policy)  # 3 shared vCPUs need 3 unpinned threads
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=2, pinned_cores="auto"), policy)
    assert str(e.value) == (
        "pinned cpus: need 2, only 1 of the 4 free threads can be pinned without leaving fewer shared vCPUs than the 3 in use"
    )
    one = place(host, allocs, req(cores=1, pinned_cores="auto"), policy)
    assert len(one.pinned) == 1


def test_pinned_vm_does_not_count_as_shared():
    host = synthetic_host(nodes=1, cores_per_node=2, threads_per_core=2)
    allocs = run(host, [req(cores=2, pinned_cores="auto")])
    usage = compute_usage(host, allocs, Policy())
    assert usage.shared_vcpus_used == 0
    assert usage.shared_vcpus_capacity == 2  # 4 threads - 2 pinned
