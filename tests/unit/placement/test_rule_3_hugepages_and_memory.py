"""Rule 3 (docs/design.md §4): hugepages are never overcommitted and are not general memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.hosts import GiB, synthetic_host
from tests.unit.placement.common import req, run
from vmhost.model import Policy
from vmhost.placement import PlacementError, compute_usage, place


def test_hugepage_shortage_message_names_every_node():
    host = synthetic_host(nodes=2, memory_per_node=16 * GiB, hugepages=[{"2M": 1024}, {"2M": 0}])
    with pytest.raises(PlacementError) as e:
        place(host, [], req(cores=2, memory="8G", hugepages_backed=True, hugepage_size="2M"), Policy())
    assert str(e.value) == "hugepages 2M: need 4096, node 0 has 1024 free, node 1 has 0"


def test_hugepages_are_consumed_exactly_and_never_past_total():
    host = synthetic_host(nodes=1, memory_per_node=16 * GiB, hugepages={"2M": 1024})  # 2G of pages
    allocs = run(host, [req(cores=1, memory="1G", hugepage_size="2M")] * 2)
    usage = compute_usage(host, allocs, Policy())
    assert usage.nodes[0].hugepages["2M"] == (1024, 1024)
    with pytest.raises(PlacementError, match=r"^hugepages 2M: need 32, node 0 has 0 free$"):
        place(host, allocs, req(cores=1, memory="64M", hugepage_size="2M"), Policy())


def test_general_memory_excludes_hugepages_and_reserved_and_applies_ratio():
    host = synthetic_host(nodes=2, memory_per_node=16 * GiB, hugepages={"1G": 4})  # 2 * (16 - 4) = 24G
    policy = Policy(reserved_memory=4 * GiB, memory_overcommit_ratio=1.5)  # (24 - 4) * 1.5 = 30G
    usage = compute_usage(host, [], policy)
    assert usage.memory_capacity == 30 * GiB
    assert usage.nodes[0].memory_capacity == 15 * GiB  # (16 - 4 - 2) * 1.5
    allocs = run(host, [req(cores=1, memory="30G")], policy)
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=1, memory="1G"), policy)
    assert str(e.value).startswith("memory: need 1G, the host has 0B of general memory free (30G of 30G in use")
    # Hugepage memory is separate: a hugepage VM still fits.
    hp = place(host, allocs, req(cores=1, memory="4G", hugepage_size="1G"), policy)
    assert hp.hugepages.per_node == {0: 4}


def test_auto_hugepage_size_prefers_1g_then_2m():
    host = synthetic_host(nodes=1, memory_per_node=16 * GiB, hugepages={"2M": 2048, "1G": 2})
    a = place(host, [], req(cores=1, memory="2G", hugepages_backed=True), Policy())
    assert a.hugepages.size == "1G" and a.hugepages.per_node == {0: 2}
    b = place(host, [a], req(cores=1, memory="2G", hugepages_backed=True), Policy())
    assert b.hugepages.size == "2M" and b.hugepages.per_node == {0: 1024}  # no 1G pages left
    c = place(host, [], req(cores=1, memory="512M", hugepages_backed=True), Policy())
    assert c.hugepages.size == "2M"  # 512M is not a whole number of 1G pages
    with pytest.raises(PlacementError, match=r"is not a whole number of 2M hugepages"):
        place(host, [], replace(req(cores=1, memory="65M"), hugepages_backed=True), Policy())
