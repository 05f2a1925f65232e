"""Racing processes on the real libvirtd: no thread is ever pinned twice, no hugepage ever overcommitted.

Three processes each run 15 compose/start/decompose cycles of tiny VMs (pinned auto with hugepages,
pinned auto, floating) while this process samples libvirt from outside: every running domain's live vCPU
and emulator affinity (what `virsh vcpupin` / `virsh emulatorpin` show) and /proc/meminfo. Placement
refusals (no thread left) are expected on this 2-thread host; any other failure fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from vmhost.providers.libvirt import LibvirtProvider
from vmhost.providers.libvirt_xml import read_record

pytestmark = pytest.mark.libvirt

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 3
CYCLES = 15
PAGES = 32  # 2M pages (64 MiB) for the hugepage kind

WORKER = """
import json, sys
from vmhost.model import Policy, VmRequest
from vmhost.placement import PlacementError
from vmhost.providers.registry import ProviderSettings, make_provider
from vmhost.service import VmHost
prefix, cycles, lock = sys.argv[1], int(sys.argv[2]), sys.argv[3]
host = VmHost(make_provider(ProviderSettings("libvirt")), Policy(cpu_overcommit_ratio=8.0), lock_path=lock)
kinds = [
    {"pinned_cores": "auto", "hugepages_backed": True, "hugepage_size": "2M"},
    {"pinned_cores": "auto"},
    {},
]
done = refused = 0
errors = []
for i in range(cycles):
    name = f"{prefix}-{i}"
    try:
        host.compose(VmRequest.from_dict({"cores": 1, "memory": "64M", "name": name, **kinds[i % 3]}), start=True)
    except PlacementError:
        refused += 1
        continue
    except Exception as e:
        errors.append(f"compose {name}: {e}")
        continue
    try:
        host.decompose(name)
        done += 1
    except Exception as e:
        errors.append(f"decompose {name}: {e}")
print(json.dumps({"done": done, "refused": refused, "errors": errors}))
"""


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key.startswith("HugePages_"):
            out[key] = int(rest.split()[0])
    return out


def _sample(conn) -> tuple[list[str], int]:
    """(violations, hugepages committed to defined vm-host domains) at one moment.

    A violation: a thread that a running vm-host VM pins is in the live affinity of another running domain,
    counted only when the pinning VM is still running after the other was read (so it was running then).
    """
    import libvirt

    pinned: dict[int, str] = {}
    committed = 0
    affinity: dict[str, set[int]] = {}
    for dom in conn.listAllDomains(0):
        try:
            rec = read_record(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            if rec is not None and rec.allocation.hugepages:
                committed += sum(rec.allocation.hugepages.per_node.values())
            if not dom.isActive():
                continue
            maps = [
                *dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE),
                dom.emulatorPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE),
            ]
            affinity[dom.name()] = {i for m in maps for i, on in enumerate(m) if on}
            if rec is not None and rec.allocation.pinned:
                for t in rec.allocation.pinned:
                    pinned.setdefault(t, dom.name())
                    if pinned[t] != dom.name():
                        return [f"thread {t} pinned by both {pinned[t]} and {dom.name()}"], committed
        except libvirt.libvirtError:
            continue  # went away while being read
    violations = []
    for t, owner in pinned.items():
        others = [n for n, threads in affinity.items() if n != owner and t in threads]
        if not others:
            continue
        try:
            still = conn.lookupByName(owner).isActive()
        except libvirt.libvirtError:
            still = False
        if still:
            violations.append(f"thread {t} of {owner} also in the affinity of {', '.join(others)}")
    return violations, committed


def test_three_processes_composing_at_once_never_share_a_pinned_thread_or_overcommit_hugepages(
    libvirt_uri, libvirt_conn, tmp_path
):
    before = _meminfo()
    if before["HugePages_Free"] < PAGES:
        pytest.skip(f"needs {PAGES} free 2M hugepages, the host has {before['HugePages_Free']}")
    run = uuid.uuid4().hex[:6]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, f"race{run}{p}", str(CYCLES), str(tmp_path / "lock")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(PROCESSES)
    ]
    samples, violations, peak, lowest_free = 0, [], 0, before["HugePages_Free"]
    deadline = time.monotonic() + 150
    try:
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            found, committed = _sample(libvirt_conn)
            mem = _meminfo()
            samples += 1
            violations += found
            peak = max(peak, committed)
            lowest_free = min(lowest_free, mem["HugePages_Free"])
            if committed > mem["HugePages_Total"]:
                violations.append(f"{committed} hugepages committed, the host has {mem['HugePages_Total']}")
            time.sleep(0.05)  # two cores: leave the workers most of them
    finally:
        results = []
        for w in workers:
            try:
                out, err = w.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                out, err = w.communicate()
            results.append((w.returncode, out, err))
        provider = LibvirtProvider(uri=libvirt_uri)
        for dom in libvirt_conn.listAllDomains(0):
            if dom.name().startswith(f"race{run}"):
                with contextlib.suppress(Exception):
                    provider.decompose(dom.name())
        provider.close()
    for rc, _out, err in results:
        assert rc == 0, f"a worker failed: {err[-800:]}"
    counts = [json.loads(out.strip().splitlines()[-1]) for _rc, out, _err in results]
    errors = [e for c in counts for e in c["errors"]]
    done = sum(c["done"] for c in counts)
    refused = sum(c["refused"] for c in counts)
    print(
        f"race: {PROCESSES}x{CYCLES} cycles, {done} composed+decomposed, {refused} refused by placement, "
        f"{samples} samples, {len(violations)} double-pinned/overcommit, peak {peak} pages committed, "
        f"lowest HugePages_Free {lowest_free}"
    )
    assert errors == []
    assert violations == []
    assert samples >= 10 and done >= CYCLES  # it really ran, concurrently with the sampling
    assert lowest_free >= 0 and _meminfo()["HugePages_Free"] == before["HugePages_Free"]
    assert not [d.name() for d in libvirt_conn.listAllDomains(0) if d.name().startswith(f"race{run}")]
