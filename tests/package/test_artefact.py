"""The packed charm, as Juju would receive it: charmcraft's verdict, its layout, its venv, its dispatch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

# Every result of `charmcraft analyse` that is not plainly fine, with why we keep it.
ACCEPTED = {
    "naming-conventions": "the action parameters pinned_cores, hugepages_backed and hugepage_size keep MAAS's "
    "names on purpose, so `maas ... vm-host compose` habits carry over (docs: docs/design.md §6)",
    "framework": "charmcraft 4.5's detector looks for venv/ops, the charm plugin's layout; the uv plugin's venv "
    "keeps ops in venv/lib/python3.X/site-packages (test_venv_alone_imports_the_runtime proves ops is there)",
    "ops-main-call": "follows from 'framework' above: the linter runs only when that detector says 'operator'",
    "additional-files": "needs charmcraft's build environment, which analyse of a packed file does not have",
}
FINE = {"ok", "python", "operator"}


def analyse(charm_path: Path) -> list[dict]:
    tools = subprocess.run(["bash", str(REPO / "scripts/tools-venv.sh")], capture_output=True, text=True, check=True)
    charmcraft = Path(tools.stdout.strip()) / "bin" / "charmcraft"
    out = subprocess.run(
        [str(charmcraft), "analyse", str(charm_path), "--format=json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # charmcraft's exit code is the worst level found: 0 fine, 3 warnings, 2 errors, 1 fatal.
    assert out.returncode in (0, 3), out.stderr[-2000:]
    return json.loads(out.stdout)


def test_charmcraft_analyse_has_no_error_and_every_warning_a_reason(charm_path):
    results = analyse(charm_path)
    assert {r["name"] for r in results} >= {"entrypoint", "juju-actions", "juju-config", "metadata", "pydeps"}
    errors = [r for r in results if r["result"] in ("error", "fatal")]
    assert not errors, errors
    unexplained = [r for r in results if r["result"] not in FINE and r["name"] not in ACCEPTED]
    assert not unexplained, unexplained
    by_name = {r["name"]: r["result"] for r in results}
    assert by_name["entrypoint"] == "ok" and by_name["language"] == "python"
    assert by_name["pip-check"] == "ok" and by_name["pydeps"] == "ok"


def test_layout_is_a_charm_and_nothing_else(unpacked):
    names = {p.name for p in unpacked.iterdir()}
    assert {"dispatch", "src", "lib", "venv", "manifest.yaml", "metadata.yaml", "config.yaml", "actions.yaml"} <= names
    # .jujuignore and the uv plugin keep development files out.
    development = {"tests", "examples", "bench", "scripts", ".ci", "Makefile", "pyproject.toml", "uv.lock", ".venv"}
    assert not names & development
    assert not list(unpacked.rglob("*.charm"))
    assert not [p for p in (unpacked / "src").rglob("__pycache__")], "caches from the source tree were packed"
    manifest = yaml.safe_load((unpacked / "manifest.yaml").read_text())
    assert manifest["bases"][0]["name"] == "ubuntu" and manifest["bases"][0]["channel"] == "24.04"
    metadata = yaml.safe_load((unpacked / "metadata.yaml").read_text())
    assert metadata["name"] == "vm-host" and "juju >= 3.6" in metadata["assumes"]
    # What the cos-agent relation sends: the alert rules and the dashboard, read from these paths at runtime.
    assert (unpacked / "src/prometheus_alert_rules/vmhost.rules").is_file()
    assert (unpacked / "src/grafana_dashboards/vm-host.json").is_file()


def test_every_file_dispatch_executes_is_executable(unpacked):
    dispatch = unpacked / "dispatch"
    assert os.access(dispatch, os.X_OK)
    entrypoint = dispatch.read_text().split()[-1]
    assert entrypoint == "src/charm.py"
    assert os.access(unpacked / entrypoint, os.X_OK), "src/charm.py lost its execute bit"
    assert (unpacked / entrypoint).read_text().startswith("#!/usr/bin/env python3")
    for hook in (unpacked / "hooks").glob("*") if (unpacked / "hooks").exists() else ():
        assert os.access(hook, os.X_OK), hook


RUNTIME = ["ops", "pydantic", "pylxd", "libvirt", "tenacity", "yaml", "charmlibs.apt", "charmlibs.snap", "vmhost",
           "vmhost.exporter", "prometheus_client", "cosl", "charms.grafana_agent.v0.cos_agent"]  # fmt: skip


def test_venv_alone_imports_the_runtime(unpacked):
    """The system python, isolated (-I) and without site-packages (-S), with only the artefact's paths."""
    site = next((unpacked / "venv" / "lib").glob("python3*/site-packages"))
    code = (
        "import importlib, json, sys\n"
        f"sys.path[:0] = {[str(site), str(unpacked / 'lib'), str(unpacked / 'src')]!r}\n"
        f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {RUNTIME!r}}}))\n"
    )
    out = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    files = json.loads(out.stdout)
    outside = {m: f for m, f in files.items() if not Path(f).resolve().is_relative_to(unpacked.resolve())}
    assert not outside, f"imported from outside the artefact: {outside}"


