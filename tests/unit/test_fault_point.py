"""The test-only fault point: exits exactly at the named step, and cannot go off by accident."""

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
