"""The fault tier: a process killed at each step of compose and decompose, on the real daemons, then gc.

The test-only fault point (VMHOST_TEST_FAULT=kill-at:<step>, vmhost.providers.base.fault_point) makes a
child process exit on the spot at the named step, as `kill -9` would: no undo runs, no lock is released
politely. Each test then runs gc and asserts what the issue asks: zero leftover objects, hugepages back to
the starting count, and floating confinement equal to a fresh computation. A child that did not die at its
step (exit status other than FAULT_EXIT) fails the test, so a renamed or skipped step cannot pass unnoticed.
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

from tests.functional.test_lxd import instance_names, lxd_daemon, project, volume_names  # noqa: F401
from vmhost.model import CloudInit, Policy, VmRequest
from vmhost.placement import PlacementError
from vmhost.providers.base import FAULT_ENV, FAULT_EXIT
from vmhost.providers.registry import ProviderSettings, make_provider
from vmhost.service import VmHost

ROOT = Path(__file__).resolve().parents[2]
POLICY = {"cpu_overcommit_ratio": 8.0}  # other helpers' floating VMs share this small host

# What the child runs: compose or decompose one VM through the service layer, as the CLI and charm do.
CHILD = """
import json, sys
from vmhost.model import CloudInit, Policy, VmRequest
from vmhost.providers.registry import ProviderSettings, make_provider
from vmhost.service import VmHost
spec = json.loads(sys.argv[1])
provider = make_provider(ProviderSettings(spec["backend"], spec["uri"], options=spec["options"]))
host = VmHost(provider, Policy(**spec["policy"]), lock_path=spec["lock"])
if spec["action"] == "compose":
    ci = CloudInit(hostname=spec["request"]["name"]) if spec["seed"] else None
    host.compose(VmRequest.from_dict(spec["request"]), start=spec["start"], cloud_init=ci)
else:
    host.decompose(spec["request"]["name"])
"""


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _kill_at(step: str, spec: dict) -> None:
    """Run the child with the fault point at `step`; it must die exactly there."""
    env = {**os.environ, FAULT_ENV: f"kill-at:{step}", "PYTHONPATH": str(ROOT / "src")}
    env.pop("JUJU_UNIT_NAME", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == FAULT_EXIT, f"child did not die at step {step!r}: rc={out.returncode} {out.stderr[-800:]}"


# ---------------------------------------------------------------------------------------------
# libvirt (real libvirtd)

LIBVIRT_COMPOSE_STEPS = [
    "provider compose",  # floating VMs already confined away from the new VM's thread
    "resolve SR-IOV VFs",
    "define domain",
    "create volume root in pool default",
    "create cloud-init seed",
    "start domain",
    "mark ready",
]
LIBVIRT_DECOMPOSE_STEPS = [
    "mark decomposing",
    "destroy domain",
    "delete volume vmhost-*-root",
    "delete volume vmhost-*-cidata",
    "undefine domain",
    "widen floating VMs",  # the VM is gone, floating VMs still kept off its thread
]


@pytest.fixture
def libvirt_host(libvirt_uri, vm_names, tmp_path):
    """A VmHost on the real libvirtd with one floating VM of ours, whose confinement the tests check."""
    if _meminfo("HugePages_Total") < 64:
        pytest.skip("needs 64 2M hugepages; run scripts/host-setup.sh")
    host = VmHost(
        make_provider(ProviderSettings("libvirt", uri=libvirt_uri)), Policy(**POLICY), lock_path=str(tmp_path / "lock")
    )
    floating = host.compose(VmRequest.from_dict({"cores": 1, "memory": "64M", "name": vm_names("ffl")}))
    yield host, floating.name
    with contextlib.suppress(Exception):
        host.decompose(floating.name)
    host.provider.close()


def _libvirt_spec(host: VmHost, name: str, action: str) -> dict:
    return {
        "backend": "libvirt",
        "uri": host.provider.uri,
        "options": {},
        "policy": POLICY,
        "lock": host.lock_path,
        "action": action,
        "seed": True,
        "start": True,
        "request": {
            "cores": 1,
            "memory": "64M",
            "pinned_cores": "auto",
            "hugepages_backed": True,
            "hugepage_size": "2M",
            "storage": "root:64M",
            "name": name,
        },
    }


def _libvirt_leftovers(conn, name: str) -> list[str]:
    import libvirt

    left = [d.name() for d in conn.listAllDomains(0) if d.name() == name]
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        left += [f"{pool.name()}/{v.name()}" for v in pool.listAllVolumes(0) if v.name().startswith(f"vmhost-{name}-")]
    return left


def _config_affinity(conn, name: str) -> tuple[set[int], ...]:
    """Per vCPU and emulator, the threads the floating VM's definition allows (what its next start applies)."""
    import libvirt

    dom = conn.lookupByName(name)
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG
    maps = [*dom.vcpuPinInfo(flags), dom.emulatorPinInfo(flags)]
    return tuple({i for i, on in enumerate(m) if on} for m in maps)


