"""The host lock: bounded waits that name the holder, and a file only root can open (issue 10, defects 2-3)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from tests.unit.fakes import FakeProvider
from vmhost import hostlock
from vmhost.hostlock import HostLockError, host_lock
from vmhost.model import Policy
from vmhost.service import VmHost

# A second process that takes the lock, says so, and holds it until its stdin closes (or `hold` s pass).
HOLDER = textwrap.dedent(
    """
    import sys, time
    from vmhost.hostlock import host_lock
    with host_lock(sys.argv[2], timeout=5):
        print("held", flush=True)
        sys.stdin.readline() if float(sys.argv[3]) < 0 else time.sleep(float(sys.argv[3]))
    """
)


def _holder(path, hold: float = -1) -> subprocess.Popen:
    script = path.parent / "holder.py"
    script.write_text(HOLDER)
    p = subprocess.Popen(
        # the marker early: the lock records the command line clipped to 200 characters, paths vary in length
        [sys.executable, str(script), "--marker-for-the-test", str(path), str(hold)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "held"
    return p


def _take(path) -> None:
    with host_lock(None if path is None else str(path), timeout=0):
        pass


def test_a_wait_that_runs_out_names_the_holders_pid_and_command(tmp_path):
    lock = tmp_path / "lock"
    holder = _holder(lock)
    try:
        t0 = time.monotonic()
        with pytest.raises(HostLockError) as e, host_lock(str(lock), timeout=0.5):
            pass
        waited = time.monotonic() - t0
    finally:
        holder.communicate("\n", timeout=10)
    msg = str(e.value)
    assert f"held by pid {holder.pid} (" in msg and "--marker-for-the-test" in msg, msg
    assert "0.5 s" in msg and "\n" not in msg
    assert 0.5 <= waited < 2.5


def test_the_lock_is_taken_as_soon_as_the_holder_lets_go_within_the_bound(tmp_path):
    lock = tmp_path / "lock"
    holder = _holder(lock, hold=0.3)
    t0 = time.monotonic()
    with host_lock(str(lock), timeout=10):
        waited = time.monotonic() - t0
        assert lock.read_text().startswith(f"{os.getpid()} ")  # we are named as the holder now
    holder.wait(timeout=10)
    assert waited < 3


def test_the_lock_is_released_when_the_block_fails(tmp_path):
    lock = str(tmp_path / "lock")
    with pytest.raises(RuntimeError), host_lock(lock, timeout=0):
        raise RuntimeError("compose failed")
    with host_lock(lock, timeout=0):  # free again at once
        pass


def test_a_new_lock_file_is_0600_and_the_default_directory_is_made_0700(tmp_path, monkeypatch):
    default = tmp_path / "run-vmhost" / "lock"
    monkeypatch.setattr(hostlock, "DEFAULT_LOCK", str(default))
    monkeypatch.delenv("VMHOST_LOCK_FILE", raising=False)
    with host_lock(timeout=0):
        pass
    assert stat.S_IMODE(default.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(default.stat().st_mode) == 0o600


def test_a_missing_directory_is_refused_and_not_created(tmp_path, monkeypatch):
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "nonexistent" / "dir" / "lock"))
    with pytest.raises(HostLockError, match=r"directory .*nonexistent/dir does not exist; create it") as e:
        _take(None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize(
    ("target", "mode", "says"),
    [
        ("dir", 0o777, "a directory owned by root and writable by no one else"),
        ("dir", 0o1777, "a directory owned by root and writable by no one else"),
        ("dir", 0o770, "a directory owned by root and writable by no one else"),
        ("file", 0o644, "a file owned by root that only root can open"),
        ("file", 0o604, "a file owned by root that only root can open"),
        ("file", 0o660, "a file owned by root that only root can open"),
    ],
)
def test_a_lock_others_may_write_or_open_is_refused(tmp_path, target, mode, says):
    d = tmp_path / "shared"
    d.mkdir()
    lock = d / "lock"
    if target == "file":
        lock.touch()
    (d if target == "dir" else lock).chmod(mode)
    with pytest.raises(HostLockError, match=rf"{says} \(it is uid \d+, mode {mode:04o}\)"):
        _take(lock)
    assert target == "file" or not lock.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory to another user")
def test_a_directory_another_user_owns_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(HostLockError, match=r"owned by root .*\(it is uid 65534, mode 0700\)"):
        _take(d / "lock")


def test_a_symlinked_lock_file_is_refused(tmp_path):
    (tmp_path / "elsewhere").touch(mode=0o600)
    (tmp_path / "lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(HostLockError, match="symbolic link"), host_lock(str(tmp_path / "lock"), timeout=0):
        pass


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_cannot_open_the_lock_so_cannot_hold_a_shared_flock_on_it(tmp_path):
    lock = tmp_path / "lock"
    with host_lock(str(lock), timeout=0):
        pass
    tmp_path.chmod(0o755)  # even with the directory open to everyone, the file is not
    attack = "import fcntl,sys; fh=open(sys.argv[1]); fcntl.flock(fh, fcntl.LOCK_SH); print('held')"
    r = subprocess.run(
        ["/usr/bin/python3", "-c", attack, str(lock)],
        capture_output=True,
        text=True,
        preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)),
        timeout=30,
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr
    with host_lock(str(lock), timeout=0):  # root still takes it at once
        pass


def test_a_vmhost_that_gave_up_on_the_lock_does_not_wait_again(tmp_path):
    lock = tmp_path / "lock"
    host = VmHost(FakeProvider(), Policy(), lock_path=str(lock), lock_timeout=0.5)
    holder = _holder(lock)
    try:
        with pytest.raises(HostLockError):
            host.gc()
        t0 = time.monotonic()
        with pytest.raises(HostLockError, match="held by pid"):
            host.decompose("vm-x")
        assert time.monotonic() - t0 < 0.3
    finally:
        holder.communicate("\n", timeout=10)


# A process that composes in a tight loop: takes the lock, works a little, lets go, takes it again.
GREEDY = textwrap.dedent(
    """
    import sys, time
    from vmhost.hostlock import host_lock
    end = time.monotonic() + float(sys.argv[2])
    print("looping", flush=True)
    while time.monotonic() < end:
        with host_lock(sys.argv[1], timeout=30):
            time.sleep(0.05)
    """
)


def test_a_process_taking_the_lock_in_a_loop_cannot_starve_a_waiter(tmp_path):
    """The wait blocks in the kernel, which wakes it when the holder lets go; a poller would lose each race."""
    lock = tmp_path / "lock"
    script = tmp_path / "greedy.py"
    script.write_text(GREEDY)
    greedy = subprocess.Popen([sys.executable, str(script), str(lock), "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert greedy.stdout.readline().strip() == "looping"
        time.sleep(0.3)
        got = 0
        for _ in range(5):
            with host_lock(str(lock), timeout=2):
                got += 1
    finally:
        greedy.wait(timeout=30)
    assert got == 5


def test_a_waiter_that_gave_up_never_holds_the_lock_later(tmp_path):
    """The helper thread that was still waiting lets go at once when it finally gets the lock."""
    lock = tmp_path / "lock"
    holder = _holder(lock, hold=0.5)
    with pytest.raises(HostLockError), host_lock(str(lock), timeout=0.1):
        pass
    holder.wait(timeout=10)
    time.sleep(0.2)  # the abandoned waiter got the lock and released it by now
    with host_lock(str(lock), timeout=0):  # taken at once: nobody in this process kept it
        pass
