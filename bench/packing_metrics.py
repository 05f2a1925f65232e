"""Packing figures both engines are scored by (stdlib only: ours, the Nova venv and the exact packer import it).

A node state is a dict of free and capacity per resource, in threads and bytes:
`{"free_threads", "thread_cap", "free_general", "general_cap", "free_huge", "huge_cap"}`.
Stranded: free threads on a node with less than STRANDED_BYTES of either memory free (nothing that
needs memory can use them), and free memory on a node with no free thread.
"""

from __future__ import annotations

GiB = 1024**3
STRANDED_BYTES = 2 * GiB

# The fill-only stream (issue 12): 400 pinned requests in arrival order on 8 nodes x 16 cores x 2 threads,
# 128 GiB per node of which 32 GiB are 2M hugepages.
FILL_HOST = {"nodes": 8, "cores_per_node": 16, "threads_per_core": 2, "memory_per_node": 128 * GiB}
FILL_PAGES_2M = 16384
FILL_REQUESTS = 400
SEEDS = tuple(range(1, 21))


def fill_requests(seed: int) -> list[dict]:
    """Pinned requests of 1-8 vCPUs and 1-8 GiB per vCPU; 40% of them on 2M hugepages."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(FILL_REQUESTS):
        cores = rng.choice((1, 2, 2, 4, 4, 6, 8))
        per = rng.choice((1, 2, 2, 4, 4, 6, 8))
        req = {"cores": cores, "memory": cores * per * GiB, "pinned_cores": "auto", "name": f"f{i}"}
        if rng.random() < 0.4:
            req |= {"hugepages_backed": True, "hugepage_size": "2M"}
        out.append(req)
    return out


def state_figures(nodes: list[dict]) -> dict:
    """Use of each resource (0-1) and what is stranded, over a host's node states."""

    def share(free: str, cap: str) -> float:
        total = sum(n[cap] for n in nodes)
        return 1 - sum(n[free] for n in nodes) / total if total else 0.0

    no_memory = [n for n in nodes if n["free_general"] < STRANDED_BYTES and n["free_huge"] < STRANDED_BYTES]
    no_threads = [n for n in nodes if n["free_threads"] == 0]
    return {
        "thread_use": share("free_threads", "thread_cap"),
        "hugepage_use": share("free_huge", "huge_cap"),
        "general_use": share("free_general", "general_cap"),
        "stranded_threads": sum(n["free_threads"] for n in no_memory),
        "stranded_memory_gib": sum(n["free_general"] + n["free_huge"] for n in no_threads) / GiB,
    }


def mean_figures(states: list[dict]) -> dict:
    keys = states[0].keys() if states else ()
    return {k: sum(s[k] for s in states) / len(states) for k in keys}