# --- dispatch, run for real -------------------------------------------------------------------------

TOOLS = [
    "juju-log", "status-set", "status-get", "config-get", "is-leader", "relation-ids", "relation-list",
    "relation-get", "relation-set", "relation-model-get", "action-get", "action-set", "action-log", "action-fail", "goal-state",
    "application-version-set", "opened-ports", "open-port", "close-port", "network-get", "juju-reboot",
    "secret-add", "secret-get", "secret-set", "secret-ids", "secret-info-get", "secret-grant", "secret-remove",
    "state-get", "state-set", "state-delete", "leader-get", "leader-set", "storage-list", "storage-get",
]  # fmt: skip


@pytest.fixture
def juju_env(unpacked, tmp_path):
    """Recording stand-ins for Juju's hook tools first on PATH, then the system's tools only.

    This is a smoke test of the packed files (dispatch, venv, entrypoint, charm code, YAML) under
    the environment Juju gives a hook; Juju's agent itself is not here (the integration tier needs it).
    """
    libvirt_ok = (
        shutil.which("virsh")
        and subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True, timeout=30).returncode
        == 0
    )
    if not (libvirt_ok and os.access("/dev/kvm", os.R_OK | os.W_OK)):
        pytest.skip("the dispatch smoke test drives the real libvirtd: it needs libvirtd running and /dev/kvm")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = Path(__file__).with_name("hooktool.py")
    for tool in TOOLS:
        (bin_dir / tool).write_text(f"#!{sys.executable}\nexec(open({str(stub)!r}).read())\n")
        (bin_dir / tool).chmod(0o755)
    state = tmp_path / "juju"
    state.mkdir()
    # No systemd runs as PID 1 here, so the vmhost-serve unit is left out (tests/unit/test_charm_observe.py
    # checks it, tests/functional/test_observe.py runs the process itself).
    (state / "config.json").write_text(json.dumps({"backend": "libvirt", "metrics-address": ""}))
    (state / "params.json").write_text("{}")
    env = {
        "PATH": f"{bin_dir}:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOOKTOOL_DIR": str(state),
        "JUJU_UNIT_NAME": "vm-host/0",
        "JUJU_MODEL_NAME": "smoke",
        "JUJU_MODEL_UUID": "00000000-0000-4000-8000-000000000001",
        "JUJU_VERSION": "3.6.4",
        "JUJU_CHARM_DIR": str(unpacked),
        "LANG": "C.UTF-8",
        "VMHOST_LOCK_FILE": os.environ.get("VMHOST_LOCK_FILE", ""),
    }
    return {k: v for k, v in env.items() if v}, state


