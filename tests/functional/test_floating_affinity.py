"""Rule 1 on the real libvirtd: floating VMs never run on a thread a pinned VM owns, live or after a restart.

Affinity is read from outside vm-host (`virsh vcpuinfo`, `virsh emulatorpin`, `virsh dumpxml --inactive`),
so these would fail if the provider only recorded the pins in its own metadata.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import xml.etree.ElementTree as ET

import pytest

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

from vmhost.model import Policy, VmRequest  # noqa: E402
from vmhost.parse import parse_cpuset  # noqa: E402
from vmhost.providers.registry import ProviderSettings, make_provider  # noqa: E402
from vmhost.service import VmHost  # noqa: E402

URI = "qemu:///system"


def _virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def vmhost(libvirt_uri, vm_names, tmp_path):
    """VmHost on the real libvirtd. Other helpers' floating VMs share this small host, so the overcommit
    ratio leaves room for them; it changes capacity only, never which threads are shared."""
    policy = Policy(cpu_overcommit_ratio=8.0)
    host = VmHost(make_provider(ProviderSettings("libvirt", uri=libvirt_uri)), policy, lock_path=str(tmp_path / "lock"))
    yield host
    host.provider.close()


def _live_vcpu_affinity(name: str) -> list[set[int]]:
    """Per vCPU, the host threads it may run on, as `virsh vcpuinfo` shows them ("y-" per host CPU)."""
    maps = re.findall(r"^CPU Affinity:\s+([y-]+)\s*$", _virsh("vcpuinfo", name), re.MULTILINE)
    assert maps, f"virsh vcpuinfo {name} showed no affinity"
    return [{i for i, c in enumerate(m) if c == "y"} for m in maps]


def _emulator_affinity(name: str, scope: str) -> set[int]:
    """`virsh emulatorpin NAME --live|--config`: the table row " *: 0-1"."""
    m = re.search(r"^\s*\*:\s*(\S+)\s*$", _virsh("emulatorpin", name, scope), re.MULTILINE)
    assert m, f"virsh emulatorpin {name} {scope} showed no affinity"
    return set(parse_cpuset(m.group(1)))


def _config_affinity(name: str, all_threads: set[int]) -> tuple[list[set[int]], set[int]]:
    """(per vCPU, emulator) affinity a fresh start would apply, from `virsh dumpxml --inactive`.

    libvirt's rules: a <vcpupin> wins for its vCPU, else <vcpu cpuset>, else every thread; the emulator
    follows <emulatorpin>, else <vcpu cpuset>.
    """
    dom = ET.fromstring(_virsh("dumpxml", "--inactive", name))
    vcpu = dom.find("vcpu")
    default = set(parse_cpuset(vcpu.get("cpuset"))) if vcpu.get("cpuset") else set(all_threads)
    pins = {int(p.get("vcpu")): set(parse_cpuset(p.get("cpuset"))) for p in dom.findall("cputune/vcpupin")}
    emu = dom.find("cputune/emulatorpin")
    emulator = set(parse_cpuset(emu.get("cpuset"))) if emu is not None else default
    return [pins.get(i, default) for i in range(int(vcpu.text))], emulator


def _assert_confined(name: str, allowed: set[int], all_threads: set[int]) -> None:
    live = _live_vcpu_affinity(name)
    assert live and all(a == allowed for a in live), f"{name} live vCPU affinity {live}, want {allowed}"
    assert _emulator_affinity(name, "--live") == allowed
    vcpus, emulator = _config_affinity(name, all_threads)
    assert vcpus and all(a == allowed for a in vcpus), f"{name} config vCPU affinity {vcpus}, want {allowed}"
    assert emulator == allowed and _emulator_affinity(name, "--config") == allowed


def test_pinned_vm_takes_its_thread_away_from_floating_vms_and_gives_it_back(vmhost, vm_names):
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine")
    all_threads = set(vmhost.topology().threads)
    floating = vmhost.compose(VmRequest.from_dict({"cores": 1, "memory": "64M", "name": vm_names("ff")}), start=True)
    made = [floating.name]
    try:
        idle = vmhost.compose(VmRequest.from_dict({"cores": 2, "memory": "64M", "name": vm_names("fs")}))
        made.append(idle.name)
        assert floating.allocation.pinned is None and floating.state == "running" and idle.state == "stopped"
        shared = set(vmhost.shared_threads())
        if len(shared) < 2:
            pytest.skip(f"other VMs pin all but {sorted(shared)} of this host's threads; need two unpinned threads")
        _assert_confined(floating.name, shared, all_threads)
        assert _config_affinity(idle.name, all_threads) == ([shared, shared], shared)

        thread = max(shared)
        pinned = vmhost.compose(
            VmRequest.from_dict({"cores": 1, "memory": "64M", "pinned_cores": [thread], "name": vm_names("fp")}),
            start=True,
        )
        made.append(pinned.name)
        assert pinned.allocation.pinned == (thread,)
        assert _live_vcpu_affinity(pinned.name) == [{thread}]

        # The floating VMs left the pinned thread, now and for their next start.
        _assert_confined(floating.name, shared - {thread}, all_threads)
        assert not any(thread in a for a in _live_vcpu_affinity(floating.name))
        rest = shared - {thread}
        assert _config_affinity(idle.name, all_threads) == ([rest, rest], rest)

        vmhost.decompose(pinned.name)
        made.remove(pinned.name)
        _assert_confined(floating.name, shared, all_threads)
        assert _config_affinity(idle.name, all_threads) == ([shared, shared], shared)

        # Survives a restart: the config pins are what the next start applies.
        vmhost.stop(floating.name, force=True)
        vmhost.start(floating.name)
        _assert_confined(floating.name, shared, all_threads)
    finally:
        for name in reversed(made):
            with contextlib.suppress(Exception):
                vmhost.decompose(name)


def test_confine_floating_is_idempotent_refuses_bad_sets_and_leaves_foreign_domains_alone(
    vmhost, vm_names, libvirt_conn
):
    from vmhost.providers.base import ProviderError

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine")
    all_threads = set(vmhost.topology().threads)
    provider = vmhost.provider
    floating = vmhost.compose(VmRequest.from_dict({"cores": 2, "memory": "64M", "name": vm_names("ff")}))
    foreign = vm_names("fx")
    libvirt_conn.defineXML(
        f"<domain type='kvm'><name>{foreign}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )
    try:
        shared = vmhost.shared_threads()
        provider.confine_floating(shared)
        before = _virsh("dumpxml", "--inactive", floating.name)
        provider.confine_floating(shared)
        assert _virsh("dumpxml", "--inactive", floating.name) == before
        assert _config_affinity(floating.name, all_threads) == ([set(shared)] * 2, set(shared))

        with pytest.raises(ProviderError, match="no host thread is left for floating VM"):
            provider.confine_floating(())
        with pytest.raises(ProviderError, match=f"not CPUs of this host; it has CPUs 0-{max(all_threads)}"):
            provider.confine_floating((*shared, 4096))
        assert _virsh("dumpxml", "--inactive", floating.name) == before  # refused sets changed nothing

        foreign_xml = ET.fromstring(_virsh("dumpxml", "--inactive", foreign))
        assert foreign_xml.find("cputune") is None and foreign_xml.find("vcpu").get("cpuset") is None
    finally:
        with contextlib.suppress(Exception):
            vmhost.decompose(floating.name)


def _foreign_running(libvirt_conn, name: str) -> None:
    """A VM defined and started with plain virsh-style XML: no vm-host metadata, no pins of its own."""
    dom = libvirt_conn.defineXML(
        f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type></os><devices><memballoon model='none'/></devices></domain>"
    )
    dom.create()


def test_foreign_running_vm_is_kept_off_a_pinned_thread_live_and_its_definition_is_left_alone(
    vmhost, vm_names, libvirt_conn
):
    """Defect 5: a VM vm-host did not make leaves the thread vm-host pins (live), and gets it back after."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine")
    foreign = vm_names("fx")
    _foreign_running(libvirt_conn, foreign)
    before = _virsh("dumpxml", "--inactive", foreign)
    shared = set(vmhost.shared_threads())
    if len(shared) < 2:
        pytest.skip(f"other VMs pin all but {sorted(shared)} of this host's threads; need two unpinned threads")
    thread = max(shared)
    assert any(thread in a for a in _live_vcpu_affinity(foreign))  # it runs anywhere to begin with
    pinned = vmhost.compose(
        VmRequest.from_dict({"cores": 1, "memory": "64M", "pinned_cores": [thread], "name": vm_names("fp")}),
        start=True,
    )
    try:
        assert _live_vcpu_affinity(foreign) == [shared - {thread}]
        assert _emulator_affinity(foreign, "--live") == shared - {thread}
        assert _virsh("dumpxml", "--inactive", foreign) == before  # its definition is not ours to change
        assert vmhost.resources()["shared_pinned_threads"] == []
    finally:
        vmhost.decompose(pinned.name)
    assert _live_vcpu_affinity(foreign) == [shared]


