"""Time limits on everything that waits: hypervisor calls and the host lock (docs/design.md §11).

A daemon that accepts a connection and never answers must cost a bounded wait, not a hung compose
holding the host lock. libvirt-python blocks inside C, where no signal reaches it, so a connection's
calls run on a worker thread of their own (`BoundedRunner`) and the caller waits for it a bounded time;
a call that overruns leaves that thread behind (a daemon thread, it never delays exit) and marks the
connection hung, so every later call on it fails at once instead of queueing behind the stuck one.
"""

from __future__ import annotations

import math
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from vmhost.providers.base import ProviderError

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT = 30.0  # s: one hypervisor call, its retries included
# s: calls that do real work on the host (start or stop a VM, create, grow or delete a volume) get at least this.
OPERATION_TIMEOUT = 120.0
IMAGE_TIMEOUT = 1800.0  # s: copying or downloading an image into a new VM's root disk
RESOLVE_TIMEOUT = 15.0  # s: looking a server's name up (a dead resolver's own retries can run far longer)
DEFAULT_LOCK_TIMEOUT = 60.0  # s: waiting for another vmhost process to release the host lock
CALL_TIMEOUT_RANGE = (1.0, 3600.0)
LOCK_TIMEOUT_RANGE = (0.0, 3600.0)


class HypervisorTimeout(ProviderError):
    """A hypervisor did not answer within its time limit; the connection is given up."""


def no_answer(daemon: str, what: str, limit: float) -> str:
    """The one sentence for a call that ran out of time ("libvirt at qemu:///system did not answer ...")."""
    return f"{daemon} did not answer {what} within {limit:g} s; check that the daemon is responsive"


def resolve(host: str, port: int, limit: float = RESOLVE_TIMEOUT) -> list[tuple]:
    """getaddrinfo with a time limit: no socket timeout covers the name lookup. A lookup that overruns is
    left to finish on its daemon thread, and TimeoutError (an OSError) says how long was waited."""
    answer: dict[str, Any] = {}

    def lookup() -> None:
        try:
            answer["addresses"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            answer["error"] = e

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(limit)
    if "error" in answer:
        raise answer["error"]
    if "addresses" not in answer:
        raise TimeoutError(f"looking up {host} took longer than {limit:g} s")
    return answer["addresses"]


def seconds(value: object, what: str, limits: tuple[float, float] = CALL_TIMEOUT_RANGE) -> float:
    """A time limit from the CLI, the environment or config: a finite number of seconds within `limits`."""
    low, high = limits
    try:
        s = float(str(value).strip().removesuffix("s"))
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and low <= s <= high):
        raise ValueError(f"{what} {str(value)[:40]!r} is not a number of seconds from {low:g} to {high:g}")
    return s


class _Job:
    __slots__ = ("args", "done", "error", "fn", "kwargs", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple, kwargs: dict):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as e:  # handed to the waiting caller, who raises it
            self.error = e
        self.done.set()


class BoundedRunner:
    """Runs one connection's calls in order on a worker thread; the caller waits `timeout` s at most for each.

    `daemon` names the other end in errors ("libvirt at qemu:///system"). Once a call overran, the
    connection counts as hung: later calls raise the same HypervisorTimeout without waiting again.
    """

    def __init__(self, daemon: str, timeout: float = DEFAULT_CALL_TIMEOUT):
        self.daemon = daemon
        self.timeout = timeout
        self.hung: str | None = None
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()

    def call(self, fn: Callable[..., T], *args: Any, bound: float | None = None, what: str = "", **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the worker, waiting `bound` s (default: the runner's timeout) at most."""
        if self.hung is not None:
            raise HypervisorTimeout(self.hung)
        if threading.current_thread() is self._thread:  # called back from inside a call: already on the worker
            return fn(*args, **kwargs)
        job = _Job(fn, args, kwargs)
        self._worker().put(job)
        limit = self.timeout if bound is None else bound
        if not job.done.wait(limit):
            what = what or getattr(fn, "__name__", "a call")
            self.hung = no_answer(self.daemon, what, limit)
            raise HypervisorTimeout(self.hung)
        if job.error is not None:
            raise job.error
        return job.result

    def _worker(self) -> queue.SimpleQueue[_Job]:
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"vmhost {self.daemon}", daemon=True)
                self._thread.start()
        return self._jobs

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            job.run()
            del job  # drop the finished call's objects before blocking again


__all__ = [
    "CALL_TIMEOUT_RANGE",
    "DEFAULT_CALL_TIMEOUT",
    "DEFAULT_LOCK_TIMEOUT",
    "IMAGE_TIMEOUT",
    "LOCK_TIMEOUT_RANGE",
    "OPERATION_TIMEOUT",
    "RESOLVE_TIMEOUT",
    "BoundedRunner",
    "HypervisorTimeout",
    "no_answer",
    "resolve",
    "seconds",
]
