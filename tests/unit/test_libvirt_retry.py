"""Transient libvirt errors are retried, bounded; everything else fails at once (fakes, no daemon)."""

from __future__ import annotations

import pytest
import tenacity

from vmhost.providers import base

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmhost.providers import libvirt as lv  # noqa: E402


def _error(code: int, msg: str = "boom") -> libvirt.libvirtError:
    e = libvirt.libvirtError(msg)
    # libvirtError takes the process's last libvirt error as its text when there is one (an earlier test's
    # dropped connection, say), so the text is set here, not left to whatever ran before.
    e.args = (msg,)
    e.err = (code, 0, msg, 0, "", None, None, 0, 0)
    return e


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(base, "RETRY_WAIT", tenacity.wait_none())


def _flaky(errors: list[BaseException]):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "ok"

    return fn, calls


def test_operation_timeout_and_connection_refused_are_retried():
    fn, calls = _flaky([_error(libvirt.VIR_ERR_OPERATION_TIMEOUT), _error(libvirt.VIR_ERR_RPC, "Connection refused")])
    assert lv.LibvirtProvider()._call(fn) == "ok"
    assert len(calls) == 3


def test_retries_are_bounded():
    fn, calls = _flaky([_error(libvirt.VIR_ERR_OPERATION_TIMEOUT) for _ in range(10)])
    with pytest.raises(libvirt.libvirtError):
        lv.LibvirtProvider()._call(fn)
    assert len(calls) == base.RETRY_ATTEMPTS


def test_other_errors_are_not_retried():
    fn, calls = _flaky([_error(libvirt.VIR_ERR_NO_DOMAIN)])
    with pytest.raises(libvirt.libvirtError):
        lv.LibvirtProvider()._call(fn)
    assert len(calls) == 1


def test_connect_failure_is_one_clear_provider_error(monkeypatch):
    attempts = []

    def refuse(uri):
        attempts.append(uri)
        raise _error(libvirt.VIR_ERR_SYSTEM_ERROR, "Failed to connect socket: Connection refused")

    monkeypatch.setattr(libvirt, "open", refuse)
    with pytest.raises(lv.ProviderError, match=r"cannot connect to libvirt at qemu\+tcp://h/system"):
        lv.LibvirtProvider("qemu+tcp://h/system").conn  # noqa: B018
    assert len(attempts) == base.RETRY_ATTEMPTS


def test_remote_uri_is_not_read_through_local_sysfs():
    assert lv.LibvirtProvider().local and lv.LibvirtProvider("qemu:///system").local
    assert not lv.LibvirtProvider("qemu+ssh://virsh@host/system").local