def _assert_clean_after_gc(host: VmHost, conn, name: str, floating: str, free_before: int) -> list[str]:
    removed = host.gc()
    assert _libvirt_leftovers(conn, name) == []
    assert _meminfo("HugePages_Free") == free_before
    fresh = set(host.shared_threads())
    assert all(a == fresh for a in _config_affinity(conn, floating)), (_config_affinity(conn, floating), fresh)
    return removed


def _free_before(host: VmHost) -> int:
    free = _meminfo("HugePages_Free")
    if free < 32:
        pytest.skip(f"needs 32 free 2M hugepages, the host has {free}")
    try:
        host.plan(VmRequest.from_dict(_libvirt_spec(host, "probe", "compose")["request"]))
    except PlacementError as e:
        pytest.skip(f"no room for a pinned hugepage VM now: {e}")
    return free


@pytest.mark.libvirt
@pytest.mark.parametrize(
    ("action", "step"),
    [("compose", s) for s in LIBVIRT_COMPOSE_STEPS] + [("decompose", s) for s in LIBVIRT_DECOMPOSE_STEPS],
)
def test_libvirt_killed_at_each_step_leaves_nothing_after_gc(libvirt_host, libvirt_conn, vm_names, action, step):
    host, floating = libvirt_host
    free_before = _free_before(host)
    name = vm_names("fk")
    spec = _libvirt_spec(host, name, action)
    if action == "decompose":
        host.compose(VmRequest.from_dict(spec["request"]), start=True, cloud_init=CloudInit(hostname=name))
        assert _meminfo("HugePages_Free") == free_before - 32
    _kill_at(step, spec)
    if step == LIBVIRT_DECOMPOSE_STEPS[0]:
        # Killed before its first change: the VM is whole and still vm-host's, so gc keeps it.
        assert host.gc() == [] and host.find(name).managed and host.find(name).state == "running"
        host.decompose(name)
    removed = _assert_clean_after_gc(host, libvirt_conn, name, floating, free_before)
    if step in ("create volume root in pool default", "start domain", "mark ready"):
        assert name in removed  # the unfinished domain was there, and gc says it removed it


@contextlib.contextmanager
def _busy(conn, pool_name: str):
    """The pool has an asynchronous job running (a 600 MiB volume clone) for the duration of the block."""
    import threading

    import libvirt

    tag = uuid.uuid4().hex[:6]
    pool = conn.storagePoolLookupByName(pool_name)
    size = 600 * 2**20
    src = pool.createXML(
        f"<volume><name>ft-src-{tag}</name><capacity unit='bytes'>{size}</capacity>"
        f"<allocation unit='bytes'>{size}</allocation><target><format type='raw'/></target></volume>",
        0,
    )
    clone_xml = (
        f"<volume><name>ft-clone-{tag}</name><capacity unit='bytes'>{size}</capacity>"
        "<target><format type='raw'/></target></volume>"
    )

    def clone() -> None:
        c = libvirt.open(conn.getURI())
        c.storagePoolLookupByName(pool_name).createXMLFrom(clone_xml, c.storageVolLookupByPath(src.path()), 0)
        c.close()

    t = threading.Thread(target=clone)
    t.start()
    try:
        for _ in range(50):
            try:
                pool.refresh(0)
            except libvirt.libvirtError as e:
                if "asynchronous jobs running" in str(e):
                    break
                raise
        else:
            pytest.fail(f"could not make pool {pool_name} busy")
        yield
    finally:
        t.join()
        for n in (f"ft-src-{tag}", f"ft-clone-{tag}"):
            with contextlib.suppress(libvirt.libvirtError):
                pool.storageVolLookupByName(n).delete(0)


