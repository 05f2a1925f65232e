"""Storage (docs/design.md §4 "Storage"): a pool named by a tag, else the default pool, else the first
that fits; never past a pool's free space."""

from __future__ import annotations

import pytest

from tests.unit.placement.common import pool_host, req, run
from vmhost.model import Policy
from vmhost.placement import PlacementError, compute_usage, place


def test_storage_pool_by_tag_then_default_then_first_fit():
    host = pool_host()
    a = place(host, [], req(cores=1, storage="root:20(ssd),data:40"), Policy())
    # root goes to the pool named in its tags; data to the first pool that still fits (ssd has 30 GB left).
    assert [(d.label, d.size, d.pool, d.tags) for d in a.disks] == [
        ("root", 20 * 10**9, "ssd", ("ssd",)),
        ("data", 40 * 10**9, "default", ()),
    ]
    b = place(host, [], req(cores=1, storage="root:10"), Policy(default_storage_pool="default"))
    assert b.disks[0].pool == "default"


def test_storage_never_past_free_space_and_counts_our_disks():
    host = pool_host()
    allocs = run(host, [req(cores=1, storage="root:30(ssd)")])
    assert compute_usage(host, allocs, Policy()).storage_committed == {"ssd": 30 * 10**9}
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=1, storage="root:30(ssd)"), Policy())
    assert str(e.value) == "disk root: need 30 GB in pool ssd (tagged ssd), it has 20 GB free"
    with pytest.raises(PlacementError) as e:
        place(host, allocs, req(cores=1, storage="root:200"), Policy())
    assert str(e.value) == ("disk root: need 200 GB in one pool, ssd has 20 GB free, default has 90 GB free")


def test_default_pool_must_exist():
    with pytest.raises(PlacementError, match=r"^disk root: default storage pool 'fast' does not exist"):
        place(pool_host(), [], req(cores=1, storage="root:1"), Policy(default_storage_pool="fast"))
