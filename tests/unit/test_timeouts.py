"""Time limits on hypervisor calls: the bounded runner, libvirt's wrapped connection, LXD's requests (no daemon)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from vmhost import cli
from vmhost.providers import base
from vmhost.providers.base import ComposeError
from vmhost.timeouts import BoundedRunner, HypervisorTimeout, seconds

FOREVER = threading.Event()  # never set: a call waiting on it stands for a daemon that never answers


# ---- limits from the operator --------------------------------------------------------------------


@pytest.mark.parametrize(("given", "value"), [("2", 2.0), ("2.5", 2.5), (" 30s", 30.0), (3600, 3600.0), ("1", 1.0)])
def test_a_time_limit_is_a_number_of_seconds_within_bounds(given, value):
    assert seconds(given, "--timeout") == value


@pytest.mark.parametrize("given", ["abc", "", "nan", "inf", "-1", "0", "0.5", "3601", "1e308", "9" * 400])
def test_a_bad_time_limit_is_one_sentence_naming_the_flag_and_the_range(given):
    with pytest.raises(ValueError) as e:
        seconds(given, "--timeout")
    msg = str(e.value)
    assert msg.startswith("--timeout ") and msg.endswith("is not a number of seconds from 1 to 3600")
    assert len(msg) < 120


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["--timeout", "0"], {}, "vmhost: error: --timeout '0' is not a number of seconds from 1 to 3600"),
        ([], {"VMHOST_TIMEOUT": "soon"}, "vmhost: error: VMHOST_TIMEOUT 'soon' is not a number of seconds from 1"),
        (["--lock-timeout", "-1"], {}, "vmhost: error: --lock-timeout '-1' is not a number of seconds from 0 to 3600"),
        ([], {"VMHOST_LOCK_TIMEOUT": "x"}, "vmhost: error: VMHOST_LOCK_TIMEOUT 'x' is not a number of seconds"),
    ],
)
def test_the_cli_refuses_a_bad_limit_in_one_line(argv, env, says, monkeypatch, capsys):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["list", "--backend", "libvirt", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(says) and err.count("\n") == 1


def test_a_lock_file_in_a_missing_directory_is_one_line_and_the_directory_is_not_made(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "nonexistent" / "dir" / "lock"))
    assert cli.main(["gc", "--backend", "libvirt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"vmhost: error: the host lock directory {tmp_path}/nonexistent/dir does not exist;")
    assert err.count("\n") == 1 and not (tmp_path / "nonexistent").exists()


def test_the_cli_hands_its_limits_to_the_provider_and_the_lock(monkeypatch, tmp_path):
    seen = {}

    def provider(settings):
        seen.update(settings.options, timeout=settings.timeout)
        raise HypervisorTimeout("stop here")

    monkeypatch.setattr(cli, "make_provider", provider)
    monkeypatch.setenv("VMHOST_LOCK_TIMEOUT", "7")
    args = cli.build_parser().parse_args(["gc", "--timeout", "5"])
    with pytest.raises(HypervisorTimeout):
        cli._host(args)
    assert seen["timeout"] == 5.0
    monkeypatch.setattr(cli, "make_provider", lambda settings: object())
    assert cli._host(cli.build_parser().parse_args(["gc"])).lock_timeout == 7.0


# ---- the bounded runner --------------------------------------------------------------------------


def test_a_call_that_never_returns_is_given_up_after_the_limit_naming_daemon_and_call():
    runner = BoundedRunner("libvirt at qemu:///x", timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(HypervisorTimeout) as e:
        runner.call(FOREVER.wait, what="getCapabilities")
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert str(e.value) == (
        "libvirt at qemu:///x did not answer getCapabilities within 0.3 s; check that the daemon is responsive"
    )


def test_after_a_timeout_every_call_fails_at_once_without_running():
    runner = BoundedRunner("d", timeout=0.2)
    with pytest.raises(HypervisorTimeout):
        runner.call(FOREVER.wait)
    ran = []
    t0 = time.monotonic()
    with pytest.raises(HypervisorTimeout, match=r"did not answer wait within 0\.2 s"):
        runner.call(ran.append, 1)
    assert time.monotonic() - t0 < 0.1 and ran == []


def test_results_and_errors_come_back_as_they_are():
    runner = BoundedRunner("d", timeout=5)
    assert runner.call(lambda a, b=0: a + b, 1, b=2) == 3
    with pytest.raises(KeyError, match="boom"):
        runner.call({}.__getitem__, "boom")
    assert runner.call(threading.current_thread) is not threading.current_thread()  # it ran on the worker


def test_a_longer_bound_per_call_is_honoured():
    runner = BoundedRunner("d", timeout=0.1)
    assert runner.call(time.sleep, 0.3, bound=5) is None


def test_a_process_exits_promptly_though_a_call_is_still_stuck():
    code = (
        "import threading\n"
        "from vmhost.timeouts import BoundedRunner, HypervisorTimeout\n"
        "try:\n"
        "    BoundedRunner('d', 0.2).call(threading.Event().wait)\n"
        "except HypervisorTimeout:\n"
        "    print('gave up')\n"
    )
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout == "gave up\n" and r.returncode == 0
    assert time.monotonic() - t0 < 10


# ---- libvirt: every call on the connection, and on what it returns, goes through the runner ------

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")
from vmhost.providers import libvirt as lv  # noqa: E402


@pytest.fixture
def recorded(monkeypatch):
    """A provider on libvirt's in-process test driver whose runner records (call, bound) of every call."""
    p = lv.LibvirtProvider("test:///default", timeout=3)
    calls: list[tuple[str, float | None]] = []
    real = p._runner.call

    def call(fn, *args, bound=None, what="", **kw):
        calls.append((what, bound))
        return real(fn, *args, bound=bound, what=what, **kw)

    monkeypatch.setattr(p._runner, "call", call)
    yield p, calls
    p.close()


