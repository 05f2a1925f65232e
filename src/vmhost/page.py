"""The live host page of `vmhost serve`: one card per NUMA node, as MAAS showed VM hosts.

Rendered on the server from the same resources dict as `vmhost resources --json`, so it reads
complete with JavaScript off; a small inline script swaps in a fresh copy every few seconds. Every
string that came from the hypervisor (VM, pool and NIC names) is HTML-escaped. Each bar carries its
numbers as data-* attributes, which is what the browser test reads back.
"""

from __future__ import annotations

import time
from html import escape

from vmhost.model import HUGEPAGE_SIZES
from vmhost.parse import format_cpuset
from vmhost.resources_view import _gib, summary_line

REFRESH_SECONDS = 5

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f4f4;color:#111}
header{background:#262626;color:#fff;padding:12px 20px}header h1{font-size:18px;margin:0}
header p{margin:4px 0 0;color:#ccc}main{display:flex;flex-wrap:wrap;gap:16px;padding:16px}
.card{background:#fff;border:1px solid #d9d9d9;border-radius:4px;padding:12px 16px;width:420px}
.card h2{font-size:16px;margin:0 0 8px}.row{margin:8px 0}.label{display:flex;justify-content:space-between;font-size:12px}
.bar{display:flex;height:14px;background:#e5e5e5;border-radius:2px;overflow:hidden}
.seg{height:100%}.pinned{background:#e95420}.reserved{background:#777}.used{background:#772953}
.bound{background:#0e8420}.committed{background:#f99b11}.free{background:#e5e5e5}
.legend span{display:inline-block;margin-right:10px;font-size:11px}.legend i{display:inline-block;width:9px;height:9px;margin-right:3px}
ul.vms{list-style:none;padding:0;margin:6px 0 0}ul.vms li{border-top:1px solid #eee;padding:3px 0;font-size:13px}
.foreign{background:#c7162b;color:#fff;border-radius:2px;padding:0 4px;font-size:11px;margin-left:4px}
.phase{background:#f99b11;border-radius:2px;padding:0 4px;font-size:11px;margin-left:4px}
.warn{color:#c7162b;font-size:12px;margin:4px 0}.error{background:#c7162b;color:#fff;padding:12px 20px}.muted{color:#666}
"""

_SCRIPT = (
    "(function(){function tick(){fetch(location.pathname,{cache:'no-store'}).then(function(r){"
    "return r.ok?r.text():null}).then(function(t){if(!t)return;var d=new DOMParser().parseFromString(t,'text/html');"
    "['top','host'].forEach(function(id){var n=d.getElementById(id),o=document.getElementById(id);"
    "if(n&&o)o.replaceWith(n)})}).catch(function(){})}"
    f"setInterval(tick,{REFRESH_SECONDS * 1000})}})();"
)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}" if whole > 0 else "0"


def _num(x: float) -> str:
    """Exact in data-* attributes (`:g` would round 500000000000 to 5e+11)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def bar(kind: str, label: str, parts: list[tuple[str, str, float]], total: float, text: str) -> str:
    """A labelled bar: `parts` are (css class, name, amount) segments out of `total`; data-* carry the numbers."""
    data = " ".join(f'data-{escape(name)}="{_num(amount)}"' for _, name, amount in parts)
    segs = "".join(
        f'<div class="seg {cls}" style="width:{_pct(amount, total)}%" title="{escape(name)}: {_num(amount)}"></div>'
        for cls, name, amount in parts
        if amount > 0
    )
    return (
        f'<div class="row"><div class="label"><span>{escape(label)}</span><span>{escape(text)}</span></div>'
        f'<div class="bar" data-kind="{escape(kind)}" data-total="{_num(total)}" {data}>{segs}</div></div>'
    )


def _legend(*items: tuple[str, str]) -> str:
    return '<div class="legend">' + "".join(f'<span><i class="{c}"></i>{escape(t)}</span>' for c, t in items) + "</div>"


def _vm_item(vm: dict) -> str:
    where = f"pinned {format_cpuset(vm['pinned'])}" if vm.get("pinned") else "floating"
    hp = vm.get("hugepages")
    pages = f", {sum(hp['per_node'].values())}\u00d7{escape(hp['size'])} pages" if hp else ""
    badges = "" if vm.get("managed", True) else '<span class="foreign" title="not made by vm-host">foreign</span>'
    if vm.get("phase", "ready") != "ready":
        badges += f'<span class="phase">{escape(vm["phase"])}</span>'
    return (
        f'<li data-vm="{escape(vm["name"])}" data-pinned="{escape(format_cpuset(vm.get("pinned") or ()))}">'
        f"<b>{escape(vm['name'])}</b>{badges} <span class=muted>{escape(vm.get('state', '?'))}</span> "
        f"{vm['vcpus']} vCPU {escape(where)}, {_gib(vm['memory'])} GiB{pages}</li>"
    )


def node_card(node: dict, vms: dict[str, dict], nics: list[dict], shared: list[dict] = ()) -> str:
    t, m = node["threads"], node["memory"]
    out = [f'<section class="card node" data-node="{node["id"]}"><h2>NUMA node {node["id"]}</h2>']
    out.append(
        bar(
            "threads",
            "threads",
            [("pinned", "pinned", t["pinned"]), ("reserved", "reserved", t["reserved"]), ("free", "free", t["free"])],
            t["total"],
            f"{t['pinned']} pinned, {t['reserved']} reserved, {t['free']} free of {t['total']}",
        )
    )
    out.append(_legend(("pinned", "pinned"), ("reserved", "reserved"), ("free", "free: floating vCPUs run here")))
    cap = m["general_capacity"]
    out.append(
        bar(
            "memory",
            "general memory",
            [("bound", "committed", m["bound"]), ("free", "free", max(0, cap - m["bound"]))],
            max(cap, m["bound"]),
            f"{_gib(m['bound'])} of {_gib(cap)} GiB committed",
        )
    )
    for size, hp in node["hugepages"].items():
        if not hp["total"] and not hp["used"]:
            continue
        out.append(
            bar(
                f"hugepages-{size}",
                f"hugepages {size}",
                [("used", "used", hp["used"]), ("free", "free", hp["free"])],
                max(hp["total"], hp["used"]),
                f"{hp['used']} of {hp['total']} used ({_gib(hp['total'] * HUGEPAGE_SIZES[size])} GiB)",
            )
        )
    for nic in nics:
        if nic["sriov_max_vfs"] and nic["numa_node"] == node["id"]:
            out.append(_vf_bar(nic))
    for s in shared:
        if str(s["thread"]) in node.get("pinned", {}):
            out.append(
                f'<p class="warn" data-shared-thread="{s["thread"]}">pinned thread {s["thread"]} of '
                f"{escape(s['pinned_by'])} is shared with {escape(', '.join(s['shared_with']))}</p>"
            )
    names = node.get("vms") or []
    items = "".join(_vm_item(vms[n]) for n in names if n in vms)
    out.append(f'<ul class="vms">{items}</ul>' if items else '<p class="muted">no VMs on this node</p>')
    out.append("</section>")
    return "".join(out)


def _vf_bar(nic: dict) -> str:
    return bar(
        f"vfs-{nic['name']}",
        f"SR-IOV VFs {nic['name']}",
        [("used", "used", nic["vfs_used"]), ("free", "free", max(0, nic["sriov_max_vfs"] - nic["vfs_used"]))],
        nic["sriov_max_vfs"],
        f"{nic['vfs_used']} of {nic['sriov_max_vfs']} used",
    )


def host_card(res: dict) -> str:
    sv, mem = res["shared_vcpus"], res["memory"]
    out = ['<section class="card host"><h2>Host</h2>']
    out.append(
        bar(
            "floating-vcpus",
            "floating vCPUs",
            [("used", "used", sv["used"]), ("free", "free", max(0, sv["capacity"] - sv["used"]))],
            max(sv["capacity"], sv["used"]),
            f"{sv['used']} of {sv['capacity']} (cpu overcommit {res['policy']['cpu_overcommit_ratio']:g})",
        )
    )
    out.append(
        bar(
            "general-memory",
            "general memory",
            [("bound", "committed", mem["used"]), ("free", "free", max(0, mem["capacity"] - mem["used"]))],
            max(mem["capacity"], mem["used"]),
            f"{_gib(mem['used'])} of {_gib(mem['capacity'])} GiB "
            f"(memory overcommit {res['policy']['memory_overcommit_ratio']:g})",
        )
    )
    for p in res["storage_pools"]:
        out.append(
            bar(
                f"pool-{p['name']}",
                f"pool {p['name']} ({p['driver']})",
                [("used", "used", p["used"]), ("free", "free", max(0, p["total"] - p["used"]))],
                max(p["total"], p["used"]),
                f"{_gib(p['used'])} of {_gib(p['total'])} GiB used, {_gib(p['committed'])} GiB committed to VMs",
            )
        )
    for nic in res["nics"]:
        if nic["sriov_max_vfs"] and nic["numa_node"] is None:
            out.append(_vf_bar(nic))
    floating = [v for v in res["vms"] if not v.get("numa_nodes")]
    if floating:
        out.append('<ul class="vms">' + "".join(_vm_item(v) for v in floating) + "</ul>")
    out.append("</section>")
    return "".join(out)


def render_page(snap) -> str:
    """The whole page for one `exporter.Snapshot`: cards when the hypervisor answered, its error when not."""
    res = snap.resources
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(snap.taken_at))
    if res is None:
        title = "vm-host"
        top = f'<header id="top"><h1>vm-host</h1><p>read at {when}</p></header>'
        body = (
            f'<main id="host"><div class="error">the hypervisor did not answer: {escape(snap.error or "")}</div></main>'
        )
    else:
        title = f"vm-host: {res['backend']}"
        top = (
            f'<header id="top"><h1>{escape(summary_line(res))}</h1>'
            f"<p>read at {when} in {snap.duration:.2f} s; refreshes every {REFRESH_SECONDS} s</p></header>"
        )
        vms = {v["name"]: v for v in res["vms"]}
        shared = res.get("shared_pinned_threads") or []
        cards = [node_card(n, vms, res["nics"], shared) for n in res["nodes"]]
        body = f'<main id="host">{"".join(cards)}{host_card(res)}</main>'
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_STYLE}</style></head>'
        f"<body>{top}<noscript><p class=muted style='padding:0 20px'>JavaScript is off: reload to update.</p>"
        f"</noscript>{body}<script>{_SCRIPT}</script></body></html>"
    )
