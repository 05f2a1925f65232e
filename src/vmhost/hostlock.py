"""The host-wide lock that makes plan + compose atomic across vmhost processes (the CLI and the charm).

Root's alone: it lives in a directory only its owner may write (default /run/vmhost, made 0700) and
is itself 0600, so no other local user can open it, let alone hold a shared lock on it and block
every compose. Waiting for it is bounded; the holder writes its pid and command line into the file,
so a wait that runs out can say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vmhost.providers.base import ProviderError
from vmhost.timeouts import DEFAULT_LOCK_TIMEOUT

DEFAULT_LOCK = "/run/vmhost/lock"


class HostLockError(ProviderError):
    """The host lock is unsafe to use or stayed busy past its bound (reported like any backend failure)."""


class HostLockBusy(HostLockError):
    """Another process held the host lock for the whole wait."""


def lock_path(path: str | None = None) -> Path:
    """The lock file: `path`, else $VMHOST_LOCK_FILE, else DEFAULT_LOCK."""
    return Path(path or os.environ.get("VMHOST_LOCK_FILE") or DEFAULT_LOCK)


def _owner_ok(st: os.stat_result) -> bool:
    return st.st_uid in (0, os.geteuid())


def _check_dir(d: Path) -> None:
    """The lock's directory: made (0700) only when it is the default one; else it must exist and be safe."""
    try:
        st = d.lstat()
    except FileNotFoundError:
        if str(d) != os.path.dirname(DEFAULT_LOCK):
            raise HostLockError(
                f"the host lock directory {d} does not exist; create it (owned by root, mode 0700) "
                "or point VMHOST_LOCK_FILE at a file in an existing one"
            ) from None
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise HostLockError(f"cannot create the host lock directory {d}: {e.strerror}; run as root") from None
        st = d.lstat()
    if not stat.S_ISDIR(st.st_mode) or not _owner_ok(st) or st.st_mode & 0o022:
        raise HostLockError(
            f"the host lock directory {d} must be a directory owned by root and writable by no one else "
            f"(it is {_describe(st)}); fix it or point VMHOST_LOCK_FILE elsewhere"
        )


def _describe(st: os.stat_result) -> str:
    return f"uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def _open(path: Path) -> int:
    """An fd on the lock file, created 0600; refused unless it is a regular file only its owner (root) can open."""
    _check_dir(path.parent)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HostLockError(f"the host lock {path} is a symbolic link; remove it") from None
        raise HostLockError(f"cannot open the host lock {path}: {e.strerror}; run as root") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or not _owner_ok(st) or st.st_mode & 0o077:
        os.close(fd)
        raise HostLockError(
            f"the host lock {path} must be a file owned by root that only root can open "
            f"(it is {_describe(st)}); remove it and vmhost makes a new one"
        )
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into it ("pid 123 (vmhost compose ...)")."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        text = ""
    pid, _, cmd = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    alive = Path(f"/proc/{pid}").exists()
    cmd = " ".join(cmd.split())[:200] or "command unknown"
    return f"pid {pid} ({cmd})" + ("" if alive else ", which has just exited")


def _cmdline() -> str:
    """This process's command line on one line (arguments may hold newlines)."""
    try:
        return " ".join(Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split())
    except OSError:
        return "unknown"


def _acquire(fd: int, timeout: float) -> bool:
    """Take the lock on `fd` within `timeout` s. The wait blocks in the kernel, which wakes a waiter the
    moment the holder lets go, so a process that composes in a loop cannot starve the others (polling
    would lose every race to it). The blocking call runs on a helper thread on its own descriptor; if
    the wait runs out first, that thread lets go as soon as it gets the lock, and never holds it for us.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        if timeout <= 0:
            return False
    waiter = os.dup(fd)  # shares the open file description, so its lock is ours once we keep it
    state = {"got": False, "abandoned": False}
    guard = threading.Lock()
    got = threading.Event()

    def wait() -> None:
        try:
            fcntl.flock(waiter, fcntl.LOCK_EX)
            with guard:
                if state["abandoned"]:
                    fcntl.flock(waiter, fcntl.LOCK_UN)
                else:
                    state["got"] = True
                    got.set()
        finally:
            os.close(waiter)

    threading.Thread(target=wait, name="vmhost-lock-wait", daemon=True).start()
    got.wait(timeout)
    with guard:
        if not state["got"]:
            state["abandoned"] = True
        return state["got"]


@contextmanager
def host_lock(path: str | None = None, timeout: float = DEFAULT_LOCK_TIMEOUT) -> Iterator[None]:
    """Exclusive lock across processes on this machine, waited for `timeout` s at most (0: try once).

    Raises HostLockError naming the holder when the wait runs out, or saying what is unsafe about the
    lock's file or directory. Released when the block ends, however it ends.
    """
    where = lock_path(path)
    fd = _open(where)
    try:
        if not _acquire(fd, timeout):
            raise HostLockBusy(f"the host lock {where} is held by {_holder(fd)}; gave up after {timeout:g} s")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_cmdline()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


__all__ = ["DEFAULT_LOCK", "HostLockBusy", "HostLockError", "host_lock", "lock_path"]
