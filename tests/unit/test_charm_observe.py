"""The charm runs `vmhost serve` as a systemd unit and offers it over cos-agent (ops.testing, recorded systemctl).

There is no systemd as PID 1 on the test machines, so the unit file's content and the systemctl calls are
what is checked here; the process itself runs in tests/functional/test_observe.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest
from ops import testing

from charm import SERVE_UNIT
from tests.unit import test_charm
from tests.unit.juju_cli import charm_context
from vmhost import cli
from vmhost.machine_setup import systemd_unit

LIBVIRT = test_charm.LIBVIRT
fake = test_charm.fake  # the fake hypervisor and the temp-dir machine of the charm tests
machine = test_charm.machine


def unit_path(machine):
    return machine.root / "etc/systemd/system" / SERVE_UNIT


def systemctl(machine) -> list[list[str]]:
    return [
        c[1:]
        for c in machine.runner.calls
        if (c[0] == "systemctl" and SERVE_UNIT in c) or c[:2] == ["systemctl", "daemon-reload"]
    ]


def exec_argv(unit: str) -> list[str]:
    """ExecStart's words as systemd hands them to the process (%% and $$ are systemd's escapes)."""
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    return [w.replace("%%", "%").replace("$$", "$") for w in shlex.split(line.removeprefix("ExecStart="))]


def ctx(machine) -> testing.Context:
    """One charm directory for every hook of a test, as Juju keeps it (the unit's ExecStart names it)."""
    root = machine.root / "var/lib/juju/agents/unit-vm-host-0/charm"
    root.mkdir(parents=True, exist_ok=True)
    return charm_context(charm_root=root)


def run(event_name: str, config: dict, machine, **state):
    c = ctx(machine)
    out = c.run(getattr(c.on, event_name)(), testing.State(config=config, **state))
    return c, out


def test_install_writes_a_restarting_unit_running_vmhost_serve_with_the_units_config(fake, machine):
    config = {**LIBVIRT, "metrics-address": "0.0.0.0:9555", "reserved-cores": "0-1", "cpu-overcommit-ratio": 2.5}
    config["hypervisor-timeout"] = 45.0
    run("install", config, machine)
    unit = unit_path(machine).read_text()
    assert (
        "Restart=on-failure" in unit
        and "WantedBy=multi-user.target" in unit
        and "After=network-online.target libvirtd.service" in unit
    )
    argv = exec_argv(unit)
    assert argv[0].endswith("/venv/bin/python") and argv[1:4] == ["-m", "vmhost.cli", "serve"]
    args = cli.build_parser().parse_args(argv[3:])  # what vmhost itself makes of it
    assert (args.backend, args.listen, args.uri) == ("libvirt", "0.0.0.0:9555", "qemu:///system")
    policy = cli._policy(args)
    assert (policy.reserved_cores, policy.cpu_overcommit_ratio, policy.reserved_memory) == ((0, 1), 2.5, 0)
    assert float(args.timeout) == 45
    assert 'Environment="PYTHONPATH=' in unit and "/lib:" in unit
    assert systemctl(machine) == [["daemon-reload"], ["enable", SERVE_UNIT], ["restart", SERVE_UNIT]]


def test_an_unchanged_unit_is_only_started_and_a_changed_one_restarted(fake, machine):
    run("install", LIBVIRT, machine)
    machine.runner.calls.clear()
    run("config_changed", LIBVIRT, machine)
    assert systemctl(machine) == [["enable", SERVE_UNIT], ["start", SERVE_UNIT]]
    machine.runner.calls.clear()
    run("config_changed", {**LIBVIRT, "metrics-address": "127.0.0.1:9600"}, machine)
    argv = exec_argv(unit_path(machine).read_text())
    assert argv[argv.index("--listen") + 1] == "127.0.0.1:9600"
    assert systemctl(machine) == [["daemon-reload"], ["enable", SERVE_UNIT], ["restart", SERVE_UNIT]]


def test_upgrade_restarts_the_unchanged_unit_onto_the_new_charm_code(fake, machine):
    run("install", LIBVIRT, machine)
    machine.runner.calls.clear()
    run("upgrade_charm", LIBVIRT, machine)
    assert systemctl(machine) == [["enable", SERVE_UNIT], ["restart", SERVE_UNIT]]


def test_empty_metrics_address_stops_and_removes_the_unit(fake, machine):
    run("install", LIBVIRT, machine)
    machine.runner.calls.clear()
    _, out = run("config_changed", {**LIBVIRT, "metrics-address": ""}, machine)
    assert not unit_path(machine).exists()
    assert systemctl(machine) == [["disable", "--now", SERVE_UNIT], ["daemon-reload"]]
    assert out.unit_status.name == "active"


@pytest.mark.parametrize("bad", ["localhost:9477", "0.0.0.0", "0.0.0.0:99999", "9477"])
def test_a_bad_metrics_address_blocks_with_one_sentence_and_writes_nothing(fake, machine, bad):
    _, out = run("config_changed", {**LIBVIRT, "metrics-address": bad}, machine)
    assert out.unit_status.name == "blocked"
    msg = out.unit_status.message
    assert msg.startswith("config metrics-address: ") and ("e.g. 127.0.0.1:9477" in msg or "allowed: 1 to 65535" in msg)
    assert not unit_path(machine).exists() and systemctl(machine) == []


def test_systemctl_failing_blocks_with_the_cause_and_raises_nothing(fake, machine):
    machine.runner.failures["systemctl"] = subprocess.CalledProcessError(
        1, ["systemctl"], "", "Failed to restart vmhost-serve.service: Unit is masked.\n"
    )
    _, out = run("install", LIBVIRT, machine)
    assert out.unit_status == testing.BlockedStatus(
        f"could not run {SERVE_UNIT}: Failed to restart vmhost-serve.service: Unit is masked.; see journalctl -u {SERVE_UNIT}"
    )


def test_remove_stops_and_deletes_the_unit(fake, machine):
    run("install", LIBVIRT, machine)
    machine.runner.calls.clear()
    run("remove", LIBVIRT, machine)
    assert not unit_path(machine).exists()
    assert systemctl(machine) == [["disable", "--now", SERVE_UNIT], ["daemon-reload"]]


@pytest.mark.parametrize(
    ("address", "target"),
    [("127.0.0.1:9477", "127.0.0.1:9477"), ("0.0.0.0:9500", "localhost:9500"), ("[::]:9477", "localhost:9477")],
)
def test_cos_agent_carries_the_scrape_job_alert_rules_and_dashboard(fake, machine, address, target):
    relation = testing.Relation("cos-agent", remote_app_name="opentelemetry-collector")
    c = ctx(machine)
    out = c.run(
        c.on.relation_changed(relation, remote_unit=0),
        testing.State(config={**LIBVIRT, "metrics-address": address}, relations={relation}, leader=True),
    )
    data = json.loads(out.get_relation(relation.id).local_unit_data["config"])
    (job,) = data["metrics_scrape_jobs"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == [target]
    alerts = {r["alert"] for g in data["metrics_alert_rules"]["groups"] for r in g["rules"]}
    assert {
        "VmHostHugepagesLow",
        "VmHostNoFreePinnableThreads",
        "VmHostVmStuckComposing",
        "VmHostHypervisorDown",
        "VmHostForeignVmOnPinnedThread",
    } <= alerts
    assert len(data["dashboards"]) == 1


def test_the_unit_file_is_one_systemd_accepts_and_quotes_every_word(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    argv = [sys.executable, "-m", "vmhost.cli", "serve", "--uri", 'qemu+ssh://u@h/system?x=%1$HOME "q"']
    unit = systemd_unit("vm-host test", argv, {"PYTHONPATH": "/a b:/c"})
    assert exec_argv(unit) == argv
    path = tmp_path / "vmhost-test.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "vmhost-test.service" not in r.stderr, r.stderr