def dispatch(unpacked, env, state, path: str, **extra) -> list[dict]:
    (state / "calls.jsonl").unlink(missing_ok=True)
    out = subprocess.run(
        [str(unpacked / "dispatch")],
        cwd=unpacked,
        env={**env, "JUJU_DISPATCH_PATH": path, **extra},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, f"{path}: exit {out.returncode}\n{out.stderr[-3000:]}"
    return [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]


def statuses(calls: list[dict]) -> list[list[str]]:
    return [c["args"] for c in calls if c["tool"] == "status-set"]


def test_dispatch_runs_install_config_changed_and_resources(juju_env, unpacked):
    env, state = juju_env
    for hook in ("hooks/install", "hooks/config-changed"):
        calls = dispatch(unpacked, env, state, hook)
        final = statuses(calls)[-1]
        assert "active" in final, f"{hook} ended in {final}"
        assert any(a.startswith("libvirt") for a in final), final
        assert not [c for c in calls if c["tool"] == "juju-log" and "Traceback" in " ".join(c["args"])]

    calls = dispatch(unpacked, env, state, "actions/resources", JUJU_ACTION_NAME="resources", JUJU_ACTION_UUID="1")
    assert not [c for c in calls if c["tool"] == "action-fail"], calls
    results = _results(calls)
    resources = json.loads(results["json"])
    assert resources["nodes"] and resources["nodes"][0]["threads"]
    assert results["view"].strip()


def _results(calls: list[dict]) -> dict[str, str]:
    out = {}
    for c in calls:
        if c["tool"] == "action-set":
            for kv in c["args"]:
                key, _, value = kv.partition("=")
                out[key] = value
    return out


def _domains() -> set[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    return {n for n in out.stdout.split() if n}


def _no_traceback(calls: list[dict]) -> None:
    shown = [" ".join(c["args"]) for c in calls if c["tool"] in ("status-set", "action-fail", "action-set")]
    assert not [s for s in shown if "Traceback" in s or 'File "' in s], shown


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("reserved-cores", "0-99999999"),
        ("hugepages", "2M:999999999999"),
        ("libvirt-uri", "x" * 5000),
        ("relation-quota", "vms=-1"),
        ("image-server", "ftp://mirror/releases"),
        ("cpu-overcommit-ratio", 1e308),
        ("space-bridges", "public=" + "b" * 300),
    ],
    ids=lambda v: str(v)[:24],
)
def test_hostile_config_blocks_naming_the_option_through_the_packed_charm(juju_env, unpacked, option, value):
    env, state = juju_env
    (state / "config.json").write_text(json.dumps({"backend": "libvirt", "metrics-address": "", option: value}))
    calls = dispatch(unpacked, env, state, "hooks/config-changed")
    final = statuses(calls)[-1]
    assert "blocked" in final and option in final[-1], final
    assert len(final[-1]) < 400 and "\n" not in final[-1]
    _no_traceback(calls)


def test_compose_and_decompose_actions_through_the_packed_charm_on_real_libvirt(juju_env, unpacked):
    """The actions as Juju runs them from the artefact: hostile parameters fail in one sentence and make
    nothing; a good compose makes a real domain, and decompose removes it. (Parameters actions.yaml does
    not declare are Juju's to refuse: every action there has additionalProperties: false.)"""
    import uuid

    env, state = juju_env

    def action(name: str, params: dict) -> list[dict]:
        (state / "params.json").write_text(json.dumps(params))
        return dispatch(unpacked, env, state, f"actions/{name}", JUJU_ACTION_NAME=name, JUJU_ACTION_UUID="7")

    before = _domains()
    hostile = [
        ({"cores": 0}, "cores"),
        ({"memory": "9" * 70}, "memory"),
        ({"boot": "image", "image": "ubuntu:$(reboot)"}, "is not an image name"),
        ({"ssh_authorized_keys": ["ssh-ed25519 AAAA; rm -rf /"]}, "ssh_authorized_keys"),
        ({"user_data": "#cloud-config\n" + "a: b\n" * 20000}, "user"),
        ({"interfaces": "eth0:name=nosuchnet"}, "nosuchnet"),
        ({"hostname": "-bad-"}, "host name"),
        ({"storage": "root:99999"}, "too large"),
    ]
    for params, says in hostile:
        calls = action("compose", params)
        failed = [c["args"] for c in calls if c["tool"] == "action-fail"]
        assert len(failed) == 1 and says in failed[0][-1] and "\n" not in failed[0][-1], (params, failed)
        _no_traceback(calls)
    assert _domains() == before

    name = f"ft-{uuid.uuid4().hex[:8]}"
    try:
        calls = action("compose", {"cores": 1, "memory": "128M", "storage": "root:1", "hostname": name})
        assert not [c for c in calls if c["tool"] == "action-fail"], calls
        assert _results(calls)["name"] == name
        assert _domains() == before | {name}
        calls = action("decompose", {"name": name})
        assert not [c for c in calls if c["tool"] == "action-fail"], calls
        assert _domains() == before
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name, "--remove-all-storage"],
                       capture_output=True, timeout=60)  # fmt: skip


