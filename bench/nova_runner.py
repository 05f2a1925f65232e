"""The Nova side of the benchmarks (runs in bench/.nova-venv): latency cases and the packing streams.

Reads the same JSON files our side reads (cases.json from placement_bench.py, packing_workload.json
from packing.py) and writes its timings/outcomes next to ours. Every call to Nova's
`numa_fit_instance_to_host` runs under a time limit (an interval timer); a call that does not
finish is recorded as a timeout and reported as "> limit".
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nova_adapter as na
import packing_metrics as pm

RESULTS = Path(__file__).parent / "results"


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


signal.signal(signal.SIGALRM, _alarm)


def stats(ns: list[int]) -> dict:
    s = sorted(ns)
    pct = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1e3  # noqa: E731
    return {"n": len(s), "median_us": pct(0.5), "p99_us": pct(0.99), "max_us": s[-1] / 1e3}


def timed_fit(host, inst, lim, limit: float):
    """(fitted | None | Timeout, wall ns, CPU ns) for one Nova fit under `limit` seconds."""
    signal.setitimer(signal.ITIMER_REAL, limit)
    w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
    try:
        got = na.fit(host, inst, lim)
    except Timeout as e:
        got = e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return got, time.perf_counter_ns() - w0, time.thread_time_ns() - c0


def latency(cases: Path, out: Path, reps: int, budget: float, limit: float) -> None:
    data = json.loads(cases.read_text())
    results = []
    for case in data["cases"]:
        host = na.load_host(na.nova_host(case["host"]), case["residents"])
        lim = na.limits(case["policy"]["cpu_overcommit_ratio"], case["policy"]["memory_overcommit_ratio"])
        for r in case["requests"]:
            inst = na.instance_request(
                r["cores"], r["memory"], r["pinned_cores"] is not None, r.get("hugepage_size"), r["span"]
            )
            wall: list[int] = []
            cpu: list[int] = []
            outcome = None
            gc.collect()
            gc.freeze()
            t_end = time.perf_counter() + budget
            for i in range(reps):
                got, w, c = timed_fit(host, inst.obj_clone(), lim, limit)
                if isinstance(got, Timeout):
                    outcome = {"placed": None, "timeout": True}
                    wall, cpu = [w], [c]
                    break
                wall.append(w)
                cpu.append(c)
                if outcome is None:
                    outcome = {"placed": got is not None, "nodes": len(got.cells) if got is not None else 0}
                if time.perf_counter() > t_end and i >= 4:
                    break
            gc.unfreeze()
            results.append(
                {
                    "case": case["id"],
                    "nodes": case["nodes"],
                    "residents": len(case["residents"]),
                    "span": r["span"],
                    "feasible": r["feasible"],
                    "outcome": outcome,
                    "limit_s": limit,
                    "cpu": stats(cpu),
                    "wall": stats(wall),
                }
            )
            o = outcome
            what = "TIMEOUT" if o.get("timeout") else (f"placed on {o['nodes']} nodes" if o["placed"] else "rejected")
            print(
                f"  nova {case['id']:>10} span={r['span']} {'feasible  ' if r['feasible'] else 'infeasible'} "
                f"cpu median {results[-1]['cpu']['median_us']:10.1f} us  {what}",
                file=sys.stderr,
            )
    out.write_text(json.dumps({"engine": "nova", "results": results}, indent=1))


def churn_mode(w: dict, mode: str, limit: float, small: bool = False) -> dict:
    """Replay the seeded churn on Nova: placement-service inventory (VCPU, PCPU, MEMORY_MB) + NUMA fit.

    split: a modern host, cpu_dedicated_set = first half of each node's cores, cpu_shared_set = the rest
    (Nova needs this partition up front). legacy: every thread in both sets (the old vcpu_pin_set way):
    one VCPU inventory for all, so shared vCPUs can land on pinned threads; those steps are counted
    as rule 2 violations. `small`: pinned VMs without hugepages ask for `hw:mem_page_size=small`, so
    Nova counts them in each node's 4K pool and never on memory that is set aside as hugepages.
    """
    hd = w["host"]
    ratio_cpu, ratio_ram = w["policy"]["cpu_overcommit_ratio"], w["policy"]["memory_overcommit_ratio"]
    reserved = set(w["policy"].get("reserved_cores") or ())
    if mode == "split":
        dedicated = {
            n["id"]: {t for c in n["cores"][: len(n["cores"]) // 2] for t in c["threads"]} for n in hd["nodes"]
        }
        host = na.nova_host(hd, dedicated, reserved)
        pcpu_total = sum(len(c.pcpuset) for c in host.cells)
        vcpu_total = sum(len(c.cpuset) for c in host.cells)
    else:
        host = na.nova_host(hd, None, reserved)
        pcpu_total = vcpu_total = sum(len(c.cpuset) for c in host.cells)
    all_threads = sum(len(c.cpuset | c.pcpuset) for c in host.cells)
    mem_total_mb = sum(n["memory"] for n in hd["nodes"]) // na.MiB  # MEMORY_MB counts hugepage memory too
    lim = na.limits(ratio_cpu, ratio_ram)
    inv = {"VCPU": 0, "PCPU": 0, "MEMORY_MB": 0}
    live: dict[int, tuple] = {}
    steps = []
    states: list[dict] = []
    by_kind: dict[str, list[int]] = {}
    accepted = arrivals = timeouts = violations = 0
    for ev in w["events"]:
        if ev["op"] == "depart":
            got = live.pop(ev["id"], None)
            if got is not None:
                fitted, use = got
                if fitted is not None:
                    host = na.release(host, fitted)
                for k, v in use.items():
                    inv[k] -= v
        else:
            arrivals += 1
            kind = by_kind.setdefault(ev["kind"], [0, 0])
            kind[0] += 1
            r = ev["request"]
            pinned = r.get("pinned_cores") is not None
            cpu_rc = "PCPU" if pinned and mode == "split" else "VCPU"
            use = {cpu_rc: r["cores"], "MEMORY_MB": r["memory"] // na.MiB, "shared": 0 if pinned else r["cores"]}
            ok = (
                inv["PCPU"] + use.get("PCPU", 0) <= pcpu_total
                and inv["VCPU"] + use.get("VCPU", 0) <= vcpu_total * ratio_cpu
                and inv["MEMORY_MB"] + use["MEMORY_MB"] <= mem_total_mb * ratio_ram
            )
            fitted = None
            if ok:
                page = r.get("hugepage_size") or ("small" if small and pinned else None)
                inst = na.instance_request(r["cores"], r["memory"], pinned, page)
                if inst is not None:
                    fitted, _, _ = timed_fit(host, inst, lim, limit)
                    if isinstance(fitted, Timeout):
                        timeouts += 1
                        fitted = None
                    ok = fitted is not None
                    if ok:
                        host = na.claim(host, fitted)
            if ok:
                accepted += 1
                kind[1] += 1
                live[ev["id"]] = (fitted, use)
                for k, v in use.items():
                    inv[k] = inv.get(k, 0) + v
        u = na.used(host)
        # Rule 2 as we define it: shared vCPUs only on threads nobody pinned, at the overcommit ratio.
        if inv.get("shared", 0) > (all_threads - u["pinned_threads"]) * ratio_cpu:
            violations += 1
        steps.append(
            {"pinned_threads": u["pinned_threads"], "hugepages_2M": u["hugepages"].get("2M", 0), "live": len(live)}
        )
        if small:
            # Threads of the shared set count as free: unpinned, as vmhost counts its unpinned threads.
            states.append(pm.state_figures(na.node_states(host)))
    return {
        "engine": "nova",
        "mode": mode,
        "arrivals": arrivals,
        "accepted": accepted,
        "by_kind": by_kind,
        "timeouts": timeouts,
        "rule2_violation_steps": violations,
        "dedicated_threads": pcpu_total,
        "shared_threads": vcpu_total,
        "steps": steps,
        "figures": pm.mean_figures(states),
    }


def fill(host_dict: dict, requests: list[dict], limit: float) -> dict:
    """The fill-only stream on Nova: every thread dedicated (all requests are pinned), placement
    inventory (PCPU, MEMORY_MB) then the NUMA fit; general memory asks for 4K pages (see churn_mode)."""
    host = na.nova_host(host_dict, {n["id"]: {t for c in n["cores"] for t in c["threads"]} for n in host_dict["nodes"]})
    pcpu_total = sum(len(c.pcpuset) for c in host.cells)
    mem_total_mb = sum(n["memory"] for n in host_dict["nodes"]) // na.MiB
    lim = na.limits(1.0, 1.0)
    pcpu = mem = accepted = vcpus = timeouts = 0
    for r in requests:
        if pcpu + r["cores"] > pcpu_total or mem + r["memory"] // na.MiB > mem_total_mb:
            continue
        inst = na.instance_request(r["cores"], r["memory"], True, r.get("hugepage_size") or "small")
        fitted, _, _ = timed_fit(host, inst, lim, limit)
        if isinstance(fitted, Timeout):
            timeouts += 1
            continue
        if fitted is None:
            continue
        host = na.claim(host, fitted)
        pcpu += r["cores"]
        mem += r["memory"] // na.MiB
        accepted += 1
        vcpus += r["cores"]
    return {
        "accepted": accepted,
        "arrivals": len(requests),
        "vcpus": vcpus,
        "memory_gib": mem / 1024,
        "timeouts": timeouts,
        **pm.state_figures(na.node_states(host)),
    }


def packing(workload: Path, out: Path, limit: float) -> None:
    w = json.loads(workload.read_text())
    res: dict = {"engine": "nova", "fill": {}, "churn": {}}
    for s, reqs in w["fill"]["seeds"].items():
        res["fill"][s] = r = fill(w["fill"]["host"], reqs, limit)
        print(f"  fill nova seed {s}: {r['accepted']}/{r['arrivals']}, {r['vcpus']} vCPUs", file=sys.stderr)
    for s, cw in w["churn"].items():
        r = churn_mode(cw, "split", limit, small=True)
        res["churn"][s] = {"accepted": r["accepted"], "arrivals": r["arrivals"], "timeouts": r["timeouts"]}
        res["churn"][s] |= {"rule2_violation_steps": r["rule2_violation_steps"], **r["figures"]}
        print(f"  churn nova seed {s}: {r['accepted']}/{r['arrivals']}", file=sys.stderr)
    out.write_text(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("command", choices=("latency", "packing"))
    ap.add_argument("--cases", type=Path, default=RESULTS / "cases.json")
    ap.add_argument("--workload", type=Path, default=RESULTS / "packing_workload.json")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per shape at most (after the first call)")
    ap.add_argument("--limit", type=float, default=10.0, help="seconds one Nova call may take")
    a = ap.parse_args()
    if a.command == "latency":
        latency(a.cases, a.out or RESULTS / "nova_latency.json", a.reps, a.budget, a.limit)
    else:
        packing(a.workload, a.out or RESULTS / "nova_packing.json", a.limit)


if __name__ == "__main__":
    main()