def test_the_connection_and_every_call_on_it_and_its_objects_are_bounded(recorded):
    p, calls = recorded
    vms = p.list_vms()
    assert [v.name for v in vms] == ["test"]
    names = [c for c, _ in calls]
    assert names[0] == "the connection"
    assert {"getCapabilities", "listAllDomains", "XMLDesc", "state"} <= set(names)
    assert all(b == 3 for c, b in calls if c != "the connection")
    dom = p.conn.lookupByName("test")
    assert isinstance(dom, lv._Bounded)  # objects a call returns are wrapped in turn
    dom.destroy()
    dom.create()
    assert calls[-2:] == [("destroy", lv.OPERATION_TIMEOUT), ("create", lv.OPERATION_TIMEOUT)]


def test_a_connection_that_never_answers_is_one_attempt_then_one_sentence(monkeypatch):
    opened = []

    def hang(uri):
        opened.append(uri)
        FOREVER.wait()

    monkeypatch.setattr(libvirt, "open", hang)
    p = lv.LibvirtProvider("qemu+unix:///system?socket=/x", timeout=1)
    t0 = time.monotonic()
    with pytest.raises(HypervisorTimeout, match=r"^libvirt at qemu\+unix:///system\?socket=/x did not answer the conn"):
        p.list_vms()
    assert time.monotonic() - t0 < 2.5 and len(opened) == 1  # a timeout is never retried
    t0 = time.monotonic()
    with pytest.raises(HypervisorTimeout):
        p.discover()
    p.close()  # closing a hung provider does not wait either
    assert time.monotonic() - t0 < 0.1 and len(opened) == 1


def test_retries_of_transient_errors_stop_once_the_limit_has_passed(monkeypatch):
    import tenacity

    monkeypatch.setattr(base, "RETRY_WAIT", tenacity.wait_fixed(0.6))
    e = libvirt.libvirtError("Connection refused")
    e.err = (libvirt.VIR_ERR_SYSTEM_ERROR, 0, "Connection refused", 0, "", None, None, 0, 0)
    attempts = []

    def refuse(uri):
        attempts.append(uri)
        raise e

    monkeypatch.setattr(libvirt, "open", refuse)
    with pytest.raises(lv.ProviderError, match="cannot connect"):
        lv.LibvirtProvider("qemu:///system", timeout=1).conn  # noqa: B018
    assert 2 <= len(attempts) < base.RETRY_ATTEMPTS  # at 0, 0.6 and 1.2 s: past the 1 s limit, not all five attempts


