"""Fixtures for the numa tier: real multi-node (and SR-IOV) libvirt hosts, nested under TCG.

Each profile boots once per session, and only one guest runs at a time (tests are ordered by
profile), which spares a 2-core machine. A test that fails while its guest has stopped answering ssh
(the emulated kernel's timers stop now and then: RCU stall reports on its console, met in CI with the
igb guest) runs again, up to twice, on a freshly booted guest; pytest reports it as RERUN and the
console tail is printed. A failure on a guest that still answers is never rerun: that one is vm-host's.
Tests skip, with the reason printed, only when the prerequisites are missing (root, /dev/kvm on this
machine, QEMU, ssh, libvirt-python); CI turns such a skip into a failure where they are present
(tests/conftest.py, .ci/run). A guest that fails to build or boot is an error, not a skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.numa.guest import PROFILES, Guest, build_guest

_ORDER = {"guest_two": 0, "guest_four": 1, "guest_igb": 2}


def pytest_collection_modifyitems(session, config, items) -> None:
    """Tests of one profile run together, so each guest boots once and only one runs at a time."""
    slots = [i for i, it in enumerate(items) if "tests/numa/" in it.nodeid]

    def rank(item) -> int:
        return min((r for f, r in _ORDER.items() if f in getattr(item, "fixturenames", ())), default=len(_ORDER))

    ordered = sorted((items[i] for i in slots), key=rank)
    for i, it in zip(slots, ordered, strict=True):
        items[i] = it
        it.add_marker(pytest.mark.flaky(reruns=HANG_RERUNS, condition=_guest_stopped_answering))


HANG_RERUNS = 2  # per test: with about 1 hang in 5 igb boots on a loaded 2-core box, 3 in a row is rare
MAX_HANG_REBOOTS = 3  # per profile and session: a guest that keeps hanging fails its tests


def _guest_stopped_answering(error: BaseException | None) -> bool:
    """pytest-rerunfailures' condition, asked once a numa test's attempt is over: rerun only if its guest had
    stopped answering when it failed (found in pytest_runtest_makereport, while that guest still ran: after
    the last numa test the guest is stopped before this is asked)."""
    return error is not None and bool(_running) and _running[0].rerun_wanted


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the numa tier builds its guest with debootstrap and needs root"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no usable /dev/kvm on this machine (the numa tier runs where the functional tier runs)"
    for tool in ("qemu-system-x86_64", "ssh", "ssh-keygen", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make host installs it)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed"
    return None


class Guests:
    """Boots profiles on demand; booting one stops the previous one (by its own pid)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.dir = Path(tempfile.mkdtemp(prefix="vmhost-numa-"))
        self.image: Path | None = None
        self.current: Guest | None = None
        self.failed: dict[str, str] = {}
        self.hang_reboots: dict[str, int] = {}
        self.rerun_wanted = False  # the current attempt failed on a guest that stopped answering

    def current_hung(self) -> bool:
        """Whether the running guest stopped answering ssh; if so it is marked for a fresh boot (at most
        MAX_HANG_REBOOTS per profile), and the reason is printed with its console tail."""
        guest = self.current
        if guest is None:
            return False
        if guest.hung:
            return True
        if guest.answers():
            return False
        name = guest.profile.name
        if self.hang_reboots.get(name, 0) >= MAX_HANG_REBOOTS:
            self.say(f"numa tier: the {name} guest stopped answering again; no more fresh boots this session")
            return False
        self.hang_reboots[name] = self.hang_reboots.get(name, 0) + 1
        guest.hung = True
        self.say(
            f"numa tier: the {name} guest stopped answering ssh; the test runs again on a fresh boot. "
            f"Console tail:\n{guest.console_tail()}"
        )
        return True

    def say(self, message: str) -> None:
        """Straight to the terminal, past pytest's capture: CI keeps only what the run printed."""
        capture = self.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\n{message}", flush=True)

    def get(self, name: str) -> Guest:
        if self.current is not None and self.current.profile.name == name and not self.current.hung:
            return self.current
        if name in self.failed:
            pytest.fail(f"the {name} guest did not come up earlier in this session: {self.failed[name]}")
        self.stop()
        if self.image is None:
            self.image = build_guest()
        # A nested TCG guest now and then comes up with a vCPU that never runs (the kernel reports RCU stalls
        # from its first minute); that is the emulator's, not vm-host's, so such a guest is booted once more,
        # saying so. A guest that fails twice fails the profile's tests.
        why = ""
        for attempt in (1, 2):
            boot_dir = self.dir / f"{name}-{len(list(self.dir.glob(f'{name}-*'))) + 1}"
            guest = Guest(PROFILES[name], self.image, boot_dir)
            try:
                guest.boot()
                why = guest.stalled() or ""
            except Exception as e:
                why = str(e)
            if not why:
                self.current = guest
                return guest
            guest.stop()
            self.say(f"numa tier: the {name} guest (boot {attempt} of 2) is not usable: {why[-1500:]}")
        self.failed[name] = why
        raise RuntimeError(f"the {name} guest was not usable in 2 boots: {why[-3000:]}")

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None


_running: list[Guests] = []  # the session's Guests, for the failure report below


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last numa test the guest is stopped at once: left to the session's end it took half the
    machine's CPU through every later tier."""
    yield
    last = "tests/numa/" in item.nodeid and (nextitem is None or "tests/numa/" not in nextitem.nodeid)
    if last and _running:
        _running[0].stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed numa test carries the nested guest's console tail: a guest that died (an OOM, a hang) says so
    there, and CI keeps no files, only what the run printed."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "tests/numa/" in item.nodeid and _running and _running[0].current is not None:
        guests = _running[0]
        report.sections.append(
            (f"{guests.current.profile.name} guest console (last 3000 characters)", guests.current.console_tail(3000))
        )
        if guests.current_hung():
            guests.rerun_wanted = True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Each attempt of a test starts with no rerun asked for."""
    if _running:
        _running[0].rerun_wanted = False


@pytest.fixture(scope="session")
def guests(pytestconfig: pytest.Config) -> Iterator[Guests]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    g = Guests(pytestconfig)
    _running[:] = [g]
    atexit.register(g.stop)  # also when pytest is interrupted past its finalizers
    yield g
    g.stop()
    shutil.rmtree(g.dir, ignore_errors=True)


def _profile_fixture(name: str) -> Callable:
    @pytest.fixture
    def fixture(guests: Guests) -> Guest:
        return guests.get(name)

    return fixture


guest_two = _profile_fixture("two")
guest_four = _profile_fixture("four")
guest_igb = _profile_fixture("igb")


@pytest.fixture
def vm_names(guests: Guests) -> Iterator[Callable[[], str]]:
    """Per-test unique VM names; whatever carries them is removed from the current guest afterwards."""
    names: list[str] = []

    def new() -> str:
        names.append(f"nt-{uuid.uuid4().hex[:8]}")
        return names[-1]

    yield new
    guest = guests.current
    if guest is not None and names and not guest.hung:
        script = "; ".join(f"virsh destroy {n} >/dev/null 2>&1; virsh undefine {n} >/dev/null 2>&1" for n in names)
        guest.run(script, check=False)
