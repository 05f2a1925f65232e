"""Nova's view of our synthetic hosts and requests, built from real `nova.objects` (runs in bench/.nova-venv).

The host's load is applied with Nova's own accounting (`numa_usage_from_instance_numa`) from the
same resident allocations our engine sees, and requests go through Nova's own flavor parser
(`numa_get_constraints`), so the peer is measured doing exactly what its scheduler does.
Floating VMs (neither pinned nor hugepage-backed) have no NUMA topology in Nova: they load Nova's
placement service inventory (VCPU, MEMORY_MB), never a host cell, so they do not appear here.
"""

from __future__ import annotations

import logging
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.CRITICAL)

from nova import objects  # noqa: E402

objects.register_all()
from nova.objects import fields  # noqa: E402
from nova.virt import hardware  # noqa: E402

KiB = 1024
MiB = 1024**2
PAGE_KB = {"2M": 2048, "1G": 1024 * 1024}


def nova_host(
    host: dict, dedicated: dict[int, set[int]] | None = None, reserved: set[int] = frozenset()
) -> objects.NUMATopology:
    """An empty NUMATopology of `host`: cells with siblings and 4K/2M/1G mempages as libvirt reports them.

    `dedicated` (node -> threads) splits cpu_dedicated_set from cpu_shared_set as a modern Nova
    deployment must; without it every thread is in both sets (the legacy vcpu_pin_set behaviour).
    `reserved` threads are in neither set (the host keeps them).
    """
    cells = []
    for n in host["nodes"]:
        threads = {t for c in n["cores"] for t in c["threads"]} - set(reserved)
        pcpus = set(dedicated.get(n["id"], set())) & threads if dedicated is not None else set(threads)
        cpus = threads - pcpus if dedicated is not None else set(threads)
        huge = n.get("hugepages") or {}
        huge_bytes = sum(PAGE_KB[s] * KiB * p for s, p in huge.items())
        pages = [objects.NUMAPagesTopology(size_kb=4, total=(n["memory"] - huge_bytes) // 4096, used=0, reserved=0)]
        pages += [
            objects.NUMAPagesTopology(size_kb=PAGE_KB[s], total=int(p), used=0, reserved=0)
            for s, p in sorted(huge.items(), key=lambda kv: PAGE_KB[kv[0]])
        ]
        cells.append(
            objects.NUMACell(
                id=n["id"],
                cpuset=cpus,
                pcpuset=pcpus,
                memory=n["memory"] // MiB,
                cpu_usage=0,
                memory_usage=0,
                pinned_cpus=set(),
                siblings=[set(c["threads"]) for c in n["cores"]],
                mempages=pages,
                socket=0,
            )
        )
    return objects.NUMATopology(cells=cells)


def instance_of_allocation(alloc: dict) -> objects.InstanceNUMATopology | None:
    """The InstanceNUMATopology Nova would hold for one of our allocations (None for a floating VM)."""
    cells = alloc.get("cells") or []
    if not cells:
        return None
    hp = alloc.get("hugepages")
    pagesize = PAGE_KB[hp["size"]] if hp else None
    pinned = alloc.get("pinned")
    out = []
    for c in cells:
        vcpus = set(c["vcpus"])
        cell = objects.InstanceNUMACell(
            id=c["node"],
            memory=c["memory"] // MiB,
            pagesize=pagesize,
            cpuset=set() if pinned else vcpus,
            pcpuset=vcpus if pinned else set(),
            cpu_policy=fields.CPUAllocationPolicy.DEDICATED if pinned else fields.CPUAllocationPolicy.SHARED,
            cpuset_reserved=None,
        )
        if pinned:
            cell.cpu_pinning = {v: pinned[v] for v in c["vcpus"]}
        out.append(cell)
    return objects.InstanceNUMATopology(cells=out)


def load_host(host_topo: objects.NUMATopology, allocations: list[dict]) -> objects.NUMATopology:
    """Apply the resident allocations to `host_topo` with Nova's own usage accounting."""
    for a in allocations:
        inst = instance_of_allocation(a)
        if inst is not None:
            host_topo = hardware.numa_usage_from_instance_numa(host_topo, inst)
    return host_topo


def instance_request(
    vcpus: int, memory: int, pinned: bool, hugepage_size: str | None, numa_nodes: int | None = None
) -> objects.InstanceNUMATopology | None:
    """A flavor with hw:cpu_policy / hw:mem_page_size / hw:numa_nodes, parsed by Nova's numa_get_constraints."""
    specs = {}
    if pinned:
        specs["hw:cpu_policy"] = "dedicated"
    if hugepage_size == "small":  # general memory, counted in the node's 4K pool (not its hugepages)
        specs["hw:mem_page_size"] = "small"
    elif hugepage_size:
        specs["hw:mem_page_size"] = str(PAGE_KB[hugepage_size])
    if numa_nodes:
        specs["hw:numa_nodes"] = str(numa_nodes)
    flavor = objects.Flavor(vcpus=vcpus, memory_mb=memory // MiB, extra_specs=specs)
    image = objects.ImageMeta.from_dict({"properties": {}})
    return hardware.numa_get_constraints(flavor, image)


def limits(cpu_ratio: float, ram_ratio: float) -> objects.NUMATopologyLimits:
    return objects.NUMATopologyLimits(cpu_allocation_ratio=cpu_ratio, ram_allocation_ratio=ram_ratio)


def fit(host_topo, inst, lim=None):
    """Nova's real fit call; returns the fitted InstanceNUMATopology or None."""
    return hardware.numa_fit_instance_to_host(host_topo, inst, None, lim)


def release(host_topo, fitted):
    return hardware.numa_usage_from_instance_numa(host_topo, fitted, free=True)


def claim(host_topo, fitted):
    return hardware.numa_usage_from_instance_numa(host_topo, fitted)


def used(host_topo) -> dict:
    """Pinned threads and hugepages in use, for the packing figures."""
    out = {"pinned_threads": 0, "hugepages": {}}
    for c in host_topo.cells:
        out["pinned_threads"] += len(c.pinned_cpus)
        for p in c.mempages:
            if p.size_kb in (2048, 1024 * 1024):
                key = "2M" if p.size_kb == 2048 else "1G"
                out["hugepages"][key] = out["hugepages"].get(key, 0) + int(p.used)
    return out


def node_states(host_topo) -> list[dict]:
    """Free and capacity per node in the shape bench/packing_metrics.py scores (threads, bytes).

    General memory is the 4K pool (node memory less its hugepages), hugepages every larger pool:
    with `hw:mem_page_size` set on every request, Nova accounts each VM in exactly one of them.
    """
    out = []
    for c in host_topo.cells:
        cap = len(c.cpuset | c.pcpuset)
        general = huge = (0, 0)
        for p in c.mempages:
            total, free = p.total * p.size_kb * KiB, (p.total - p.used) * p.size_kb * KiB
            if p.size_kb == 4:
                general = (total, free)
            else:
                huge = (huge[0] + total, huge[1] + free)
        out.append(
            {
                "free_threads": cap - len(c.pinned_cpus),
                "thread_cap": cap,
                "free_general": general[1],
                "general_cap": general[0],
                "free_huge": huge[1],
                "huge_cap": huge[0],
            }
        )
    return out
