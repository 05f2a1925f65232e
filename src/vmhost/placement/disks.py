"""Disks (docs/design.md §4 "Storage"): a pool whose name is among the disk's tags; else the default
pool; else the first that fits. Never past a pool's free space; no storage asked for means MAAS's
default root disk on a host with pools.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmhost.model import DiskAllocation, HostTopology, Policy, VmRequest
from vmhost.parse import DEFAULT_ROOT_DISK, disk_gigabytes
from vmhost.placement.errors import PlacementError

__all__ = ["place_disks"]


def place_disks(
    host: HostTopology, request: VmRequest, policy: Policy, committed: Mapping[str, int]
) -> tuple[DiskAllocation, ...]:
    """A pool for each disk of `request`; `committed`: bytes our allocations' disks already hold per pool."""
    pools = {pool.name: pool for pool in host.storage_pools}
    taken: dict[str, int] = {}

    def free(name: str) -> int:
        pool = pools[name]
        return pool.total - max(pool.used, committed.get(name, 0)) - taken.get(name, 0)

    out = []
    # No storage asked for: MAAS's default root disk, where the host has somewhere to put it.
    for disk in request.storage or ((DEFAULT_ROOT_DISK,) if pools else ()):
        named = [tag for tag in disk.tags if tag in pools]
        if named:
            pool = named[0]
            why = f"tagged {pool}"
        elif policy.default_storage_pool:
            pool = policy.default_storage_pool
            why = "the default pool"
            if pool not in pools:
                raise PlacementError(
                    f"disk {disk.label}: default storage pool {pool!r} does not exist; "
                    f"pools: {', '.join(pools) or 'none'}"
                )
        else:
            fits = [name for name in pools if free(name) >= disk.size]
            if not fits:
                have = (
                    ", ".join(f"{name} has {disk_gigabytes(max(0, free(name)))} free" for name in pools)
                    or "the host has no storage pools"
                )
                raise PlacementError(f"disk {disk.label}: need {disk_gigabytes(disk.size)} in one pool, {have}")
            pool, why = fits[0], ""
        if free(pool) < disk.size:
            raise PlacementError(
                f"disk {disk.label}: need {disk_gigabytes(disk.size)} in pool {pool} ({why}), "
                f"it has {disk_gigabytes(max(0, free(pool)))} free"
            )
        taken[pool] = taken.get(pool, 0) + disk.size
        out.append(DiskAllocation(label=disk.label, size=disk.size, pool=pool, tags=disk.tags))
    return tuple(out)
