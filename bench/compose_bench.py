"""Compose cost on the real hypervisor: the `vmhost` CLI against the bare hypervisor tools, same VM.

libvirt: `vmhost compose --start` (a pinned, 2M-hugepage 1-vCPU VM) vs `virsh define` + `virsh start`
of the very XML vmhost produced (dumped once, renamed, its cloud-init seed cloned), and
`vmhost decompose` vs `virsh destroy` + `virsh undefine`. LXD: `vmhost compose --backend lxd`
vs `lxc init --empty --vm` with the same config keys, `vmhost decompose` vs `lxc delete`
(LXD VMs cannot start on this machine, so the LXD pair is create/delete only).

Each figure is the median wall time of whole commands (process start included, as an operator
pays it) over several runs; runs alternate vmhost and raw so drift hits both. Every object is
named bench-* and removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VMHOST = str(Path(sys.executable).with_name("vmhost"))
VIRSH = ["virsh", "-q", "-c", "qemu:///system"]
POOL = "default"
LXD_PROJECT = "vmhost"


def sh(cmd: list[str], check: bool = True, stdin: str | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, input=stdin)
    dt = time.perf_counter() - t0
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {p.stderr.strip() or p.stdout.strip()}")
    return dt, p


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# ---------------------------------------------------------------------------------------------- libvirt


def _raw_xml(src: str, name: str, seed_vol: str | None) -> str:
    """The inactive XML vmhost made for `src`, renamed to `name` (no uuid, seed volume swapped)."""
    _, p = sh([*VIRSH, "dumpxml", "--inactive", src])
    root = ET.fromstring(p.stdout)
    root.find("name").text = name
    uuid = root.find("uuid")
    if uuid is not None:
        root.remove(uuid)
    for src_el in root.iter("source"):
        if src_el.get("volume") and seed_vol:
            src_el.set("volume", seed_vol)
    return ET.tostring(root, encoding="unicode")


def _libvirt_cleanup(names: list[str], vols: list[str]) -> None:
    for n in names:
        sh([*VIRSH, "destroy", n], check=False)
        sh([*VIRSH, "undefine", n], check=False)
    for v in vols:
        sh([*VIRSH, "vol-delete", "--pool", POOL, v], check=False)


def libvirt_pair(runs: int) -> dict:
    compose = [
        *[VMHOST, "compose", "--backend", "libvirt", "--cores", "1", "--memory", "128M"],
        *["--pinned-cores", "auto", "--hugepages-backed", "--start", "--json"],
    ]
    probe, seed, raw_name = "bench-cprobe", "bench-raw-cidata", "bench-craw"
    made: list[str] = [probe]
    out: dict[str, list[float]] = {
        k: [] for k in ("vmhost_compose", "raw_define_start", "vmhost_decompose", "raw_destroy_undefine")
    }
    try:
        sh([*compose, "--hostname", probe])
        sh([*VIRSH, "vol-clone", "--pool", POOL, f"vmhost-{probe}-cidata", seed], check=False)
        xml = _raw_xml(probe, raw_name, seed)
        sh([VMHOST, "decompose", "--backend", "libvirt", probe])
        made.remove(probe)
        xml_path = RESULTS / "bench-raw.xml"
        xml_path.write_text(xml)
        for i in range(runs):
            name = f"bench-c{i}"
            made.append(name)
            dt, _ = sh([*compose, "--hostname", name])
            out["vmhost_compose"].append(dt)
            dt, _ = sh([VMHOST, "decompose", "--backend", "libvirt", name])
            out["vmhost_decompose"].append(dt)
            made.remove(name)
            made.append(raw_name)
            d1, _ = sh([*VIRSH, "define", str(xml_path)])
            d2, _ = sh([*VIRSH, "start", raw_name])
            out["raw_define_start"].append(d1 + d2)
            d1, _ = sh([*VIRSH, "destroy", raw_name])
            d2, _ = sh([*VIRSH, "undefine", raw_name])
            out["raw_destroy_undefine"].append(d1 + d2)
            made.remove(raw_name)
    finally:
        _libvirt_cleanup(made, [seed])
        (RESULTS / "bench-raw.xml").unlink(missing_ok=True)
    return {k: {"runs": v, "median_s": med(v)} for k, v in out.items()}


# ---------------------------------------------------------------------------------------------- LXD


def _lxc(*args: str) -> list[str]:
    return ["lxc", *args, "--project", LXD_PROJECT]


def lxd_available() -> str | None:
    """None when a usable LXD daemon answers, else why not."""
    if not shutil.which("lxc"):
        return "no lxc client on PATH"
    try:
        p = subprocess.run(["lxc", "query", "/1.0"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "the LXD daemon does not answer (lxc query timed out)"
    if p.returncode:
        return f"no LXD daemon: {p.stderr.strip() or 'lxc query failed'} (start one with scripts/lxd-test-daemon.sh)"
    return None


def lxd_pair(runs: int) -> dict:
    compose = [VMHOST, "compose", "--backend", "lxd", "--cores", "1", "--memory", "128M", "--json"]
    probe, raw_name = "bench-lprobe", "bench-lraw"
    made = [probe]
    out: dict[str, list[float]] = {k: [] for k in ("vmhost_compose", "raw_init", "vmhost_decompose", "raw_delete")}
    try:
        sh([*compose, "--hostname", probe])
        _, p = sh(["lxc", "query", f"/1.0/instances/{probe}?project={LXD_PROJECT}"])
        cfg = {k: v for k, v in json.loads(p.stdout)["config"].items() if not k.startswith("volatile.")}
        sh([VMHOST, "decompose", "--backend", "lxd", probe])
        made.remove(probe)
        raw = _lxc("init", "--empty", "--vm", raw_name)
        for k, v in sorted(cfg.items()):
            raw += ["-c", f"{k}={v}"]
        for i in range(runs):
            name = f"bench-l{i}"
            made.append(name)
            dt, _ = sh([*compose, "--hostname", name])
            out["vmhost_compose"].append(dt)
            dt, _ = sh([VMHOST, "decompose", "--backend", "lxd", name])
            out["vmhost_decompose"].append(dt)
            made.remove(name)
            made.append(raw_name)
            dt, _ = sh(raw)
            out["raw_init"].append(dt)
            dt, _ = sh(_lxc("delete", "--force", raw_name))
            out["raw_delete"].append(dt)
            made.remove(raw_name)
    finally:
        for n in made:
            sh(_lxc("delete", "--force", n), check=False)
    return {k: {"runs": v, "median_s": med(v)} for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "compose.json")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    res: dict = {"runs": a.runs}
    # What any vmhost command pays before it does anything: interpreter start and imports.
    res["vmhost_startup_s"] = med([sh([VMHOST, "--help"])[0] for _ in range(a.runs)])
    try:
        res["libvirt"] = libvirt_pair(a.runs)
    except Exception as e:  # a benchmark reports, it never asserts
        res["libvirt"] = {"skipped": f"libvirt compose pair failed: {e}"}
    why = lxd_available()
    if why:
        res["lxd"] = {"skipped": why}
    else:
        try:
            res["lxd"] = lxd_pair(a.runs)
        except Exception as e:
            res["lxd"] = {"skipped": f"LXD compose pair failed: {e}"}
    for k in ("libvirt", "lxd"):
        if "skipped" in res[k]:
            print(f"  compose {k}: skipped: {res[k]['skipped']}", file=sys.stderr)
        else:
            print(
                f"  compose {k}: " + ", ".join(f"{n} {v['median_s']:.3f}s" for n, v in res[k].items()), file=sys.stderr
            )
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
