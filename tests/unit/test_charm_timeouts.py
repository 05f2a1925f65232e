"""A hung daemon never hangs a hook: the charm gives up after hypervisor-timeout and waits, saying why.

The daemon is a unix socket that accepts and never answers (tests.unit.hung); the providers and
lxd_setup are the real ones, so what is tested is that the charm's time limit reaches every call.
"""

from __future__ import annotations

import time

import pytest
from ops import testing

from tests.unit.hung import HungServer
from tests.unit.juju_cli import charm_context
from tests.unit.test_charm import Machine

LIMIT = 1.0


@pytest.fixture
def machine(monkeypatch, tmp_path) -> Machine:
    import charm

    m = Machine(tmp_path / "root")
    monkeypatch.setattr(charm, "make_host", m.host)
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "lock"))
    return m


@pytest.fixture
def hung(tmp_path):
    (tmp_path / "lxd").mkdir()
    server = HungServer(tmp_path / "lxd" / "unix.socket")
    yield server
    server.close()


def _run(event: str, config: dict) -> tuple[testing.State, float]:
    c = charm_context()
    t0 = time.monotonic()
    out = c.run(getattr(c.on, event)(), testing.State(config={"hypervisor-timeout": LIMIT, **config}))
    return out, time.monotonic() - t0


@pytest.mark.parametrize("event", ["update_status", "config_changed"])
def test_a_hung_libvirtd_leaves_the_unit_waiting_with_the_reason(machine, hung, event):
    uri = f"qemu+unix:///system?socket={hung.path}"
    out, took = _run(event, {"backend": "libvirt", "libvirt-uri": uri})
    assert out.unit_status == testing.WaitingStatus(
        f"libvirt at {uri} did not answer the connection within {LIMIT:g} s; check that the daemon is responsive"
    )
    assert len(hung.accepted) == 1 and took < LIMIT + 3  # one wait: collect-status does not ask again


def test_a_hung_lxd_leaves_the_unit_waiting_with_the_reason(machine, hung, monkeypatch):
    monkeypatch.setenv("LXD_DIR", str(hung.path.parent))  # where pylxd finds the local socket
    out, took = _run("update_status", {"backend": "lxd"})
    assert out.unit_status.name == "waiting"
    assert out.unit_status.message.startswith("LXD at the local unix socket did not answer")
    assert f"within {LIMIT:g} s" in out.unit_status.message
    assert hung.accepted and took < LIMIT + 3


def test_an_action_against_a_hung_daemon_fails_in_one_sentence_within_the_limit(machine, hung):
    uri = f"qemu+unix:///system?socket={hung.path}"
    c = charm_context()
    t0 = time.monotonic()
    with pytest.raises(testing.ActionFailed) as e:
        c.run(
            c.on.action("compose", params={"cores": 1, "memory": "512M"}),
            testing.State(config={"backend": "libvirt", "libvirt-uri": uri, "hypervisor-timeout": LIMIT}),
        )
    assert time.monotonic() - t0 < LIMIT + 3
    said = f"libvirt at {uri} did not answer the connection within {LIMIT:g} s; check that the daemon is responsive"
    assert e.value.message == said
    assert len(hung.accepted) == 1  # collect-status did not ask the silent daemon again
    assert e.value.state.unit_status == testing.WaitingStatus(said)


def test_a_bad_time_limit_blocks_naming_the_option(machine):
    out, _ = _run("config_changed", {"backend": "libvirt", "hypervisor-timeout": 0.0})
    assert out.unit_status == testing.BlockedStatus(
        "config hypervisor-timeout: value '0.0' is not a number of seconds from 1 to 3600"
    )
