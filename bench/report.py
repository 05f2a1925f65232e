"""Turn the benchmark JSON files into one markdown report, one combined JSON and the PNG plots.

Runs in bench/.nova-venv (it has matplotlib). Reads whatever results exist and says which are
missing; a benchmark reports, it never asserts. Targets (issues 6 and 12): placement p99 <= 1 ms for
every shape, cold and warm; no slower than Nova anywhere; packing: behind Nova on both vCPUs and memory
on no fill-only seed, stranded threads <= Nova's, churn acceptance and use at least the old engine's;
compose overhead <= 15% over raw.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGET_P99_US = 1000.0
TARGET_OVERHEAD = 0.15


def _load(name: str) -> dict | None:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.exists() else None


def _us(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f} s"
    if v >= 1e3:
        return f"{v / 1e3:.2f} ms"
    return f"{v:.0f} µs"


def _outcome(o: dict | None) -> str:
    if not o:
        return "?"
    if o.get("timeout"):
        return "timeout"
    return f"placed/{o['nodes']}" if o["placed"] else "rejected"


def latency_section(ours: dict, nova: dict | None) -> tuple[list[str], dict, list[dict]]:
    nova_by = {(r["case"], r["span"], r["feasible"]): r for r in (nova or {}).get("results", [])}
    lines = [
        "| host | residents | guest span | request | ours median | ours p99 | ours max | ours warm median | "
        "ours warm p99 | ours from scratch (median) | Nova median | Nova p99 | Nova max | Nova / ours (median) "
        "| outcome ours / Nova |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    worst_p99 = worst_warm_p99 = 0.0
    over_target = slower = warm_over = warm_slower = 0
    for r in ours["results"]:
        n = nova_by.get((r["case"], r["span"], r["feasible"]))
        o = r["cpu"]
        worst_p99 = max(worst_p99, o["p99_us"])
        over_target += o["p99_us"] > TARGET_P99_US
        worst_warm_p99 = max(worst_warm_p99, r["warm_cpu"]["p99_us"])
        warm_over += r["warm_cpu"]["p99_us"] > TARGET_P99_US
        row = {
            "nodes": r["nodes"],
            "threads": r["threads"],
            "residents": r["residents"],
            "span": r["span"],
            "feasible": r["feasible"],
            "ours": o,
            "ours_warm": r["warm_cpu"],
            "ours_outcome": r["outcome"],
        }
        if n is None:
            nova_cells = ["n/a"] * 3
            ratio = "n/a"
        elif n["outcome"].get("timeout"):
            limit_us = n["limit_s"] * 1e6
            nova_cells = [f"> {n['limit_s']:g} s (limit)"] * 3
            ratio = f"> {limit_us / o['median_us']:,.0f}x"
            row |= {"nova": None, "nova_timeout_s": n["limit_s"], "ratio": limit_us / o["median_us"]}
        else:
            nc = n["cpu"]
            nova_cells = [_us(nc["median_us"]), _us(nc["p99_us"]), _us(nc["max_us"])]
            ratio_v = nc["median_us"] / o["median_us"]
            slower += ratio_v < 1
            warm_slower += nc["median_us"] < r["warm_cpu"]["median_us"]
            ratio = f"{ratio_v:.2f}x"
            row |= {"nova": nc, "ratio": ratio_v}
        row["nova_outcome"] = n["outcome"] if n else None
        rows.append(row)
        lines.append(
            f"| {r['nodes']} nodes / {r['threads']} thr | {r['residents']} | {r['span']} | "
            f"{'feasible' if r['feasible'] else 'infeasible'} | {_us(o['median_us'])} | {_us(o['p99_us'])} | "
            f"{_us(o['max_us'])} | {_us(r['warm_cpu']['median_us'])} | {_us(r['warm_cpu']['p99_us'])} | "
            f"{_us(r['scratch_cpu']['median_us']) if r.get('scratch_cpu') else 'n/a'} | {' | '.join(nova_cells)} | {ratio} | "
            f"{_outcome(r['outcome'])} / {_outcome(n['outcome'] if n else None)} |"
        )
    reread = [r["reread_cpu"] for r in ours["results"] if r.get("reread_cpu") and r["residents"] >= 2000]
    summary = {
        "reread_2000_median_us": max((x["median_us"] for x in reread), default=None),
        "reread_2000_p99_us": max((x["p99_us"] for x in reread), default=None),
        "shapes": len(rows),
        "worst_p99_us": worst_p99,
        "shapes_over_1ms_p99": over_target,
        "shapes_slower_than_nova": slower,
        "warm_worst_p99_us": worst_warm_p99,
        "warm_shapes_over_1ms_p99": warm_over,
        "warm_shapes_slower_than_nova": warm_slower,
    }
    return lines, summary, rows


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / max(1, len(rows))


def packing_section(ours: dict | None, nova: dict | None, exact: dict | None) -> tuple[list[str], dict]:
    """Fill-only and churn, 20 seeds each (bench/packing.py): means over the seeds, per engine."""
    if not ours:
        return ["(packing results missing)"], {}
    nova = nova or {"fill": {}, "churn": {}}
    out: dict = {"fill": {}, "churn": {}}
    seeds = sorted(ours["fill"], key=int)
    behind = [
        s
        for s in seeds
        if s in nova["fill"]
        and ours["fill"][s]["vcpus"] < nova["fill"][s]["vcpus"]
        and ours["fill"][s]["memory_gib"] < nova["fill"][s]["memory_gib"]
    ]
    lines = [
        f"**Fill-only** ({len(seeds)} seeds; means over seeds of the final state):",
        "",
        "| engine | acceptance | vCPUs placed | memory placed | thread use | hugepage use | general-memory use "
        "| stranded threads (mean / max) | stranded memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res in (("vmhost", ours["fill"]), ("Nova", nova["fill"])):
        rows = [res[s] for s in seeds if s in res]
        if not rows:
            lines.append(f"| {label} | (missing) | | | | | | | |")
            continue
        f = {k: _mean(rows, k) for k in rows[0] if isinstance(rows[0][k], int | float)}
        f["stranded_threads_max"] = max(r["stranded_threads"] for r in rows)
        out["fill"][label] = f
        lines.append(
            f"| {label} | {f['accepted'] / f['arrivals']:.1%} | {f['vcpus']:.1f} | {f['memory_gib']:.0f} GiB | "
            f"{f['thread_use']:.3f} | {f['hugepage_use']:.3f} | {f['general_use']:.3f} | "
            f"{f['stranded_threads']:.2f} / {f['stranded_threads_max']} | {f['stranded_memory_gib']:.0f} GiB |"
        )
    ex = (exact or {}).get("fill") or {}
    ex_rows = [ex[s] for s in seeds if s in ex and "vcpus" in ex[s]]
    if ex_rows:
        e = {k: _mean(ex_rows, k) for k in ("accepted", "vcpus", "memory_gib", "score", "bound")}
        out["fill"]["exact"] = e
        lines.append(
            f"| exact (CP-SAT, any subset and order, {exact['seconds_per_seed']:g} s per seed) | "
            f"{e['accepted'] / 400:.1%} | {e['vcpus']:.1f} | {e['memory_gib']:.0f} GiB | | | | | |"
        )
    lines.append("")
    lines.append(
        f"vmhost behind Nova on both vCPUs and memory: {len(behind)}/{len(seeds)} seeds"
        + (f" ({', '.join(behind)})." if behind else ".")
    )
    out["fill"]["behind_nova_seeds"] = behind
    if ex_rows and "vmhost" in out["fill"]:
        o, e = out["fill"]["vmhost"], out["fill"]["exact"]
        gap_v, gap_m = 1 - o["vcpus"] / e["vcpus"], 1 - o["memory_gib"] / e["memory_gib"]
        worst = max(1 - e["score"] / e["bound"] for e in ex_rows)
        out["fill"]["gap_to_exact"] = {"vcpus": gap_v, "memory": gap_m, "solver_gap_max": worst}
        lines.append(
            f"Gap to the exact packer: vCPUs {gap_v:.1%}, memory {gap_m:.1%} (the solver's own packing is within "
            f"{worst:.1%} of its bound on every seed)."
        )
    elif exact and exact.get("skipped"):
        lines.append(f"Exact packer: skipped ({exact['skipped']}).")
    lines += [
        "",
        f"**Churn** ({len(ours['churn'])} seeds; means over seeds of the mean over steps):",
        "",
        "| engine | acceptance | thread use | hugepage use | general-memory use | stranded threads | stranded memory "
        "| rule violations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, res in (("vmhost", ours["churn"]), ("Nova (dedicated/shared split)", nova["churn"])):
        rows = list(res.values())
        if not rows:
            lines.append(f"| {label} | (missing) | | | | | | |")
            continue
        f = {k: _mean(rows, k) for k in rows[0] if isinstance(rows[0][k], int | float)}
        out["churn"][label] = f
        viol = (
            f"{sum(r['violations'] for r in rows)} (rules 1-3, every step)"
            if "violations" in rows[0]
            else f"rule 2 on {sum(r['rule2_violation_steps'] for r in rows)} steps"
        )
        lines.append(
            f"| {label} | {f['accepted'] / f['arrivals']:.1%} | {f['thread_use']:.3f} | {f['hugepage_use']:.3f} | "
            f"{f['general_use']:.3f} | {f['stranded_threads']:.2f} | {f['stranded_memory_gib']:.1f} GiB | {viol} |"
        )
    lines += ["", "![utilisation per seed, vmhost against Nova](bench/results/packing.png)"]
    return lines, out


def packing_plot(ours: dict, nova: dict | None, exact: dict | None) -> str:
    """One PNG: per seed, vmhost against Nova: fill-only vCPUs and memory placed, churn mean thread use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nova = nova or {"fill": {}, "churn": {}}
    ex = (exact or {}).get("fill") or {}
    seeds = sorted(ours["fill"], key=int)
    x = list(range(len(seeds)))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (
        ("fill-only: vCPUs placed (of 256 threads)", "fill", "vcpus", 256),
        ("fill-only: memory placed (of 1024 GiB)", "fill", "memory_gib", 1024),
        ("churn: mean thread use", "churn", "thread_use", 1),
    )
    for ax, (title, sec, key, cap) in zip(axes, panels, strict=True):
        w = 0.4
        ax.bar([i - w / 2 for i in x], [ours[sec][s][key] / cap for s in seeds], w, label="vmhost", color="tab:blue")
        ax.bar(
            [i + w / 2 for i in x],
            [nova[sec][s][key] / cap if s in nova[sec] else 0 for s in seeds],
            w,
            label="Nova",
            color="tab:orange",
        )
        if sec == "fill" and ex:
            ax.plot(
                x,
                [ex[s][key] / cap if key in ex.get(s, {}) else None for s in seeds],
                "k_",
                ms=12,
                mew=2,
                label="exact packer",
            )
        lo = min(min(ours[sec][s][key] for s in seeds), min((nova[sec][s][key] for s in nova[sec]), default=0)) / cap
        ax.set_ylim(max(0, lo - 0.1), 1.02)
        ax.set_title(title)
        ax.set_xlabel("seed")
        ax.set_xticks(x, seeds, fontsize=7)
        ax.set_ylabel("share of the host")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(RESULTS / "packing.png", dpi=90)
    plt.close(fig)
    return "packing.png"


