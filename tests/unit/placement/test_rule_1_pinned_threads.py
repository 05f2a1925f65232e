"""Rule 1 (docs/design.md §4): a pinned thread belongs to exactly one VM; reserved threads are never used."""

from __future__ import annotations

import pytest

from tests.unit.hosts import synthetic_host
from tests.unit.placement.common import req, run
from vmhost.model import Policy
from vmhost.placement import PlacementError, place


def test_auto_pinning_never_reuses_a_thread_and_skips_reserved():
    host = synthetic_host(nodes=1, cores_per_node=4, threads_per_core=2)
    policy = Policy(reserved_cores=(0, 4))  # core 0 (threads 0 and 4) kept for the host
    allocs = run(host, [req(cores=2, pinned_cores="auto")] * 3, policy)
    used = [t for a in allocs for t in a.pinned]
    assert len(used) == len(set(used)) == 6
    assert not set(used) & {0, 4}
    with pytest.raises(PlacementError, match=r"^pinned cpus: need 2, node 0 has 0 free$"):
        place(host, allocs, req(cores=2, pinned_cores="auto"), policy)
