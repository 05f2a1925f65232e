"""A daemon that accepts connections and never answers costs a bounded wait, and frees the host lock.

A unix socket server thread stands in for libvirtd (`qemu+unix:///system?socket=...`) and for LXD
(its unix socket): it accepts every connection and never sends a byte. `vmhost resources` and
`vmhost compose` run as real processes against it and must end within the --timeout they were given,
with one line on stderr naming the daemon and the limit; a compose holds the host lock while it
waits, and another process takes the lock at once after it gave up. No real daemon is touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.hung import HungServer
from vmhost.hostlock import HostLockBusy, host_lock

LIMIT = 2  # s: the --timeout every command here runs with
SLACK = 6  # s: interpreter start-up, imports, and the one retry wait a connection may take


@pytest.fixture
def hung(tmp_path) -> Iterator[HungServer]:
    server = HungServer(tmp_path / "hung.sock")
    yield server
    server.close()


def _uri(backend: str, server: HungServer) -> str:
    return f"qemu+unix:///system?socket={server.path}" if backend == "libvirt" else str(server.path)


def _vmhost(*args: str, lock: Path) -> subprocess.Popen:
    env = dict(os.environ, VMHOST_LOCK_FILE=str(lock), PYTHONUNBUFFERED="1")
    env.pop("VMHOST_TIMEOUT", None)
    return subprocess.Popen(
        [sys.executable, "-m", "vmhost.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ends_bounded(proc: subprocess.Popen, started: float, backend: str, server: HungServer) -> str:
    out, err = proc.communicate(timeout=LIMIT + SLACK + 30)  # a hang fails here rather than blocking the suite
    took = time.monotonic() - started
    assert proc.returncode == 1, (out, err)
    assert took < LIMIT + SLACK, f"took {took:.1f} s with --timeout {LIMIT}"
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    daemon = "libvirt" if backend == "libvirt" else "LXD"
    assert lines[0].startswith(f"vmhost: error: {daemon} at "), lines[0]
    assert str(server.path) in lines[0] and f"within {LIMIT} s" in lines[0] and "--timeout" in lines[0]
    assert "Traceback" not in err and out == ""
    assert server.accepted, "the command never reached the stand-in daemon"
    return lines[0]


@pytest.fixture(params=["libvirt", "lxd"])
def backend(request) -> str:
    pytest.importorskip("libvirt" if request.param == "libvirt" else "pylxd", reason=f"{request.param} binding missing")
    return request.param


def test_resources_against_a_silent_daemon_ends_within_the_limit(backend, hung, tmp_path):
    t0 = time.monotonic()
    proc = _vmhost("resources", "--backend", backend, "--uri", _uri(backend, hung), "--timeout", str(LIMIT),
                   lock=tmp_path / "lock")  # fmt: skip
    _ends_bounded(proc, t0, backend, hung)


def test_a_compose_stuck_on_a_silent_daemon_gives_up_and_frees_the_host_lock(backend, hung, tmp_path):
    lock = tmp_path / "lock"
    t0 = time.monotonic()
    proc = _vmhost(
        "compose", "--backend", backend, "--uri", _uri(backend, hung), "--timeout", str(LIMIT),
        "--cores", "1", "--memory", "256M", "--hostname", "hung-1", lock=lock,
    )  # fmt: skip
    # While it waits on the daemon, the compose holds the host lock: another process is told who holds it.
    deadline = time.monotonic() + LIMIT + SLACK
    while not hung.accepted and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hung.accepted, "the compose never connected"
    with (
        pytest.raises(HostLockBusy, match=rf"held by pid {proc.pid} \(.*vmhost\.cli compose"),
        host_lock(str(lock), timeout=0),
    ):
        pass
    _ends_bounded(proc, t0, backend, hung)
    # ... and once it gave up, the lock is free at once.
    t1 = time.monotonic()
    with host_lock(str(lock), timeout=0):
        pass
    assert time.monotonic() - t1 < 0.5