def compose_section(c: dict | None) -> tuple[list[str], dict]:
    if not c:
        return ["(compose results missing)"], {}
    lines = [
        "| backend | operation | vmhost median | raw median | vmhost / raw | overhead |",
        "|---|---|---|---|---|---|",
    ]
    out = {}
    pairs = {
        "libvirt": (
            ("compose + start", "vmhost_compose", "raw_define_start", "virsh define + start"),
            ("decompose", "vmhost_decompose", "raw_destroy_undefine", "virsh destroy + undefine"),
        ),
        "lxd": (
            ("compose (create)", "vmhost_compose", "raw_init", "lxc init --empty --vm"),
            ("decompose", "vmhost_decompose", "raw_delete", "lxc delete"),
        ),
    }
    for backend, ops in pairs.items():
        b = c.get(backend) or {"skipped": "not run"}
        if "skipped" in b:
            lines.append(f"| {backend} | skipped: {b['skipped']} | | | | |")
            continue
        for label, ours, raw, raw_label in ops:
            o, r = b[ours]["median_s"], b[raw]["median_s"]
            out[f"{backend} {label}"] = {"vmhost_s": o, "raw_s": r, "ratio": o / r}
            lines.append(
                f"| {backend} | {label} (raw: {raw_label}) | {o:.3f} s | {r:.3f} s | {o / r:.2f}x | {o / r - 1:+.0%} |"
            )
    if c.get("vmhost_startup_s"):
        lines.append(f"\n`vmhost --help` alone (interpreter start + imports): {c['vmhost_startup_s']:.3f} s median.")
    return lines, out


