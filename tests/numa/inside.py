"""What the nested host's own kernel says about a domain: read inside the guest, over ssh.

The facts come from the guest's kernel and libvirt, never from vm-host: `virsh vcpuinfo` affinity,
every QEMU thread's Cpus_allowed_list and Mems_allowed_list, the hugepages per node in numa_maps,
and each node's free_hugepages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass

from tests.numa.guest import Guest

# Runs in the guest (python3 is in its image); prints one JSON object.
_PROBE = r"""
import glob, json, re, subprocess, sys
name = sys.argv[1] if len(sys.argv) > 1 else ""
out = {"nodes": {}, "free": {}, "total": {}}
for d in sorted(glob.glob("/sys/devices/system/node/node[0-9]*")):
    n = int(d.rsplit("node", 1)[1])
    out["nodes"][n] = open(d + "/cpulist").read().strip()
    hp = d + "/hugepages/hugepages-2048kB/"
    out["free"][n] = int(open(hp + "free_hugepages").read())
    out["total"][n] = int(open(hp + "nr_hugepages").read())
if name:
    vi = subprocess.run(["virsh", "vcpuinfo", name], capture_output=True, text=True, check=True).stdout
    out["vcpu_affinity"] = [
        [i for i, c in enumerate(m) if c == "y"] for m in re.findall(r"CPU Affinity:\s+(\S+)", vi)
    ]
    out["vcpu_on"] = [int(c) for c in re.findall(r"^CPU:\s+(\d+)", vi, re.M)]
    pid = open(f"/run/libvirt/qemu/{name}.pid").read().strip()
    threads = []
    for st in glob.glob(f"/proc/{pid}/task/*/status"):
        f = dict(l.split(":", 1) for l in open(st).read().splitlines() if ":" in l)
        threads.append({"name": f["Name"].strip(), "cpus": f["Cpus_allowed_list"].strip(),
                        "mems": f["Mems_allowed_list"].strip()})
    out["threads"] = threads
    huge, policies = {}, set()
    for line in open(f"/proc/{pid}/numa_maps"):
        if " huge " not in line and not line.rstrip().endswith(" huge"):
            continue
        policies.add(line.split()[1])
        for n, c in re.findall(r"\bN(\d+)=(\d+)", line):
            huge[int(n)] = huge.get(int(n), 0) + int(c)
    out["huge"] = huge
    out["policies"] = sorted(policies)
    out["xml"] = subprocess.run(["virsh", "dumpxml", name], capture_output=True, text=True, check=True).stdout
print(json.dumps(out))
"""


def cpuset(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


@dataclass
class Inside:
    node_cpus: dict[int, set[int]]
    free: dict[int, int]
    total: dict[int, int]
    vcpu_affinity: list[set[int]]
    threads: list[dict]
    huge: dict[int, int]
    policies: list[str]
    xml: str

    def thread_cpus(self) -> set[int]:
        return set().union(*(cpuset(t["cpus"]) for t in self.threads))

    def thread_mems(self) -> set[int]:
        return set().union(*(cpuset(t["mems"]) for t in self.threads))


def probe(guest: Guest, name: str = "") -> Inside:
    r = guest.run_input(f"python3 - {name}", _PROBE)
    d = json.loads(r)
    return Inside(
        node_cpus={int(k): cpuset(v) for k, v in d["nodes"].items()},
        free={int(k): v for k, v in d["free"].items()},
        total={int(k): v for k, v in d["total"].items()},
        vcpu_affinity=[set(a) for a in d.get("vcpu_affinity", [])],
        threads=d.get("threads", []),
        huge={int(k): v for k, v in d.get("huge", {}).items()},
        policies=d.get("policies", []),
        xml=d.get("xml", ""),
    )


# The guest's pool holds a few GB: VMs here take a 64M root disk, not MAAS's default 8 GB one (issue 16).
SMALL_ROOT = "root:64M"


def vmhost(guest: Guest, *args: str, timeout: float = 300) -> tuple[int, dict | list | None, str]:
    """`vmhost ARGS --uri <the guest> --json` from outside the guest: (exit code, JSON or None, stderr)."""
    cmd = [sys.executable, "-m", "vmhost.cli", *args, "--backend", "libvirt", "--uri", guest.uri, "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    data = json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None
    return r.returncode, data, r.stderr.strip()
