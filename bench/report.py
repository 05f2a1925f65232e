"""Turn the benchmark JSON files into one markdown report, one combined JSON and the PNG plots.

Runs in bench/.nova-venv (it has matplotlib). Reads whatever results exist and says which are
missing; a benchmark reports, it never asserts. Targets (issue 6): placement p99 <= 1 ms for
every shape, no slower than Nova anywhere, acceptance >= Nova's, compose overhead <= 15% over raw.
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
        "Nova median | Nova p99 | Nova max | Nova / ours (median) | outcome ours / Nova |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"{_us(o['max_us'])} | {_us(r['warm_cpu']['median_us'])} | {' | '.join(nova_cells)} | {ratio} | "
            f"{_outcome(r['outcome'])} / {_outcome(n['outcome'] if n else None)} |"
        )
    summary = {
        "shapes": len(rows),
        "worst_p99_us": worst_p99,
        "shapes_over_1ms_p99": over_target,
        "shapes_slower_than_nova": slower,
        "warm_worst_p99_us": worst_warm_p99,
        "warm_shapes_over_1ms_p99": warm_over,
        "warm_shapes_slower_than_nova": warm_slower,
    }
    return lines, summary, rows


def churn_section(ours: dict | None, nova: dict | None) -> tuple[list[str], dict]:
    if not ours:
        return ["(churn results missing)"], {}

    def avg(steps, key):
        return sum(s[key] for s in steps) / max(1, len(steps))

    lines = [
        "| engine | accepted | acceptance | pinned: accepted/asked | hugepage: accepted/asked | shared: accepted/asked "
        "| mean pinned threads | mean 2M pages used | rule 1-3 violations |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    out = {}

    def row(label, r, viol):
        bk = r.get("by_kind", {})
        kinds = " | ".join(f"{bk.get(k, [0, 0])[1]}/{bk.get(k, [0, 0])[0]}" for k in ("pinned", "hugepage", "shared"))
        rate = r["accepted"] / max(1, r["arrivals"])
        out[label] = {
            "accepted": r["accepted"],
            "arrivals": r["arrivals"],
            "acceptance": rate,
            "mean_pinned_threads": avg(r["steps"], "pinned_threads"),
            "mean_hugepages_2M": avg(r["steps"], "hugepages_2M"),
            "violations": viol,
        }
        lines.append(
            f"| {label} | {r['accepted']}/{r['arrivals']} | {rate:.1%} | {kinds} | "
            f"{out[label]['mean_pinned_threads']:.1f} | {out[label]['mean_hugepages_2M']:.0f} | {viol} |"
        )

    row("vmhost", ours, f"{ours['violation_count']} (checked on {ours['checked_steps']} steps)")
    for mode, r in (nova or {}).items():
        label = f"Nova ({'dedicated/shared split' if mode == 'split' else 'legacy, no split'})"
        row(label, r, f"rule 2 broken on {r['rule2_violation_steps']} steps" if r["rule2_violation_steps"] else "0")
    return lines, out


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


def plots(rows: list[dict], ours_churn: dict | None, nova_churn: dict | None) -> list[str]:
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
    if ours_churn:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 4))
        series = [("vmhost", ours_churn)] + [(f"Nova {m}", r) for m, r in (nova_churn or {}).items()]
        for label, r in series:
            a1.plot([s["pinned_threads"] for s in r["steps"]], label=label, lw=1)
            a2.plot([s["hugepages_2M"] for s in r["steps"]], label=label, lw=1)
        a1.set_title("churn: pinned threads in use")
        a2.set_title("churn: 2M hugepages in use")
        for a in (a1, a2):
            a.set_xlabel("step")
            a.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "churn.png", dpi=90)
        plt.close(fig)
        made.append("churn.png")
    return made


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=RESULTS / "report.md")
    a = ap.parse_args()
    ours, nova = _load("ours_latency.json"), _load("nova_latency.json")
    oc, nc = _load("ours_churn.json"), _load("nova_churn.json")
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
            f"Worst vmhost p99: {_us(summary['worst_p99_us'])}; shapes over the 1 ms p99 target: "
            f"{summary['shapes_over_1ms_p99']}/{summary['shapes']}; shapes where vmhost's median is slower than Nova's: "
            f"{summary['shapes_slower_than_nova']}/{summary['shapes']}. "
            f"Warm (usage already known, as Nova's host object carries it): worst p99 "
            f"{_us(summary['warm_worst_p99_us'])}, over 1 ms: {summary['warm_shapes_over_1ms_p99']}/{summary['shapes']}, "
            f"slower than Nova: {summary['warm_shapes_slower_than_nova']}/{summary['shapes']}.",
        ]
    else:
        md.append("(latency results missing)")
    md += ["", "### Packing under churn (same seeded workload, same host)", ""]
    lines, churn = churn_section(oc, nc)
    combined["churn"] = churn
    md += lines
    md += ["", "### Compose cost on the real hypervisor (median wall time of whole commands)", ""]
    lines, compose = compose_section(comp)
    combined["compose"] = compose
    md += lines
    md += ["", "### Scaling with VMs defined (libvirt, median wall time)", ""]
    md += scaling_section(scal)
    combined["scaling"] = scal
    try:
        made = plots(rows, oc, nc) if rows else []
        md += ["", "Plots: " + ", ".join(f"bench/results/{m}" for m in made)]
    except Exception as e:  # no plot is no reason to lose the table
        md += ["", f"(plots not made: {e})"]
    text = "\n".join(md) + "\n"
    a.out.write_text(text)
    (RESULTS / "bench.json").write_text(json.dumps(combined, indent=1))
    print(text)


if __name__ == "__main__":
    main()
