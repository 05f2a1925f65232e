"""How `vmhost resources` and `vmhost list` scale with the number of VMs on a libvirt host.

One VM is composed by vmhost (defined, not started); the others are clones of its domain XML
(name and allocation metadata renamed, seed disk dropped) defined straight through libvirt, so
reaching 200 VMs takes seconds, and to vmhost every clone is a VM of its own making. Medians of
whole CLI runs at 1, 50 and 200 VMs, with `virsh list --all` as the bare-hypervisor reference.
Everything is named bench-s* and removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compose_bench import RESULTS, VIRSH, VMHOST, sh

NS_TAG = "allocation"
COUNTS = (1, 50, 200)


def _clone_xml(xml: str, name: str) -> str:
    root = ET.fromstring(xml)
    root.find("name").text = name
    uuid = root.find("uuid")
    if uuid is not None:
        root.remove(uuid)
    devices = root.find("devices")
    for disk in list(devices.findall("disk")):
        devices.remove(disk)  # the seed volume belongs to the original
    for mac in devices.iter("mac"):
        mac.attrib.pop("address", None)
    meta = root.find("metadata")
    if meta is not None:
        for el in meta:
            if el.tag.endswith("}" + NS_TAG) and el.text:
                alloc = json.loads(el.text)
                alloc["name"] = name
                el.text = json.dumps(alloc, separators=(",", ":"), sort_keys=True)
    return ET.tostring(root, encoding="unicode")


def run(reps: int) -> dict:
    first = "bench-s0"
    conn = libvirt.open("qemu:///system")
    clones: list[str] = []
    out: dict = {"reps": reps, "points": []}
    composed = False
    try:
        sh(
            [
                VMHOST,
                "compose",
                "--backend",
                "libvirt",
                "--cores",
                "1",
                "--memory",
                "64M",
                "--hostname",
                first,
                "--json",
            ]
        )
        composed = True
        xml = conn.lookupByName(first).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        for target in COUNTS:
            while len(clones) + 1 < target:
                name = f"bench-s{len(clones) + 1}"
                conn.defineXML(_clone_xml(xml, name))
                clones.append(name)
            point = {"vms_bench": len(clones) + 1, "vms_total": conn.numOfDefinedDomains() + conn.numOfDomains()}
            for key, cmd in (
                ("vmhost_resources", [VMHOST, "resources", "--backend", "libvirt", "--json"]),
                ("vmhost_list", [VMHOST, "list", "--backend", "libvirt", "--json"]),
                ("virsh_list", [*VIRSH, "list", "--all"]),
            ):
                times = []
                for _ in range(reps):
                    dt, p = sh(cmd, check=False)
                    times.append(dt)
                    if p.returncode:
                        point[key + "_error"] = (p.stderr or p.stdout).strip()[:300]
                    elif key == "vmhost_list":
                        point["vmhost_list_count"] = sum(
                            1 for v in json.loads(p.stdout) if v["name"].startswith("bench-s")
                        )
                point[key] = {"runs": times, "median_s": statistics.median(times)}
            out["points"].append(point)
            print(
                f"  scaling {point['vms_bench']:>4} VMs: resources {point['vmhost_resources']['median_s']:.3f}s "
                f"list {point['vmhost_list']['median_s']:.3f}s virsh list {point['virsh_list']['median_s']:.3f}s",
                file=sys.stderr,
            )
    finally:
        for name in clones:
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).undefine()
        if composed:
            sh([VMHOST, "decompose", "--backend", "libvirt", first], check=False)
        conn.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "scaling.json")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        res = run(a.reps)
    except Exception as e:  # a benchmark reports, it never asserts
        res = {"skipped": f"scaling run failed: {e}"}
        print(f"  scaling: skipped: {res['skipped']}", file=sys.stderr)
    a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
