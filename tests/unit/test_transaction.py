"""The compose transaction: the test-only fault point exits exactly at the named step and cannot go off
by accident; an undo that fails keeps the record gc needs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vmhost.providers.base import FAULT_ENV, FAULT_EXIT

SCRIPT = (
    "from vmhost.providers.base import Transaction\n"
    "tx = Transaction()\n"
    "with tx.step('create volume root in pool default'): print('one', flush=True)\n"
    "with tx.step('define domain'): print('two', flush=True)\n"
)


def run(env: dict[str, str]) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if k not in (FAULT_ENV, "JUJU_UNIT_NAME")}
    return subprocess.run([sys.executable, "-c", SCRIPT], env={**base, **env}, capture_output=True, text=True)


def test_the_named_step_exits_the_process_before_it_runs():
    out = run({FAULT_ENV: "kill-at:define domain"})
    assert (out.returncode, out.stdout) == (FAULT_EXIT, "one\n")
    out = run({FAULT_ENV: "kill-at:create volume *"})
    assert (out.returncode, out.stdout) == (FAULT_EXIT, "")


@pytest.mark.parametrize(
    "env",
    [
        {},
        {FAULT_ENV: "define domain"},  # no kill-at: prefix
        {FAULT_ENV: "kill-at:define"},  # names no whole step
        {FAULT_ENV: "kill-at:define domain", "JUJU_UNIT_NAME": "vm-host/0"},  # inside a charm hook
    ],
)
def test_it_never_fires_otherwise(env):
    out = run(env)
    assert (out.returncode, out.stdout) == (0, "one\ntwo\n")


def test_a_failed_undo_keeps_the_record_that_lets_gc_finish():
    """As the libvirt compose registers it: the domain (our record) is undone last, and only when every
    volume undo before it worked; otherwise the record stays and names what gc must remove."""
    from vmhost.providers.base import ComposeError, Transaction

    undone: list[str] = []

    def fail() -> None:
        raise OSError("pool busy")

    tx = Transaction()
    tx.on_undo("undefine domain", lambda: undone.append("domain") if not tx.undo_failures else None)
    tx.on_undo("delete volume root", fail)
    tx.on_undo("delete volume data", lambda: undone.append("data"))
    with pytest.raises(ComposeError, match="compose failed at step 'start domain': boom"), tx.step("start domain"):
        raise RuntimeError("boom")
    assert undone == ["data"] and tx.undo_failures == 1
