"""An in-memory Provider for unit tests of everything above the provider (service, CLI, charm, relation)."""

from __future__ import annotations

import subprocess
from dataclasses import replace

from vmhost.model import HostTopology, Nic, StoragePool
from vmhost.providers.base import ComposePlan, NotFound, VmInfo

GIB = 1024**3

# Two NUMA nodes, 4 cores x 2 threads each, 16 GiB each, 2M and 1G hugepages, a bridge, an SR-IOV NIC.
TWO_NODE_HOST = {
    "nodes": [
        {
            "id": n,
            "memory": 16 * GIB,
            "cores": [{"id": c, "threads": [n * 4 + c, n * 4 + c + 8]} for c in range(4)],
            "hugepages": {"2M": 1024, "1G": 4},
        }
        for n in (0, 1)
    ],
    "nics": [
        {"name": "br0", "kind": "bridge", "numa_node": None, "addresses": ["10.20.0.5/24"], "space": "public"},
        {"name": "enp65s0f0", "kind": "physical", "numa_node": 1, "sriov_max_vfs": 4, "addresses": []},
    ],
    "storage_pools": [
        {"name": "default", "driver": "dir", "total": 500 * 10**9, "used": 0},
        {"name": "ssd", "driver": "dir", "total": 100 * 10**9, "used": 0},
    ],
}


class FakeProvider:
    """Keeps VMs in a dict; `fail_compose` makes the next compose raise, like a backend failing mid-way."""

    name = "fake"

    def __init__(self, topology: dict | HostTopology | None = None, uri: str | None = None, **options):
        if not isinstance(topology, HostTopology):
            topology = HostTopology.from_dict(topology or TWO_NODE_HOST)
        self.topology = topology
        self.vms: dict[str, VmInfo] = {}
        self.composed: list[ComposePlan] = []
        self.decomposed: list[str] = []
        self.orphans: list[str] = []
        self.fail_compose: Exception | None = None
        self.confined: list[tuple[int, ...]] = []  # every confine_floating call, in order
        self.confined_foreign: list[bool] = []  # its foreign flag
        self.fail_confine: Exception | None = None
        self.closed = 0
        self.uri = uri
        self.options = options

    def discover(self) -> HostTopology:
        return self.topology

    @property
    def plans(self) -> dict[str, ComposePlan]:
        return {p.allocation.name: p for p in self.composed}

    def list_vms(self) -> list[VmInfo]:
        return list(self.vms.values())

    def compose(self, plan: ComposePlan) -> VmInfo:
        if self.fail_compose:
            raise self.fail_compose
        self.composed.append(plan)
        a = plan.allocation
        macs = tuple(f"52:54:00:00:{len(self.composed):02x}:{i:02x}" for i in range(len(a.nics)))
        a = replace(a, nics=tuple(replace(n, mac=m) for n, m in zip(a.nics, macs, strict=True)))
        vm = VmInfo(name=a.name, state="running" if plan.start else "stopped", allocation=a, macs=macs)
        self.vms[a.name] = vm
        return vm

    def decompose(self, name: str) -> None:
        if name not in self.vms:
            raise NotFound(f"no VM named {name!r} on this host")
        del self.vms[name]
        self.decomposed.append(name)

    def start(self, name: str) -> None:
        self.vms[name] = replace(self.vms[name], state="running")

    def stop(self, name: str, force: bool = False) -> None:
        self.vms[name] = replace(self.vms[name], state="stopped")

    def storage_pools(self) -> list[StoragePool]:
        return list(self.topology.storage_pools)

    def networks(self) -> list[Nic]:
        return list(self.topology.nics)

    def gc(self) -> list[str]:
        removed, self.orphans = self.orphans, []
        return removed

    def close(self) -> None:
        self.closed += 1

    def confine_floating(self, threads: tuple[int, ...], foreign: bool = False) -> None:
        self.confined.append(tuple(threads))
        self.confined_foreign.append(foreign)
        if self.fail_confine:
            raise self.fail_confine


class CommandRecorder:
    """A command runner for vmhost.host.Host: records every command; dpkg-query knows `installed` packages."""

    def __init__(self, installed=()):
        self.calls: list[list[str]] = []
        self.installed = set(installed)

    def __call__(self, cmd):
        cmd = list(cmd)
        self.calls.append(cmd)
        if cmd[0] == "dpkg-query":
            if cmd[-1] not in self.installed:
                raise subprocess.CalledProcessError(1, cmd)
            return subprocess.CompletedProcess(cmd, 0, "install ok installed", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")