def scaling_section(s: dict | None) -> list[str]:
    if not s:
        return ["(scaling results missing)"]
    if "skipped" in s:
        return [f"skipped: {s['skipped']}"]
    lines = ["| VMs defined | vmhost resources | vmhost list | virsh list --all |", "|---|---|---|---|"]
    for p in s["points"]:
        lines.append(
            f"| {p['vms_bench']} | {p['vmhost_resources']['median_s']:.3f} s | {p['vmhost_list']['median_s']:.3f} s | "
            f"{p['virsh_list']['median_s']:.3f} s |"
        )
    return lines


def plots(rows: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    res_levels = sorted({r["residents"] > 0 for r in rows})
    fig, axes = plt.subplots(len(res_levels), 1, figsize=(14, 5 * len(res_levels)), squeeze=False)
    for ax, loaded in zip(axes[:, 0], res_levels, strict=False):
        sel = [r for r in rows if (r["residents"] > 0) == loaded]
        x = list(range(len(sel)))
        labels = [f"{r['nodes']}n s{r['span']} {'F' if r['feasible'] else 'I'}" for r in sel]
        ours = [r["ours"]["median_us"] for r in sel]
        p99 = [r["ours"]["p99_us"] for r in sel]
        warm = [r["ours_warm"]["median_us"] for r in sel]
        nova = [r["nova"]["median_us"] if r.get("nova") else None for r in sel]
        w = 0.27
        ax.bar([i - w for i in x], ours, w, label="vmhost median (cold)")
        ax.bar(x, warm, w, label="vmhost median (warm)")
        ax.bar([i + w for i in x], [v or 0 for v in nova], w, label="Nova median")
        ax.scatter([i - w for i in x], p99, marker="_", color="black", s=80, label="vmhost p99", zorder=3)
        for i, r in enumerate(sel):
            if r.get("nova_timeout_s"):
                ax.bar(i + w, r["nova_timeout_s"] * 1e6, w, color="red", hatch="//", alpha=0.6)
                ax.annotate("> limit", (i + w, r["nova_timeout_s"] * 1e6), ha="center", va="bottom", fontsize=7)
        ax.axhline(TARGET_P99_US, color="grey", ls="--", lw=1, label="1 ms target")
        ax.set_yscale("log")
        ax.set_ylabel("CPU time per decision (µs)")
        ax.set_xticks(x, labels, rotation=60, fontsize=7)
        res = sorted({r["residents"] for r in sel})
        ax.set_title(f"placement latency, resident VMs: {', '.join(map(str, res))} (F feasible, I infeasible)")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(RESULTS / "placement.png", dpi=90)
    plt.close(fig)
    made.append("placement.png")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=RESULTS / "report.md")
    a = ap.parse_args()
    ours, nova = _load("ours_latency.json"), _load("nova_latency.json")
    op, np_, xp = _load("ours_packing.json"), _load("nova_packing.json"), _load("exact_packing.json")
    comp, scal = _load("compose.json"), _load("scaling.json")
    md = [f"## Benchmarks ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {platform.python_version()})", ""]
    combined: dict = {}
    rows: list[dict] = []
    md += ["### Placement latency: vmhost `place` vs Nova `numa_fit_instance_to_host` (CPU time per decision)", ""]
    if ours:
        lines, summary, rows = latency_section(ours, nova)
        combined["latency"] = {"summary": summary, "rows": rows}
        md += lines
        md += [
            "",
            "Cold: the decision right after a new read of the hypervisor in which one pinned VM changed, with the "
            "service's usage index and parse cache; warm: the same objects again; from scratch: no index, usage "
            "summed from freshly parsed allocations (reference).",
            "",
            f"Worst vmhost p99 (cold): {_us(summary['worst_p99_us'])}; shapes over the 1 ms p99 target: "
            f"{summary['shapes_over_1ms_p99']}/{summary['shapes']}; shapes where vmhost's median is slower than Nova's: "
            f"{summary['shapes_slower_than_nova']}/{summary['shapes']}. "
            f"Warm (usage already known, as Nova's host object carries it): worst p99 "
            f"{_us(summary['warm_worst_p99_us'])}, over 1 ms: {summary['warm_shapes_over_1ms_p99']}/{summary['shapes']}, "
            f"slower than Nova: {summary['warm_shapes_slower_than_nova']}/{summary['shapes']}.",
        ]
        if summary["reread_2000_median_us"] is not None:
            md += [
                "",
                f"Re-reading 2,000 unchanged allocations (their metadata text, fresh from a new read, through the "
                f"provider's parse cache): median {_us(summary['reread_2000_median_us'])}, "
                f"p99 {_us(summary['reread_2000_p99_us'])}.",
            ]
    else:
        md.append("(latency results missing)")
    md += ["", "### Packing: fill-only and churn streams (same requests for every engine)", ""]
    lines, packing = packing_section(op, np_, xp)
    combined["packing"] = packing
    md += lines
    md += ["", "### Compose cost on the real hypervisor (median wall time of whole commands)", ""]
    lines, compose = compose_section(comp)
    combined["compose"] = compose
    md += lines
    md += ["", "### Scaling with VMs defined (libvirt, median wall time)", ""]
    md += scaling_section(scal)
    combined["scaling"] = scal
    try:
        made = plots(rows) if rows else []
        if op:
            made.append(packing_plot(op, np_, xp))
        md += ["", "Plots: " + ", ".join(f"bench/results/{m}" for m in made)]
    except Exception as e:  # no plot is no reason to lose the table
        md += ["", f"(plots not made: {e})"]
    text = "\n".join(md) + "\n"
    a.out.write_text(text)
    (RESULTS / "bench.json").write_text(json.dumps(combined, indent=1))
    print(text)


if __name__ == "__main__":
    main()