def _relation_hook(unpacked, env, state, requests_value: str | None, hook: str = "changed") -> tuple[list, dict]:
    """One vm-allocation relation hook from a remote application `req` whose `requests` is what a hostile
    (or honest) model wrote; returns the calls and vm-host's application databag afterwards."""
    relations = json.loads((state / "relations.json").read_text()) if (state / "relations.json").exists() else {}
    rel = relations.setdefault("vm-allocation", {}).setdefault(
        "5", {"app": "req", "units": ["req/0"], "data": {"req": {}, "req/0": {}}}
    )
    if requests_value is None:
        rel["data"]["req"].pop("requests", None)
    else:
        rel["data"]["req"]["requests"] = requests_value
    (state / "relations.json").write_text(json.dumps(relations))
    extra = {"JUJU_RELATION": "vm-allocation", "JUJU_RELATION_ID": "vm-allocation:5", "JUJU_REMOTE_APP": "req",
             "JUJU_REMOTE_UNIT": "req/0"}  # fmt: skip
    calls = dispatch(unpacked, env, state, f"hooks/vm-allocation-relation-{hook}", **extra)
    after = json.loads((state / "relations.json").read_text())["vm-allocation"]["5"]["data"]
    return calls, after.get("vm-host", {})


def test_the_relation_through_the_packed_charm_hostile_data_then_a_real_vm(juju_env, unpacked, tmp_path):
    """What a remote model writes reaches the artefact's hooks: hostile data never fails a hook, never makes
    a VM, and is answered in vm-host's databag; an honest request makes a real VM on libvirt, and
    withdrawing it removes the VM."""
    env, state = juju_env
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "tiny.qcow2"), "64M"], check=True)
    config = {"backend": "libvirt", "metrics-address": "", "libvirt-image-dir": str(images), "relation-image": "tiny",
              "cpu-overcommit-ratio": 4}  # fmt: skip
    (state / "config.json").write_text(json.dumps(config))

    before = _domains()
    deep = "[" * 5000 + "]" * 5000
    hostile = [
        "x" * 2048,
        "\u0000\ud800" * 1000,
        deep,
        json.dumps({"not": "a list"}),
        json.dumps([{"id": "a", "cores": 10**30}]),
        json.dumps([{"id": "b" * 5000, "cores": 1}]),
        json.dumps([{"id": "c", "memory": "1E", "interfaces": "eth0:name=" + "n" * 3000}]),
        json.dumps([{"id": "d", "cores": 1, "memory": "128M", "image": "/etc/shadow"}]),
        json.dumps([{"id": "e", "cores": 1, "memory": "128M", "user_data": "#cloud-config\n" + "[" * 200000}]),
    ]
    try:
        for value in hostile:
            calls, ours = _relation_hook(unpacked, env, state, value)
            _no_traceback(calls)
            assert not [c for c in calls if c["tool"] == "juju-log" and "Traceback" in " ".join(c["args"])]
            served = json.loads(ours.get("vms", "[]"))
            assert ours.get("error") or (served and all(v["status"] == "rejected" for v in served)), (value[:80], ours)
            assert len(json.dumps(ours)) < 64 * 1024
            assert _domains() == before
        # Asking for far too much is bounded, not refused: the first 64 entries are read, the quota (vms=3
        # here) and the host's capacity decide how many are made, the rest are told why.
        config["relation-quota"] = "vms=3"
        (state / "config.json").write_text(json.dumps(config))
        many = [{"id": f"r{i}", "cores": 1, "memory": "128M", "storage": "root:1"} for i in range(5000)]
        calls, ours = _relation_hook(unpacked, env, state, json.dumps(many))
        _no_traceback(calls)
        served = json.loads(ours["vms"])
        assert "too many requests: 5000 entries, at most 64" in ours["error"]
        assert len(served) == 64 and len(_domains() - before) == 3
        assert {v["status"] for v in served[3:]} == {"rejected"}, served[3]
        calls, ours = _relation_hook(unpacked, env, state, json.dumps([]))
        assert json.loads(ours.get("vms", "[]")) == [] and _domains() == before
        request = [{"id": "web-0", "cores": 1, "memory": "128M", "storage": "root:1"}]
        calls, ours = _relation_hook(unpacked, env, state, json.dumps(request))
        _no_traceback(calls)
        (vm,) = json.loads(ours["vms"])
        assert vm["id"] == "web-0" and vm["status"] == "pending" and vm["name"], vm
        assert _domains() == before | {vm["name"]}
        calls, ours = _relation_hook(unpacked, env, state, json.dumps([]))
        assert json.loads(ours.get("vms", "[]")) == []
        assert _domains() == before
    finally:
        for name in _domains() - before:
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True, timeout=60)
            subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name, "--remove-all-storage"],
                           capture_output=True, timeout=60)  # fmt: skip
