"""A real 4-node host (nested, TCG): a VM that needs two nodes, and one that fits nowhere.

One CPU per node and uneven 2M pages (32, 96, 64, 96), so choosing the two nodes is a real decision.
"""

from __future__ import annotations

from tests.numa.inside import SMALL_ROOT, probe, vmhost

SPAN = ("--cores", "2", "--memory", "256M", "--pinned-cores", "auto", "--hugepages-backed", "--storage", SMALL_ROOT)


def test_vm_needing_two_nodes_spans_exactly_the_two_placement_chooses(guest_four, vm_names):
    before = probe(guest_four)
    assert before.free == {0: 32, 1: 96, 2: 64, 3: 96}
    rc, plan, err = vmhost(guest_four, "compose", "--dry-run", *SPAN)
    assert rc == 0, err
    # 64 pages per node: node 0 (32) cannot. Nodes 1-3 leave the same shares of threads (none) and of
    # memory (general + free pages: 256M of 384M each) after their half, so rule 4 ties them and any two
    # may be chosen; what the guest must show is exactly the two placement chose.
    assert len(plan["numa_nodes"]) == 2 and 0 not in plan["numa_nodes"]
    name = vm_names()
    rc, vm, err = vmhost(guest_four, "compose", "--hostname", name, "--start", *SPAN)
    assert rc == 0, err
    assert vm["numa_nodes"] == plan["numa_nodes"]
    nodes = set(vm["numa_nodes"])
    inside = probe(guest_four, name)
    assert inside.huge == {n: 64 for n in nodes}
    assert inside.free == {n: before.free[n] - (64 if n in nodes else 0) for n in before.free}
    assert inside.thread_mems() == nodes
    assert set().union(*inside.vcpu_affinity) == set().union(*(inside.node_cpus[n] for n in nodes))
    rc, _, err = vmhost(guest_four, "decompose", name)
    assert rc == 0, err
    assert probe(guest_four).free == before.free


def test_request_that_fits_nowhere_is_refused_naming_each_node(guest_four):
    domains = guest_four.ssh("virsh list --all --name").split()
    rc, _, err = vmhost(
        guest_four,
        "compose",
        "--cores",
        "2",
        "--memory",
        "512M",
        "--pinned-cores",
        "auto",
        "--hugepages-backed",
        "--storage",
        SMALL_ROOT,
        "--start",
    )
    assert rc == 1
    assert "hugepages 2M: need 256, node 0 has 32 free, node 1 has 96, node 2 has 64, node 3 has 96" in err
    assert err.count("\n") == 0 and "Traceback" not in err
    assert guest_four.ssh("virsh list --all --name").split() == domains
    assert probe(guest_four).free == {0: 32, 1: 96, 2: 64, 3: 96}
