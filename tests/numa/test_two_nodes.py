"""A real 2-node host (nested, TCG): discovery over qemu+ssh, and where the guest's kernel puts VMs.

Node 0 has CPUs 0-1, node 1 CPUs 2-3; each has 128 free 2M pages. Every VM is composed from OUTSIDE
with `vmhost --uri qemu+ssh://...`; every check reads the guest's own kernel (tests/numa/inside.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from tests.numa.inside import SMALL_ROOT, probe, vmhost

PAGES = 128


def _compose(guest, vm_names, *args: str) -> dict:
    name = vm_names()
    rc, vm, err = vmhost(guest, "compose", "--hostname", name, "--start", "--storage", SMALL_ROOT, *args)
    assert rc == 0, err
    return vm


def _decompose_and_check_pages(guest, name: str, before: dict[int, int]) -> None:
    rc, _, err = vmhost(guest, "decompose", name)
    assert rc == 0, err
    after = probe(guest)
    assert after.free == before, f"pages not returned: {before} before compose, {after.free} after decompose"
    assert name not in guest.ssh("virsh list --all --name").split()


def test_discovery_describes_the_remote_host_not_this_one(guest_two):
    rc, res, err = vmhost(guest_two, "resources")
    assert rc == 0, err
    inside = probe(guest_two)
    nodes = {n["id"]: n for n in res["nodes"]}
    assert sorted(nodes) == [0, 1]
    for n, cpus in inside.node_cpus.items():
        assert nodes[n]["threads"]["total"] == len(cpus) == 2
        assert nodes[n]["hugepages"]["2M"]["total"] == inside.total[n] == PAGES
    guest_links = set(guest_two.ssh("ls /sys/class/net").split())
    nics = {n["name"]: n for n in res["nics"]}
    assert set(nics) <= guest_links, f"NICs not on the guest: {set(nics) - guest_links}"
    assert nics["br0"]["kind"] == "bridge"
    virtio = [n for n in nics.values() if n["kind"] == "physical"]
    assert len(virtio) == 1 and virtio[0]["sriov_max_vfs"] == 0
    assert "dummy0" not in nics and "lo" not in nics
    assert [p["name"] for p in res["storage_pools"]] == ["default"]
    pool_path = ET.fromstring(guest_two.ssh("virsh pool-dumpxml default")).findtext("target/path")
    assert pool_path == "/var/lib/libvirt/images"


def test_auto_pinned_vm_that_fits_a_node_is_wholly_on_that_node(guest_two, vm_names):
    before = probe(guest_two).free
    vm = _compose(
        guest_two, vm_names, "--cores", "2", "--memory", "128M", "--pinned-cores", "auto", "--hugepages-backed"
    )
    alloc = vm
    (node,) = alloc["numa_nodes"]
    assert alloc["hugepages"]["per_node"] == {str(node): 64}
    inside = probe(guest_two, vm["name"])
    cpus = inside.node_cpus[node]
    assert len(inside.vcpu_affinity) == 2 and all(a <= cpus and len(a) == 1 for a in inside.vcpu_affinity)
    assert set().union(*inside.vcpu_affinity) == cpus  # two vCPUs, two distinct threads of the node
    assert inside.thread_cpus() <= cpus, inside.threads
    assert inside.thread_mems() == {node}, inside.threads
    assert inside.huge == {node: 64}
    assert inside.policies == [f"bind:{node}"]
    other = 1 - node
    assert inside.free == {node: before[node] - 64, other: before[other]}
    _decompose_and_check_pages(guest_two, vm["name"], before)


def test_vm_too_big_for_a_node_spans_both_with_mirrored_guest_cells(guest_two, vm_names):
    before = probe(guest_two).free
    # 192 pages: more than either node's 128, so it must span; 2 vCPUs split one per node.
    vm = _compose(
        guest_two, vm_names, "--cores", "2", "--memory", "384M", "--pinned-cores", "auto", "--hugepages-backed"
    )
    alloc = vm
    assert alloc["numa_nodes"] == [0, 1]
    per_node = {int(k): v for k, v in alloc["hugepages"]["per_node"].items()}
    assert per_node == {0: 96, 1: 96}
    inside = probe(guest_two, vm["name"])
    assert inside.huge == per_node  # the guest's kernel took each node's pages as the allocation says
    assert inside.free == {n: before[n] - per_node[n] for n in before}
    assert inside.thread_mems() == {0, 1}
    # Guest cells mirror the split: cell i holds vCPU i (pinned on node i) and memory on node i.
    dom = ET.fromstring(inside.xml)
    cells = dom.findall("cpu/numa/cell")
    assert len(cells) == 2
    assert [int(c.get("memory")) * {"KiB": 1024}.get(c.get("unit", "KiB"), 1) for c in cells] == [192 * 2**20] * 2
    memnodes = {m.get("cellid"): m.get("nodeset") for m in dom.findall("numatune/memnode")}
    for i, cell in enumerate(cells):
        vcpus = [int(v) for v in cell.get("cpus").split(",")]
        host_node = int(memnodes[cell.get("id")])
        for v in vcpus:
            assert inside.vcpu_affinity[v] <= inside.node_cpus[host_node], (i, v, inside.vcpu_affinity)
    assert {int(n) for n in memnodes.values()} == {0, 1}
    _decompose_and_check_pages(guest_two, vm["name"], before)


def test_explicit_pinned_list_on_node_1_gets_node_1_memory(guest_two, vm_names):
    before = probe(guest_two).free
    vm = _compose(guest_two, vm_names, "--cores", "1", "--memory", "64M", "--pinned-cores", "3", "--hugepages-backed")
    assert vm["numa_nodes"] == [1]
    inside = probe(guest_two, vm["name"])
    assert inside.vcpu_affinity == [{3}]
    assert inside.thread_mems() == {1}
    assert inside.huge == {1: 32}
    assert inside.free == {0: before[0], 1: before[1] - 32}
    _decompose_and_check_pages(guest_two, vm["name"], before)


def test_every_page_is_back_after_the_session_s_vms(guest_two):
    inside = probe(guest_two)
    assert inside.free == inside.total == {0: PAGES, 1: PAGES}
    rc, vms, err = vmhost(guest_two, "list")
    assert rc == 0 and vms == [], err
