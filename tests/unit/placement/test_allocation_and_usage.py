"""What place() returns and what compute_usage() shows (docs/design.md §3-4): names, the usage view,
determinism, the round trip through metadata."""

from __future__ import annotations

from tests.unit.hosts import GiB, synthetic_host
from tests.unit.placement.common import req, run
from vmhost.model import Allocation, Policy
from vmhost.placement import HostUsage, compute_usage, place


def test_default_name_is_vm_and_caller_name_is_kept():
    host = synthetic_host(nodes=1)
    assert place(host, [], req(cores=1), Policy()).name == "vm"
    assert place(host, [], req(cores=1, name="web-1"), Policy()).name == "web-1"


def test_compute_usage_matches_what_was_placed_and_serialises():
    host = synthetic_host(nodes=2, cores_per_node=2, threads_per_core=2, memory_per_node=8 * GiB, hugepages={"2M": 512})
    allocs = run(
        host,
        [
            req(cores=2, memory="512M", pinned_cores="auto", hugepage_size="2M"),
            req(cores=1, memory="1G", pinned_cores="auto"),
            req(cores=2, memory="1G"),
        ],
    )
    usage = compute_usage(host, allocs, Policy())
    assert isinstance(usage, HostUsage)
    d = usage.to_dict()
    n0 = d["nodes"][0]
    n1 = d["nodes"][1]
    assert n0["pinned"] == {"0": "vm0", "4": "vm0"}
    # vm1 goes to node 1: on node 0 it would leave 1 thread free to 6.5G of memory (rule 4's fit measure).
    assert n1["pinned"] == {"2": "vm1"}
    assert n0["hugepages"]["2M"] == {"total": 512, "used": 256, "free": 256}
    assert n0["memory_bound"] == 0 and n0["vms"] == ["vm0"]
    assert n1["memory_bound"] == GiB and n1["vms"] == ["vm1"]
    assert d["shared_vcpus"] == {"used": 2, "capacity": 5, "free": 3}
    assert d["memory"]["used"] == 2 * GiB
    assert d["vms"] == 3


def test_same_inputs_same_output():
    host = synthetic_host(nodes=4, cores_per_node=4, threads_per_core=2, hugepages={"2M": 1024})
    requests = [req(cores=c, memory="1G", pinned_cores="auto", hugepage_size="2M") for c in (3, 5, 2, 8, 1)]
    first = run(host, requests)
    second = run(synthetic_host(nodes=4, cores_per_node=4, threads_per_core=2, hugepages={"2M": 1024}), requests)
    assert [a.to_dict() for a in first] == [a.to_dict() for a in second]


def test_allocation_round_trips_through_metadata():
    host = synthetic_host(nodes=2, hugepages={"1G": 4}, memory_per_node=16 * GiB)
    a = place(host, [], req(cores=12, memory="4G", pinned_cores="auto", hugepage_size="1G"), Policy())
    assert Allocation.from_dict(a.to_dict()) == a