# ---- LXD: a request that times out is not retried, and the provider stops asking -----------------


def test_an_lxd_request_that_times_out_is_not_retried_and_compose_stops_asking(monkeypatch, tmp_path):
    import requests

    from tests.unit.test_lxd_calls import FakeLxd, host, request
    from vmhost.providers import lxd as lxdmod

    fake = FakeLxd(projects=("default", "vmhost"))
    monkeypatch.setattr(lxdmod.LxdProvider, "_session", lambda self: fake)
    answer = fake.request

    def silent_on_create(method, url, **kw):
        if method == "POST" and url.endswith("/instances"):
            fake.calls.append((method, "timed out"))
            raise requests.ReadTimeout("Read timed out. (read timeout=30)")
        return answer(method, url, **kw)

    monkeypatch.setattr(fake, "request", silent_on_create)
    vmhost = host(tmp_path)
    with pytest.raises(ComposeError) as e:
        vmhost.compose(request(name="vm-1", storage="root:1G,data:1G"))
    assert isinstance(e.value.cause, HypervisorTimeout)
    assert "LXD at the local unix socket did not answer POST /instances within 30 s" in str(e.value)
    assert fake.calls[-1] == ("POST", "timed out")  # once, and nothing after it: the undos fail at once
    assert fake.calls.count(("POST", "timed out")) == 1
    n = len(fake.calls)
    with pytest.raises(HypervisorTimeout):
        vmhost.provider.list_vms()
    assert len(fake.calls) == n


# ---- name lookups: no socket timeout covers them ---------------------------------------------------


def test_a_name_lookup_that_never_ends_is_given_up_after_the_limit(monkeypatch):
    from vmhost import timeouts

    assert timeouts.resolve("127.0.0.1", 80, 5)[0][4] == ("127.0.0.1", 80)  # a lookup that answers is returned
    monkeypatch.setattr(timeouts.socket, "getaddrinfo", lambda *a, **k: FOREVER.wait())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"looking up lxd\.test took longer than 0\.3 s"):
        timeouts.resolve("lxd.test", 8443, 0.3)
    assert time.monotonic() - t0 < 2


def test_a_remote_lxd_whose_name_never_resolves_is_one_sentence_within_the_limit(monkeypatch, tmp_path):
    from vmhost import timeouts
    from vmhost.providers.lxd import LxdProvider

    monkeypatch.setattr(timeouts.socket, "getaddrinfo", lambda *a, **k: FOREVER.wait())
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x"), key.write_text("x")
    provider = LxdProvider(uri="https://lxd.test:8443", cert=(str(cert), str(key)), timeout=1)
    t0 = time.monotonic()
    with pytest.raises(
        HypervisorTimeout, match=r"LXD at https://lxd\.test:8443: looking up lxd\.test took longer than 1 s"
    ):
        provider.list_vms()
    assert time.monotonic() - t0 < 3


def test_a_hung_ip_command_costs_a_bounded_wait_and_sysfs_still_names_the_nics(monkeypatch, tmp_path):
    import subprocess as sp

    from vmhost.providers import libvirt as lv

    seen = {}

    def run(cmd, **kwargs):
        seen["timeout"] = kwargs.get("timeout")
        raise sp.TimeoutExpired(cmd, kwargs.get("timeout") or 0)

    monkeypatch.setattr(lv.subprocess, "run", run)
    (tmp_path / "eth7" / "device").mkdir(parents=True)
    monkeypatch.setattr(lv, "_SYSFS_NET", tmp_path)
    assert "eth7" in [n.name for n in lv._local_nics()]
    assert seen["timeout"] and seen["timeout"] <= 10
