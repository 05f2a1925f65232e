"""The churn stream of the packing benchmark (bench/packing.py): seeded arrivals and departures.

Every arrival carries its departure step, so every engine sees the same stream whatever it accepts;
`check` recomputes docs/design.md §4 rules 1-3 independently of the engine after every step.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hosts_bench import GiB, host_dict

from vmhost.model import Allocation, HostTopology, Policy

HOST = {"nodes": 4, "cores_per_node": 8, "threads_per_core": 2, "memory_per_node": 64 * GiB, "hugepages": {"2M": 8192}}
KINDS = (("pinned", 35), ("hugepage", 25), ("shared", 40))


def workload(seed: int, steps: int, mean_life: float) -> dict:
    rng = random.Random(seed)
    hd = host_dict(
        HOST["nodes"], HOST["cores_per_node"], HOST["threads_per_core"], HOST["memory_per_node"], HOST["hugepages"]
    )
    reserved = hd["nodes"][0]["cores"][0]["threads"]  # the host keeps core 0 of node 0
    events: list[dict] = []
    departs: dict[int, list[int]] = {}
    for t in range(steps):
        for vid in departs.pop(t, []):
            events.append({"op": "depart", "id": vid})
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        cores = rng.choice((2, 2, 4, 4, 6, 8)) if kind != "shared" else rng.choice((1, 2, 2, 4))
        mem = rng.choice((1, 2, 4, 8)) * GiB
        req: dict = {"cores": cores, "memory": mem}
        if kind in ("pinned", "hugepage"):
            req["pinned_cores"] = "auto"
        if kind == "hugepage":
            req |= {"hugepages_backed": True, "hugepage_size": "2M"}
        events.append({"op": "arrive", "id": t, "kind": kind, "request": req})
        life = max(1, math.ceil(rng.expovariate(1 / mean_life)))
        departs.setdefault(t + life, []).append(t)
    return {
        "seed": seed,
        "host": hd,
        "policy": {"cpu_overcommit_ratio": 4.0, "memory_overcommit_ratio": 1.0, "reserved_cores": reserved},
        "events": events,
    }


def check(host: HostTopology, allocs: list[Allocation], policy: Policy) -> list[str]:
    """Rules 1-3 recomputed from scratch; returns the violations (empty when all hold)."""
    bad = []
    reserved = set(policy.reserved_cores)
    seen: dict[int, str] = {}
    for a in allocs:
        for t in a.pinned or ():
            if t in seen:
                bad.append(f"rule 1: thread {t} pinned by {seen[t]} and {a.name}")
            if t in reserved:
                bad.append(f"rule 1: reserved thread {t} pinned by {a.name}")
            if t not in host.thread_node:
                bad.append(f"rule 1: {a.name} pinned to unknown thread {t}")
            seen[t] = a.name
    free = len(host.thread_node) - len(reserved) - len(seen)
    shared = sum(a.vcpus for a in allocs if a.pinned is None)
    if shared > math.floor(free * policy.cpu_overcommit_ratio + 1e-9):
        bad.append(f"rule 2: {shared} shared vCPUs on {free} free threads at ratio {policy.cpu_overcommit_ratio}")
    pages: dict[tuple[str, int], int] = {}
    for a in allocs:
        if a.hugepages:
            for n, p in a.hugepages.per_node.items():
                pages[a.hugepages.size, n] = pages.get((a.hugepages.size, n), 0) + p
    for (size, n), p in pages.items():
        if p > host.node(n).hugepages.get(size, 0):
            bad.append(f"rule 3: {p} {size} pages used on node {n} of {host.node(n).hugepages.get(size, 0)}")
    general = sum(n.memory - n.hugepage_bytes() for n in host.nodes) - policy.reserved_memory
    used = sum(a.memory for a in allocs if a.hugepages is None)
    if used > general * policy.memory_overcommit_ratio:
        bad.append(f"rule 3: general memory {used} over capacity {general * policy.memory_overcommit_ratio:.0f}")
    return bad
