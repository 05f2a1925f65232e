"""Request and host builders the placement tests share."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.hosts import synthetic_host
from vmhost.model import Allocation, Nic, Policy, StoragePool, VmRequest
from vmhost.placement import place


def req(**kw) -> VmRequest:
    kw.setdefault("memory", "1G")
    return VmRequest.from_dict(kw)


def run(host, requests, policy: Policy | None = None):
    """Place requests one after another, naming them vm0, vm1, ..."""
    allocs: list[Allocation] = []
    for i, r in enumerate(requests):
        allocs.append(place(host, allocs, replace(r, name=f"vm{i}"), policy or Policy()))
    return allocs


def sriov_host(max_vfs=2, **kw):
    nics = (
        Nic(name="pf0", numa_node=0, sriov_max_vfs=max_vfs, addresses=("10.20.0.5/24",)),
        Nic(name="pf1", numa_node=1, sriov_max_vfs=max_vfs, addresses=("10.20.0.6/24",)),
    )
    return synthetic_host(nodes=2, cores_per_node=4, threads_per_core=2, nics=nics, **kw)


def pool_host():
    pools = (
        StoragePool(name="ssd", total=50 * 10**9, used=0),
        StoragePool(name="default", total=100 * 10**9, used=10 * 10**9),
    )
    return synthetic_host(nodes=1, storage_pools=pools)
