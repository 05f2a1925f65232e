"""Packing, our side (runs in .venv): a fill-only stream and a churn stream, 20 seeds each.

Writes the streams (results/packing_workload.json) that nova_runner.py (`packing`) and exact_packer.py
replay, and our figures (results/ours_packing.json): acceptance, vCPUs and memory placed, mean
thread / hugepage / general-memory use, stranded resources (bench/packing_metrics.py, shared by all).
Fill-only: every request in arrival order, nothing leaves; figures of the final state. Churn: the
stream of churn.py (arrivals with their departures) for each seed; figures averaged over the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import churn
import packing_metrics as pm
from hosts_bench import host_dict

from vmhost.model import Allocation, HostTopology, Policy, VmRequest
from vmhost.parse import HUGEPAGE_SIZES
from vmhost.placement import PlacementError, compute_usage, place

RESULTS = Path(__file__).parent / "results"


def node_states(host: HostTopology, allocs: list[Allocation], policy: Policy) -> list[dict]:
    out = []
    for nu in compute_usage(host, allocs, policy).nodes:
        pages = {s: (HUGEPAGE_SIZES[s] * t, HUGEPAGE_SIZES[s] * max(0, t - u)) for s, (t, u) in nu.hugepages.items()}
        out.append(
            {
                "free_threads": len(nu.free_threads),
                "thread_cap": len(nu.threads) - len(nu.reserved),
                "free_general": nu.memory_free,
                "general_cap": nu.memory_capacity,
                "free_huge": sum(f for _, f in pages.values()),
                "huge_cap": sum(t for t, _ in pages.values()),
            }
        )
    return out


def fill(host: HostTopology, policy: Policy, requests: list[dict]) -> dict:
    allocs: list[Allocation] = []
    for r in requests:
        with contextlib.suppress(PlacementError):
            allocs.append(place(host, allocs, VmRequest.from_dict(r), policy))
    return {
        "accepted": len(allocs),
        "arrivals": len(requests),
        "vcpus": sum(a.vcpus for a in allocs),
        "memory_gib": sum(a.memory for a in allocs) / pm.GiB,
        **pm.state_figures(node_states(host, allocs, policy)),
    }


def churn_run(w: dict) -> dict:
    host = HostTopology.from_dict(w["host"])
    policy = Policy.from_dict(w["policy"])
    live: dict[int, Allocation] = {}
    states = []
    arrivals = accepted = violations = 0
    for ev in w["events"]:
        if ev["op"] == "depart":
            live.pop(ev["id"], None)
        else:
            arrivals += 1
            try:
                live[ev["id"]] = place(
                    host, list(live.values()), VmRequest.from_dict({**ev["request"], "name": f"vm{ev['id']}"}), policy
                )
                accepted += 1
            except PlacementError:
                pass
        allocs = list(live.values())
        violations += len(churn.check(host, allocs, policy))
        states.append(pm.state_figures(node_states(host, allocs, policy)))
    return {"accepted": accepted, "arrivals": arrivals, "violations": violations, **pm.mean_figures(states)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workload", type=Path, default=RESULTS / "packing_workload.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "ours_packing.json")
    a = ap.parse_args()
    fh = pm.FILL_HOST
    fill_host = host_dict(
        fh["nodes"], fh["cores_per_node"], fh["threads_per_core"], fh["memory_per_node"], {"2M": pm.FILL_PAGES_2M}
    )
    fill_policy = {"cpu_overcommit_ratio": 1.0, "memory_overcommit_ratio": 1.0}
    work = {
        "fill": {
            "host": fill_host,
            "policy": fill_policy,
            "seeds": {str(s): pm.fill_requests(s) for s in pm.SEEDS},
        },
        "churn": {str(s): churn.workload(s, 600, 25.0) for s in pm.SEEDS},
    }
    a.workload.parent.mkdir(parents=True, exist_ok=True)
    a.workload.write_text(json.dumps(work))
    host, policy = HostTopology.from_dict(fill_host), Policy.from_dict(fill_policy)
    out = {"engine": "vmhost", "fill": {}, "churn": {}}
    for s, reqs in work["fill"]["seeds"].items():
        out["fill"][s] = r = fill(host, policy, reqs)
        print(
            f"  fill ours seed {s}: {r['accepted']}/{r['arrivals']}, {r['vcpus']} vCPUs, {r['memory_gib']:.0f} GiB, "
            f"stranded threads {r['stranded_threads']}",
            file=sys.stderr,
        )
    for s, w in work["churn"].items():
        out["churn"][s] = r = churn_run(w)
        print(
            f"  churn ours seed {s}: {r['accepted']}/{r['arrivals']}, thread use {r['thread_use']:.3f}, "
            f"{r['violations']} rule 1-3 violations",
            file=sys.stderr,
        )
    a.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
