"""Offline reference for the fill-only stream (runs in bench/.nova-venv, needs `ortools`; optional).

CP-SAT may pick any subset of a seed's requests, in any order, and place each on one node or split
evenly over two (shares rounded up, so every packing it finds is one vmhost's rules allow). It
maximises vCPUs and memory placed as shares of the host's (vCPUs/threads + GiB/memory), the same
weighing the report uses. Each seed gets a time limit: the best packing found and the solver's upper
bound are both written, so a gap to the reference is never larger than reported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GiB = 1024**3
HALF_GIB = GiB // 2


def solve(host: dict, requests: list[dict], seconds: float, workers: int) -> dict:
    from ortools.sat.python import cp_model

    nodes = host["nodes"]
    threads = [sum(len(c["threads"]) for c in n["cores"]) for n in nodes]
    huge = [n["hugepages"].get("2M", 0) * 2 * 1024**2 // HALF_GIB for n in nodes]
    general = [n["memory"] // HALF_GIB - h for n, h in zip(nodes, huge, strict=True)]
    total_threads, total_mem_gib = sum(threads), sum(n["memory"] for n in nodes) // GiB
    m = cp_model.CpModel()
    use_t = [[] for _ in nodes]
    use_g = [[] for _ in nodes]
    use_h = [[] for _ in nodes]
    objective = []
    ws: list[list] = []
    for i, r in enumerate(requests):
        c, mem = r["cores"], r["memory"] // HALF_GIB
        placed = []
        for k in (1, 2):
            if k > c:
                continue
            w = m.NewBoolVar(f"w{i}_{k}")
            z = [m.NewBoolVar(f"z{i}_{k}_{n}") for n in range(len(nodes))]
            m.Add(sum(z) == k * w)
            for n, zn in enumerate(z):
                use_t[n].append((math.ceil(c / k), zn))
                (use_h if r.get("hugepages_backed") else use_g)[n].append((math.ceil(mem / k), zn))
            placed.append(w)
        m.Add(sum(placed) <= 1)
        ws.append(placed)
        # vCPUs / threads + GiB / memory, in integers: (vCPUs * memory_GiB / threads + GiB) * threads
        weight = c * total_mem_gib + (r["memory"] // GiB) * total_threads
        objective += [weight * w for w in placed]
    for n in range(len(nodes)):
        for use, cap in ((use_t, threads[n]), (use_g, general[n]), (use_h, huge[n])):
            if use[n]:
                m.Add(sum(a * z for a, z in use[n]) <= cap)
    m.Maximize(sum(objective))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = workers
    t0 = time.monotonic()
    status = solver.Solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return {"status": solver.StatusName(status)}
    chosen = [r for r, placed in zip(requests, ws, strict=True) if any(solver.Value(v) for v in placed)]
    scale = total_threads * total_mem_gib
    return {
        "status": solver.StatusName(status),
        "seconds": round(time.monotonic() - t0, 2),
        "accepted": len(chosen),
        "vcpus": sum(r["cores"] for r in chosen),
        "memory_gib": sum(r["memory"] for r in chosen) / GiB,
        "score": solver.ObjectiveValue() / scale,
        "bound": solver.BestObjectiveBound() / scale,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", type=Path, default=RESULTS / "packing_workload.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "exact_packing.json")
    ap.add_argument("--seconds", type=float, default=8.0, help="solver time per seed")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    try:
        import ortools  # noqa: F401
    except ImportError as e:
        a.out.write_text(json.dumps({"skipped": f"ortools is not installed in bench/.nova-venv ({e})"}))
        print(f"  exact packer skipped: {e}", file=sys.stderr)
        return
    w = json.loads(a.workload.read_text())
    out = {"seconds_per_seed": a.seconds, "fill": {}}
    for s, reqs in w["fill"]["seeds"].items():
        out["fill"][s] = r = solve(w["fill"]["host"], reqs, a.seconds, a.workers)
        print(
            f"  fill exact seed {s}: {r.get('vcpus')} vCPUs, {r.get('memory_gib', 0):.0f} GiB ({r['status']})",
            file=sys.stderr,
        )
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
