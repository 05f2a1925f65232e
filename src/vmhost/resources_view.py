"""The at-a-glance host view: one JSON shape for machines, rendered text for people.

Built from `compute_usage`, so the view, the charm status and placement can never disagree.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmhost.model import HUGEPAGE_SIZES, HostTopology, Policy, VmInfo
from vmhost.parse import format_cpuset
from vmhost.placement import HostUsage

GIB = 1024**3


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}".rstrip("0").rstrip(".")


def shared_pinned_threads(vms: Sequence[VmInfo], kept_off: tuple[bool, bool] = (True, True)) -> list[dict]:
    """Threads a vm-host VM pins that another running VM may also run on, and which VMs those are.

    kept_off: (our floating VMs, VMs made by others) are kept off pinned threads by the provider. A VM that
    is not may run anywhere; a VM made by others that pins itself shares exactly the threads it pins.
    """
    pinned = {t: v.name for v in vms if v.managed and v.allocation.pinned for t in v.allocation.pinned}
    sharers: dict[int, list[str]] = {}
    for v in vms:
        if v.state != "running" or (v.managed and v.allocation.pinned):
            continue
        if v.allocation.pinned:
            threads = [t for t in v.allocation.pinned if t in pinned]
        elif not kept_off[0 if v.managed else 1]:
            threads = list(pinned)
        else:
            threads = []
        for t in threads:
            sharers.setdefault(t, []).append(v.name)
    return [{"thread": t, "pinned_by": pinned[t], "shared_with": sorted(sharers[t])} for t in sorted(sharers)]


def resources_dict(
    backend: str,
    host: HostTopology,
    usage: HostUsage,
    vms: Sequence[VmInfo],
    policy: Policy,
    kept_off: tuple[bool, bool] = (True, True),
) -> dict:
    """Capacity and use per NUMA node and host-wide, JSON-ready (the `resources` action and `vmhost resources`).

    kept_off: whether floating VMs (ours, others') are kept off pinned threads; see shared_pinned_threads.
    """
    nodes = []
    for node in host.nodes:
        nu = usage.node(node.id)
        hp_bytes = node.hugepage_bytes()
        nodes.append(
            {
                "id": node.id,
                "threads": {
                    "total": len(nu.threads),
                    "reserved": len(nu.reserved),
                    "pinned": len(nu.pinned),
                    "free": len(nu.free_threads),
                    "free_set": format_cpuset(nu.free_threads),
                },
                "pinned": {str(t): vm for t, vm in sorted(nu.pinned.items())},
                "memory": {
                    "total": node.memory,
                    "hugepages": hp_bytes,
                    "general_capacity": nu.memory_capacity,
                    "bound": nu.memory_bound,
                },
                "hugepages": {
                    size: {"total": total, "used": used, "free": max(0, total - used)}
                    for size, (total, used) in sorted(nu.hugepages.items())
                },
                "vms": list(nu.vms),
            }
        )
    return {
        "backend": backend,
        "nodes": nodes,
        "shared_vcpus": {"used": usage.shared_vcpus_used, "capacity": usage.shared_vcpus_capacity},
        "memory": {"used": usage.memory_used, "capacity": usage.memory_capacity},
        "nics": [
            {
                "name": nic.name,
                "kind": nic.kind,
                "numa_node": nic.numa_node,
                "sriov_max_vfs": nic.sriov_max_vfs,
                "vfs_used": usage.vfs_used.get(nic.name, 0),
                "addresses": list(nic.addresses),
            }
            for nic in host.nics
        ],
        "storage_pools": [
            {
                "name": p.name,
                "driver": p.driver,
                "total": p.total,
                "used": p.used,
                "committed": usage.storage_committed.get(p.name, 0),
            }
            for p in host.storage_pools
        ],
        "vms": [
            {
                "name": v.name,
                "state": v.state,
                "phase": v.phase,
                "managed": v.managed,
                "vcpus": v.allocation.vcpus,
                "pinned": list(v.allocation.pinned) if v.allocation.pinned else None,
                "numa_nodes": list(v.allocation.numa_nodes),
                "memory": v.allocation.memory,
                "hugepages": v.allocation.hugepages.to_dict() if v.allocation.hugepages else None,
                "pool": v.allocation.resource_pool,
            }
            for v in vms
        ],
        "shared_pinned_threads": shared_pinned_threads(vms, kept_off),
        "policy": policy.to_dict(),
    }


def summary_line(res: dict) -> str:
    """One line for the charm status: "libvirt: 3 VMs, 12/64 threads pinned, 8/16 GiB hugepages"."""
    threads = sum(n["threads"]["total"] for n in res["nodes"])
    pinned = sum(n["threads"]["pinned"] for n in res["nodes"])
    hp_total = hp_used = 0
    for n in res["nodes"]:
        for size, hp in n["hugepages"].items():
            hp_total += hp["total"] * HUGEPAGE_SIZES[size]
            hp_used += hp["used"] * HUGEPAGE_SIZES[size]
    vms = len(res["vms"])
    line = (
        f"{res['backend']}: {vms} VM{'s' if vms != 1 else ''}, {pinned}/{threads} threads pinned, "
        f"{_gib(hp_used)}/{_gib(hp_total)} GiB hugepages"
    )
    shared = res.get("shared_pinned_threads") or []
    if shared:
        names = sorted({n for s in shared for n in s["shared_with"]})
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        line += (
            f"; pinned threads {format_cpuset(s['thread'] for s in shared)} shared with {', '.join(names[:3])}{more}"
        )
    return line


def vm_line(vm: dict) -> str:
    """One VM in a line: name, state, vCPUs and where they run, memory, hugepages, how to reach it."""
    where = f"pinned {format_cpuset(vm['pinned'])}" if vm.get("pinned") else "floating"
    nodes = ",".join(str(n) for n in vm.get("numa_nodes") or ()) or "-"
    hp = vm.get("hugepages")
    pages = f", {sum(hp['per_node'].values())}x{hp['size']} pages" if hp else ""
    extra = "" if vm.get("managed", True) else " (not made by vm-host)"
    addresses = vm.get("addresses") or ()
    reach = f", ssh {vm['login_user']}@{addresses[0]}" if addresses and vm.get("login_user") else ""
    if len(addresses) > 1 or (addresses and not reach):
        reach += f", addresses {' '.join(addresses)}"
    return (
        f"{vm['name']:<16} {vm.get('state', '?'):<8} {vm['vcpus']} vCPU {where:<16} node {nodes:<5} "
        f"{_gib(vm['memory'])} GiB{pages}{extra}{reach}"
    )


def render_view(res: dict) -> str:
    """The human view of `resources`: per NUMA node, then NICs, pools and VMs."""
    lines = [summary_line(res), ""]
    for n in res["nodes"]:
        t, m = n["threads"], n["memory"]
        lines.append(
            f"NUMA node {n['id']}: threads {t['total']} ({t['pinned']} pinned, {t['reserved']} reserved, "
            f"{t['free']} free: {t['free_set'] or '-'})"
        )
        lines.append(
            f"  memory {_gib(m['total'])} GiB: hugepages {_gib(m['hugepages'])} GiB, general "
            f"{_gib(m['general_capacity'])} GiB ({_gib(m['bound'])} GiB bound to VMs here)"
        )
        for size, hp in n["hugepages"].items():
            if not hp["total"] and not hp["used"]:
                continue
            lines.append(f"  hugepages {size}: {hp['used']}/{hp['total']} used, {hp['free']} free")
        lines.append(f"  VMs: {', '.join(n['vms']) or '-'}")
    sv, mem = res["shared_vcpus"], res["memory"]
    lines.append(
        f"shared vCPUs: {sv['used']}/{sv['capacity']}   general memory: {_gib(mem['used'])}/{_gib(mem['capacity'])} GiB"
    )
    sriov = [n for n in res["nics"] if n["sriov_max_vfs"]]
    if sriov:
        lines.append("SR-IOV: " + ", ".join(f"{n['name']} {n['vfs_used']}/{n['sriov_max_vfs']} VFs" for n in sriov))
    for p in res["storage_pools"]:
        lines.append(
            f"pool {p['name']} ({p['driver']}): {_gib(p['used'])}/{_gib(p['total'])} GiB used, "
            f"{_gib(p['committed'])} GiB committed to VMs"
        )
    for s in res.get("shared_pinned_threads") or []:
        lines.append(f"pinned thread {s['thread']} of {s['pinned_by']} is shared with {', '.join(s['shared_with'])}")
    lines.append("")
    lines.extend(vm_line(v) for v in res["vms"])
    if not res["vms"]:
        lines.append("no VMs")
    return "\n".join(lines)
