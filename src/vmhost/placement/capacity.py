"""Host-wide limits, rules 1-3 (docs/design.md §4): threads a VM may pin, shared vCPUs, general memory.

Each check raises PlacementError saying what is short and by how much (rule 7).
"""

from __future__ import annotations

import math

from vmhost.model import HostTopology, Policy
from vmhost.parse import format_cpuset, human_size
from vmhost.placement.errors import PlacementError, per_node
from vmhost.placement.usage import EPSILON, HostUsage

__all__ = ["check_explicit_cpus", "check_general_memory", "check_pinnable_threads", "check_shared_vcpus"]


def check_explicit_cpus(host: HostTopology, usage: HostUsage, cpus: tuple[int, ...], policy: Policy) -> None:
    """Rules 1 and 5: an explicit list names threads that exist, are online, not reserved and not pinned
    by another VM (the error names that VM)."""
    thread_node = host.thread_node
    reserved = set(policy.reserved_cores)
    pinned = usage.pinned
    for thread in cpus:
        if thread not in thread_node:
            online = format_cpuset(thread_node) if thread_node else "none"
            raise PlacementError(
                f"pinned cpu {thread} does not exist or is offline on this host; online cpus: {online}"
            )
        if thread in reserved:
            raise PlacementError(
                f"pinned cpu {thread} is reserved for the host (reserved cores {format_cpuset(reserved)}); "
                "choose other cpus"
            )
        if thread in pinned:
            raise PlacementError(f"pinned cpu {thread} is already pinned by VM {pinned[thread]}; choose other cpus")


def _pinnable_threads(usage: HostUsage, ratio: float) -> int:
    """Threads that can still be pinned without shrinking shared capacity below what is in use."""
    free = sum(len(node.free_threads) for node in usage.nodes)
    if usage.shared_vcpus_used <= 0:
        return free
    if ratio <= 0:
        return 0
    keep = math.ceil(usage.shared_vcpus_used / ratio - EPSILON)
    return max(0, free - keep)


def check_pinnable_threads(usage: HostUsage, count: int, policy: Policy) -> None:
    """Rule 1: `count` threads, neither reserved nor pinned, can be pinned; and (rule 2) pinning them
    leaves the shared vCPUs in use their capacity."""
    pinnable = _pinnable_threads(usage, policy.cpu_overcommit_ratio)
    if count > pinnable:
        free = sum(len(node.free_threads) for node in usage.nodes)
        if pinnable == free:
            raise PlacementError(
                f"pinned cpus: need {count}, "
                + per_node([(node.node, str(len(node.free_threads))) for node in usage.nodes])
            )
        raise PlacementError(
            f"pinned cpus: need {count}, only {pinnable} of the {free} free threads can be pinned without leaving "
            f"fewer shared vCPUs than the {usage.shared_vcpus_used} in use"
        )


def check_shared_vcpus(usage: HostUsage, vcpus: int, policy: Policy) -> None:
    """Rule 2: unpinned vCPUs fit the shared capacity (threads neither reserved nor pinned, overcommitted)."""
    if usage.shared_vcpus_used + vcpus > usage.shared_vcpus_capacity:
        raise PlacementError(
            f"shared vCPUs: need {vcpus}, the host has {usage.shared_vcpus_free} free "
            f"({usage.shared_vcpus_used} of {usage.shared_vcpus_capacity} in use at cpu overcommit "
            f"{policy.cpu_overcommit_ratio:g})"
        )


def check_general_memory(usage: HostUsage, memory: int, policy: Policy) -> None:
    """Rule 3: memory that is not hugepages fits general memory (total - hugepages - reserved, overcommitted)."""
    if usage.memory_used + memory > usage.memory_capacity:
        raise PlacementError(
            f"memory: need {human_size(memory)}, the host has {human_size(usage.memory_free)} of general memory free "
            f"({human_size(usage.memory_used)} of {human_size(usage.memory_capacity)} in use at memory overcommit "
            f"{policy.memory_overcommit_ratio:g}; hugepages and reserved memory excluded)"
        )