@pytest.mark.libvirt
def test_gc_goes_on_past_a_busy_pool_and_past_a_failure(libvirt_host, libvirt_conn, vm_names, tmp_path):
    """The default pool has asynchronous jobs running and another pool is stopped: gc still removes the
    unfinished VM in the busy pool, logs and keeps the one whose volume it cannot reach, and removes that
    one on a later run once its pool is back."""
    import libvirt

    host, _floating = libvirt_host
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    pool_dir.chmod(0o755)
    name = f"ft-pool-{uuid.uuid4().hex[:6]}"
    pool = libvirt_conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{pool_dir}</path></target></pool>", 0
    )
    pool.create(0)
    try:
        stuck, other = vm_names("fk"), vm_names("fk")
        for vm, storage in ((stuck, f"root:64M({name})"), (other, "root:64M")):
            spec = _libvirt_spec(host, vm, "compose")
            spec["request"].update(pinned_cores=None, hugepages_backed=False, hugepage_size=None, storage=storage)
            spec["seed"] = spec["start"] = False
            _kill_at("mark ready", spec)
        pool.destroy()  # stopped: its volumes cannot be looked up, let alone deleted
        with _busy(libvirt_conn, "default"):
            removed = host.gc()
        assert removed == [other, f"default/vmhost-{other}-root"]
        assert _libvirt_leftovers(libvirt_conn, other) == []
        assert stuck in {d.name() for d in libvirt_conn.listAllDomains(0)}  # still recorded, for next time
        pool.create(0)
        assert host.gc() == [stuck, f"{name}/vmhost-{stuck}-root"]
        assert _libvirt_leftovers(libvirt_conn, stuck) == []
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            pool.create(0)
        for v in pool.listAllVolumes(0):
            with contextlib.suppress(libvirt.libvirtError):
                v.delete(0)
        with contextlib.suppress(libvirt.libvirtError):
            pool.destroy()
        pool.undefine()


# ---------------------------------------------------------------------------------------------
# LXD (real test daemon; VMs cannot start here, docs/design.md §9)

LXD_COMPOSE_STEPS = [
    "create volume {name}-data in pool default",
    "provider compose",
    "create VM {name}",
    "mark VM {name} ready",
]
LXD_DECOMPOSE_STEPS = [
    "mark VM {name} decomposing",
    "delete VM {name}",
    "delete volume {name}-data",
    "widen floating VMs",
]


def _lxd_spec(project_name: str, lock: str, name: str, action: str) -> dict:
    return {
        "backend": "lxd",
        "uri": None,
        "options": {"project": project_name},
        "policy": POLICY,
        "lock": lock,
        "action": action,
        "seed": False,
        "start": False,
        "request": {"cores": 1, "memory": "256M", "pinned_cores": "auto", "storage": "root:1,data:1", "name": name},
    }


@pytest.fixture
def lxd_host(project, tmp_path):  # noqa: F811
    host = VmHost(
        make_provider(ProviderSettings("lxd", options={"project": project})),
        Policy(**POLICY),
        lock_path=str(tmp_path / "lock"),
    )
    yield host
    host.provider.close()


def _lxd_clean(project_name: str, name: str) -> None:
    from tests.functional.test_lxd import lxc

    lxc("delete", "--force", name, "--project", project_name, check=False)
    lxc("storage", "volume", "delete", "default", f"{name}-data", "--project", project_name, check=False)


@pytest.mark.lxd
@pytest.mark.parametrize("step", LXD_COMPOSE_STEPS + LXD_DECOMPOSE_STEPS)
def test_lxd_compose_and_decompose_killed_at_each_step_leave_nothing_after_gc(lxd_host, project, tmp_path, step):  # noqa: F811
    name = f"fk-{uuid.uuid4().hex[:8]}"
    spec = _lxd_spec(project, lxd_host.lock_path, name, "compose")
    try:
        lxd_host.plan(VmRequest.from_dict(spec["request"]))
    except PlacementError as e:
        pytest.skip(f"no room for a pinned VM now: {e}")
    free_before, shared_before = _meminfo("HugePages_Free"), set(lxd_host.shared_threads())
    try:
        if step in LXD_DECOMPOSE_STEPS:
            lxd_host.compose(VmRequest.from_dict(spec["request"]))
            spec["action"] = "decompose"
        _kill_at(step.format(name=name), spec)
        if step == LXD_DECOMPOSE_STEPS[0]:
            # Killed before its first change: the VM is whole and still vm-host's, so gc keeps it.
            assert lxd_host.gc() == [] and lxd_host.find(name).managed
            lxd_host.decompose(name)
        lxd_host.gc()
        assert {i for i in instance_names(project) if i.startswith(name)} == set()
        assert {v for v in volume_names(project) if v.startswith(name)} == set()
        assert _meminfo("HugePages_Free") == free_before
        # LXD cannot confine: what counts is that no dead VM still holds a thread, and nothing is shared.
        assert set(lxd_host.shared_threads()) == shared_before
        assert lxd_host.resources()["shared_pinned_threads"] == []
    finally:
        _lxd_clean(project, name)