def test_opting_out_leaves_foreign_vms_where_they_are_and_reports_the_shared_thread(
    libvirt_uri, vm_names, libvirt_conn, tmp_path
):
    from vmhost.resources_view import render_view, summary_line

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine")
    policy = Policy(cpu_overcommit_ratio=8.0, confine_foreign_vms=False)
    host = VmHost(make_provider(ProviderSettings("libvirt", uri=libvirt_uri)), policy, lock_path=str(tmp_path / "lock"))
    foreign = vm_names("fx")
    _foreign_running(libvirt_conn, foreign)
    everywhere = _live_vcpu_affinity(foreign)
    shared = set(host.shared_threads())
    if len(shared) < 2:
        pytest.skip(f"other VMs pin all but {sorted(shared)} of this host's threads; need two unpinned threads")
    thread = max(shared)
    pinned = host.compose(
        VmRequest.from_dict({"cores": 1, "memory": "64M", "pinned_cores": [thread], "name": vm_names("fp")}),
        start=True,
    )
    try:
        assert _live_vcpu_affinity(foreign) == everywhere and thread in everywhere[0]
        res = host.resources()
        mine = [s for s in res["shared_pinned_threads"] if s["pinned_by"] == pinned.name]
        assert mine == [{"thread": thread, "pinned_by": pinned.name, "shared_with": [foreign]}]
        assert f"pinned thread {thread} of {pinned.name} is shared with {foreign}" in render_view(res)
        assert foreign in summary_line(res) and "shared with" in summary_line(res)
    finally:
        host.decompose(pinned.name)
        host.provider.close()
