"""The `vmhost` command as a process: one line on stderr for every error, never a traceback.

Run through tests/unit/fake_cli.py (the real command on the in-memory provider) where a hypervisor
would otherwise be needed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def vmhost(*args: str, fake: bool = True, env: dict | None = None, tmp_path: Path) -> subprocess.CompletedProcess:
    module = "tests.unit.fake_cli" if fake else "vmhost.cli"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "VMHOST_LOCK_FILE": str(tmp_path / "lock"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=60
    )


def one_line_error(p: subprocess.CompletedProcess) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("vmhost: error: "), p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"VMHOST_CPU_OVERCOMMIT": "abc"},
            "cpu_overcommit_ratio 'abc' must be a number from 0.1 to 64 (1.0 means no overcommit) "
            "(set by --cpu-overcommit-ratio or VMHOST_CPU_OVERCOMMIT)",
        ),
        ({"VMHOST_MEM_OVERCOMMIT": "1e308"}, "memory_overcommit_ratio '1e308' must be a number from 0.1 to 4"),
        ({"VMHOST_RESERVED_MEMORY": "lots"}, "(set by --reserved-memory or VMHOST_RESERVED_MEMORY)"),
    ],
)
def test_bad_environment_is_one_sentence_before_any_hypervisor_is_touched(tmp_path, env, says):
    # The real command and backend: the value is refused before a connection is tried.
    p = vmhost("resources", "--backend", "libvirt", "--uri", "test:///nowhere", fake=False, env=env, tmp_path=tmp_path)
    assert says in one_line_error(p)


def test_a_closed_pipe_ends_quietly(tmp_path):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "VMHOST_LOCK_FILE": str(tmp_path / "lock")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.unit.fake_cli", "resources"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
        cwd=ROOT,
    )
    proc.stdout.close()  # the reader is gone before the command writes anything (`vmhost resources | head -0`)
    _, err = proc.communicate(timeout=60)
    assert err.decode() == ""
    assert proc.returncode == 141


def test_json_is_accepted_before_the_subcommand_too(tmp_path):
    for args in (("--json", "list"), ("list", "--json")):
        p = vmhost(*args, env={"FAKE_RUNNING": "web"}, tmp_path=tmp_path)
        assert p.returncode == 0, p.stderr
        assert [v["name"] for v in json.loads(p.stdout)] == ["web"]


def test_stop_says_so_and_fails_when_the_guest_keeps_running(tmp_path):
    env = {"FAKE_RUNNING": "web", "FAKE_IGNORES_STOP": "1"}
    p = vmhost("stop", "web", "--wait", "1", env=env, tmp_path=tmp_path)
    assert one_line_error(p) == (
        "vmhost: error: VM 'web' is still running 1s after it was asked to stop; "
        "wait longer, or stop it with force (power off)"
    )
    p = vmhost("stop", "web", "--force", "--wait", "1", env=env, tmp_path=tmp_path)
    assert (p.returncode, p.stdout.strip()) == (0, "web: stopped")
    p = vmhost("stop", "web", "--wait", "9999", env=env, tmp_path=tmp_path)
    assert p.returncode == 2 and "not a number of seconds from 0 to 3600" in p.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--boot", "image"], "boot=image needs an image"),
        (["--boot", "image", "--image", "ubuntu:$(reboot)"], "image 'ubuntu:$(reboot)' is not an image name"),
        (["--image", "ubuntu:"], "image 'ubuntu:' is not an image name"),
    ],
)
def test_a_dry_run_refuses_what_the_compose_would(tmp_path, args, says):
    """A dry run must not promise a VM that the same compose would refuse."""
    p = vmhost("compose", "--dry-run", *args, tmp_path=tmp_path)
    assert says in one_line_error(p)
    ok = vmhost("compose", "--dry-run", "--boot", "image", "--image", "ubuntu:24.04", tmp_path=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("would compose "), ok.stderr
