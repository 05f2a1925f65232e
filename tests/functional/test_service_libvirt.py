"""The service layer and the `vmhost` command on the real libvirtd: what placement decides really holds.

Collisions, hugepage exhaustion and two processes racing are refused or serialised by vmhost itself
(placement + the host lock), so these go through VmHost and the CLI rather than the provider alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmhost.model import Policy, VmRequest  # noqa: E402
from vmhost.placement import PlacementError  # noqa: E402
from vmhost.providers.registry import ProviderSettings, make_provider  # noqa: E402
from vmhost.service import VmHost  # noqa: E402

URI = "qemu:///system"
VMHOST = [sys.executable, "-m", "vmhost.cli"]


def _conn():
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.skip(f"libvirtd is not reachable at {URI}: {e}")


@pytest.fixture
def host(tmp_path):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine")
    _conn().close()
    vmhost = VmHost(make_provider(ProviderSettings("libvirt", uri=URI)), Policy(), lock_path=str(tmp_path / "lock"))
    made: list[str] = []
    yield vmhost, made
    for name in made:
        with contextlib.suppress(Exception):
            vmhost.decompose(name)
    vmhost.provider.close()


def _name(prefix: str = "ft") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _domains() -> set[str]:
    conn = _conn()
    try:
        return {d.name() for d in conn.listAllDomains()}
    finally:
        conn.close()


def _free_threads(vmhost: VmHost) -> list[int]:
    topo = vmhost.topology()
    pinned = {t for a in vmhost.allocations() for t in (a.pinned or ())}
    return [t for t in topo.threads if t not in pinned]


def test_explicit_pin_colliding_with_another_vm_is_refused_naming_it(host):
    vmhost, made = host
    free = _free_threads(vmhost)
    if not free:
        pytest.skip("every thread on this host is pinned by other VMs")
    thread = free[-1]
    first = vmhost.compose(
        VmRequest.from_dict({"cores": 1, "memory": "64M", "pinned_cores": [thread], "name": _name()})
    )
    made.append(first.name)
    assert first.allocation.pinned == (thread,)
    before = _domains()
    second = _name()
    with pytest.raises(PlacementError) as err:
        vmhost.compose(VmRequest.from_dict({"cores": 1, "memory": "64M", "pinned_cores": [thread], "name": second}))
    assert first.name in str(err.value)
    assert str(thread) in str(err.value)
    assert _domains() == before, "a refused compose must create nothing"


def test_request_beyond_free_hugepages_is_refused_and_creates_nothing(host):
    vmhost, _ = host
    res = vmhost.resources()
    free_2m = sum(n["hugepages"]["2M"]["free"] for n in res["nodes"] if "2M" in n["hugepages"])
    too_much = (free_2m + 1) * 2 * 1024 * 1024
    before = _domains()
    with pytest.raises(PlacementError) as err:
        vmhost.compose(
            VmRequest.from_dict({"cores": 1, "memory": too_much, "hugepages_backed": True, "hugepage_size": "2M"})
        )
    assert "hugepages 2M" in str(err.value)
    assert str(free_2m + 1) in str(err.value)
    assert _domains() == before


def _cli(*args: str, lock: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, VMHOST_LOCK_FILE=str(lock))
    return subprocess.run([*VMHOST, *args], capture_output=True, text=True, env=env, timeout=120)


def test_two_processes_composing_at_once_never_share_threads(host, tmp_path):
    vmhost, made = host
    free = _free_threads(vmhost)
    if len(free) < 2:
        pytest.skip(f"needs 2 unpinned threads, this host has {len(free)} free")
    lock = tmp_path / "race.lock"
    env = dict(os.environ, VMHOST_LOCK_FILE=str(lock))
    names = [_name("race"), _name("race")]
    args = ["compose", "--backend", "libvirt", "--cores", "1", "--memory", "64M", "--pinned-cores", "auto", "--json"]
    procs = [
        subprocess.Popen(
            [*VMHOST, *args, "--hostname", n], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for n in names
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    made.extend(names)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    pinned = [tuple(json.loads(out)["pinned"]) for out, _ in outs]
    assert len(pinned[0]) == len(pinned[1]) == 1
    assert set(pinned[0]).isdisjoint(pinned[1]), f"both processes were given {pinned}"


def test_cli_compose_json_then_decompose(host, tmp_path):
    vmhost, made = host
    if not _free_threads(vmhost):
        pytest.skip("every thread on this host is pinned by other VMs")
    name = _name("cli")
    made.append(name)
    r = _cli(
        "compose", "--backend", "libvirt", "--cores", "1", "--memory", "128M", "--pinned-cores", "auto",
        "--hugepages-backed", "--start", "--json", "--hostname", name, lock=tmp_path / "l",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("name", "vcpus", "pinned", "numa_nodes", "memory", "hugepages", "disks", "nics"):
        assert key in out, key
    assert out["name"] == name and out["vcpus"] == 1 and len(out["pinned"]) == 1
    assert out["hugepages"]["size"] == "2M" and sum(out["hugepages"]["per_node"].values()) == 64
    assert out["state"] == "running"
    listed = json.loads(_cli("list", "--backend", "libvirt", "--json", lock=tmp_path / "l").stdout)
    assert name in {v["name"] for v in listed}
    r = _cli("decompose", "--backend", "libvirt", name, lock=tmp_path / "l")
    assert r.returncode == 0, r.stderr
    assert name not in _domains()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["compose", "--memory", "lots"], "'lots'"),
        (["compose", "--pinned-cores", "3-1"], "'3-1'"),
        (["compose", "--storage", "root:abc"], "'abc'"),
        (["compose", "--interfaces", "eth0:colour=blue"], "'colour'"),
        (["decompose", "no-such-vm-here"], "no-such-vm-here"),
    ],
)
def test_cli_bad_input_is_one_clear_line_and_nonzero(host, tmp_path, args, needle):
    before = _domains()
    r = _cli(*args, "--backend", "libvirt", lock=tmp_path / "l")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmhost: error: "), r.stderr
    assert needle in lines[0]
    assert _domains() == before
