"""Fixtures for the functional tier on the REAL libvirtd (no mocks).

Tests skip, with the reason printed, only when libvirtd or /dev/kvm is not usable; CI turns such a
skip into a failure where /dev/kvm works (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import uuid
from collections.abc import Iterator

import pytest

LIBVIRT_URI = os.environ.get("VMHOST_TEST_LIBVIRT_URI", "qemu:///system")

# The names this tier gives what it makes: a prefix, a random hex id, maybe a suffix (test_race: race<id><n>-<k>).
TEST_MADE = re.compile(r"^(?:(?:ft|obs|nt|fk|boot)(?:-[a-z]+)?-[0-9a-f]{6,8}|race[0-9a-f]{6}\d+-\d+)(?:-.*)?$")


# Functional runs on one machine share its libvirtd; this lock says one is under way (`flock LOCK pytest ...`).
FUNCTIONAL_LOCK = "/tmp/vmhost-functional.lock"


@pytest.fixture(scope="session", autouse=True)
def _leftovers_of_a_killed_run(request) -> Iterator[None]:
    """A run killed midway (a stopped session, a machine imaged mid-run) leaves its VMs defined, and they take
    the next run's host capacity: a CI run once refused the boot test's compose over one. Before any test,
    remove what carries this tier's test names, and nothing else; only while no other run can be under way
    (this session holds the functional lock, or was started under it)."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def say(line: str) -> None:  # shown at once, not captured with the first test's output
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n{line}")

    held = _lock_inherited()
    lock = None
    if not held:
        lock = open(FUNCTIONAL_LOCK, "a")  # noqa: SIM115 - held for the whole session
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            say(f"functional tier: another run holds {FUNCTIONAL_LOCK}; its VMs are left alone (no sweep)")
    if held:
        try:
            import libvirt

            conn = libvirt.open(LIBVIRT_URI)
        except Exception:  # no libvirt here: the tests that need it skip with the reason
            conn = None
        if conn is not None:
            try:
                removed = remove_test_made(conn)
            finally:
                conn.close()
            if removed:
                say(f"functional tier: removed what an earlier, killed run left: {', '.join(removed)}")
    yield
    if lock is not None:
        lock.close()


def _lock_inherited() -> bool:
    """This process was started under `flock FUNCTIONAL_LOCK ...` (it has the locked file open)."""
    with contextlib.suppress(OSError):
        return any(os.path.realpath(f"/proc/self/fd/{fd}") == FUNCTIONAL_LOCK for fd in os.listdir("/proc/self/fd"))
    return False


def remove_test_made(conn) -> list[str]:
    """Domains, their volumes, pools and volumes whose names match TEST_MADE; returns what went."""
    import libvirt

    from vmhost.providers.base import NAME_PREFIX

    removed = []
    for dom in conn.listAllDomains(0):
        if TEST_MADE.match(dom.name()):
            _cleanup(conn, [dom.name()])
            removed.append(f"domain {dom.name()}")
    for pool in conn.listAllStoragePools(0):
        if TEST_MADE.match(pool.name()):
            with contextlib.suppress(libvirt.libvirtError):
                if pool.isActive():
                    pool.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                pool.undefine()
            removed.append(f"pool {pool.name()}")
            continue
        if not pool.isActive():
            continue
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            name = vol.name().removeprefix(NAME_PREFIX)
            if TEST_MADE.match(name):
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
                    removed.append(f"volume {vol.name()}")
    return removed


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    """The libvirt URI the functional tests drive, once it is known to answer and /dev/kvm is usable."""
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine (enable virtualisation, or run as a user in group kvm)")
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as e:
        pytest.skip(f"libvirtd is not reachable at {LIBVIRT_URI}: {e}")
    conn.close()
    return LIBVIRT_URI


@pytest.fixture
def libvirt_conn(libvirt_uri):
    """A raw libvirt connection, for looking at what the provider did from the outside."""
    import libvirt

    conn = libvirt.open(libvirt_uri)
    yield conn
    conn.close()


@pytest.fixture
def libvirt_provider(libvirt_uri):
    from vmhost.providers.libvirt import LibvirtProvider

    provider = LibvirtProvider(uri=libvirt_uri)
    yield provider
    provider.close()


@pytest.fixture
def host(libvirt_uri, tmp_path):
    """A VmHost on the real libvirtd (default policy, a per-test lock file) and a list of VM names to decompose."""
    from vmhost.model import Policy
    from vmhost.providers.registry import ProviderSettings, make_provider
    from vmhost.service import VmHost

    vmhost = VmHost(
        make_provider(ProviderSettings("libvirt", uri=libvirt_uri)), Policy(), lock_path=str(tmp_path / "lock")
    )
    made: list[str] = []
    yield vmhost, made
    for name in made:
        with contextlib.suppress(Exception):
            vmhost.decompose(name)
    vmhost.provider.close()


@pytest.fixture
def vm_names(libvirt_conn) -> Iterator[list[str]]:
    """Hands out per-test unique VM names and removes whatever carries them afterwards, pass or fail."""
    names: list[str] = []

    def new(prefix: str = "ft") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield new  # type: ignore[misc]
    _cleanup(libvirt_conn, names)


def _cleanup(conn, names: list[str]) -> None:
    import libvirt

    from vmhost.providers.base import NAME_PREFIX

    for name in names:
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if any(vol.name().startswith(f"{NAME_PREFIX}{n}-") for n in names):
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
