"""Host preparation: hugepages, hugetlbfs, the kernel command line, /dev/kvm, hypervisor packages.

Everything touches the machine through `root` (the file system root, "/" in production) and `run`
(a command runner), so unit tests drive it against a temp directory and a fake runner. Hugepages
are set per NUMA node through sysfs and then READ BACK: the kernel gives what it can, and what it
could not give (typically 1G pages on a fragmented host) goes to a kernel command-line drop-in plus
"reboot required", so the next boot reserves them before memory fragments.
"""

from __future__ import annotations

import logging
import platform
import re
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmhost.charm_models import HugepageSetting
from vmhost.model import HostTopology, Nic
from vmhost.parse import HUGEPAGE_SIZES, human_size

log = logging.getLogger(__name__)

__all__ = [
    "GRUB_DROPIN",
    "Host",
    "HostSetupError",
    "HugepageReport",
    "SpaceMappedProvider",
    "libvirt_packages",
]

GRUB_DROPIN = "etc/default/grub.d/60-vmhost-hugepages.cfg"
# Hugepages never take the memory the host runs in: each NUMA node keeps at least max(2G, 10%) of its
# memory for the OS, at runtime and in the GRUB drop-in alike (README "Hugepages").
HOST_KEEPS_MIN = 2 * 1024**3
HOST_KEEPS_PERCENT = 10
_KB = {"2M": "2048kB", "1G": "1048576kB"}
Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]


class HostSetupError(Exception):
    """The host cannot be prepared; the message says what to fix."""


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True)


def libvirt_packages(arch: str | None = None) -> list[str]:
    """Debian/Ubuntu packages a libvirt/KVM host needs (QEMU for this architecture, seed ISO tool, UEFI)."""
    arch = arch or platform.machine()
    qemu, firmware = {
        "x86_64": ("qemu-system-x86", "ovmf"),
        "aarch64": ("qemu-system-arm", "qemu-efi-aarch64"),
        "ppc64le": ("qemu-system-ppc", None),
        "s390x": ("qemu-system-s390x", None),
    }.get(arch, ("qemu-system", None))
    pkgs = ["libvirt-daemon-system", "libvirt-clients", qemu, "qemu-utils", "genisoimage"]
    return [*pkgs, firmware] if firmware else pkgs


@dataclass(frozen=True)
class HugepageReport:
    """What the kernel actually holds after a hugepage change, per (node, size), and what needs a reboot."""

    actual: dict[tuple[int, str], int]
    wanted: dict[tuple[int, str], int]
    reboot_sizes: tuple[str, ...] = ()

    @property
    def reboot_required(self) -> bool:
        return bool(self.reboot_sizes)

    @property
    def short(self) -> dict[tuple[int, str], tuple[int, int]]:
        return {k: (w, self.actual.get(k, 0)) for k, w in self.wanted.items() if self.actual.get(k, 0) < w}

    def message(self) -> str:
        if not self.reboot_sizes:
            return ""
        return f"reboot required for {' and '.join(self.reboot_sizes)} hugepages"


@dataclass
class Host:
    """This machine, as seen through `root` and `run`."""

    root: Path = field(default_factory=lambda: Path("/"))
    run: Runner = _run
    apt: Any = None  # charmlibs.apt unless a test gives a fake
    snap: Any = None  # charmlibs.snap unless a test gives a fake

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    # --- virtualisation -------------------------------------------------------------------

    def kvm_available(self) -> bool:
        return self._p("dev/kvm").exists()

    # --- hugepages --------------------------------------------------------------------------

    def numa_nodes(self) -> list[int]:
        base = self._p("sys/devices/system/node")
        nodes = sorted(int(p.name[4:]) for p in base.glob("node[0-9]*") if p.name[4:].isdigit())
        return nodes or [0]

    def _nr_path(self, node: int, size: str) -> Path:
        return self._p(f"sys/devices/system/node/node{node}/hugepages/hugepages-{_KB[size]}/nr_hugepages")

    def supported_sizes(self) -> set[str]:
        base = self._p("sys/kernel/mm/hugepages")
        return {s for s, kb in _KB.items() if (base / f"hugepages-{kb}").exists()}

    def hugepages(self) -> dict[tuple[int, str], int]:
        """Pages the kernel holds now, per (node, size)."""
        out = {}
        for node in self.numa_nodes():
            for size in HUGEPAGE_SIZES:
                p = self._nr_path(node, size)
                if p.exists():
                    out[(node, size)] = int(p.read_text().strip() or 0)
        return out

    def wanted_hugepages(self, settings: Iterable[HugepageSetting]) -> dict[tuple[int, str], int]:
        """Per (node, size) counts; a host-wide count is split evenly, the remainder to the lowest nodes.

        Refused (HostSetupError naming the setting and the largest allowed value) when a node would be
        left less than max(2G, 10%) of its memory: nothing that large ever reaches sysfs or GRUB.
        """
        nodes = self.numa_nodes()
        room = {n: self.hugepage_room(n) for n in nodes}
        held = self.hugepages()  # sizes not configured keep what they hold
        sizes = {s.size for s in settings}
        used = {n: sum(HUGEPAGE_SIZES[z] * c for (m, z), c in held.items() if m == n and z not in sizes) for n in nodes}
        wanted: dict[tuple[int, str], int] = {}
        for s in settings:
            if s.node is not None and s.node not in nodes:
                raise HostSetupError(
                    f"hugepages names NUMA node {s.node} but this host has nodes {','.join(map(str, nodes))}"
                )
            targets = nodes if s.node is None else [s.node]
            page = HUGEPAGE_SIZES[s.size]
            fit = [(room[n] - used[n]) // page for n in targets]  # pages of this size each node can still take
            shares = _even_split(s.count, len(targets))
            if any(share > max(0, f) for share, f in zip(shares, fit, strict=True)):
                largest = _largest_even_split([max(0, f) for f in fit])
                where = "this machine" if s.node is None else f"NUMA node {s.node}"
                prefix = "" if s.node is None else f"{s.node}:"
                raise HostSetupError(
                    f"hugepages {prefix}{s.size}:{s.count} is more than {where} can hold; at most "
                    f"{prefix}{s.size}:{largest} (each NUMA node keeps max({human_size(HOST_KEEPS_MIN)}, "
                    f"{HOST_KEEPS_PERCENT}%) of its memory for the host)"
                )
            for n, share in zip(targets, shares, strict=True):
                wanted[(n, s.size)] = share
                used[n] += share * page
        return wanted

    def node_memory(self, node: int) -> int:
        """Total memory of a NUMA node in bytes: sysfs, else /proc/meminfo on a single-node host."""
        path = self._p(f"sys/devices/system/node/node{node}/meminfo")
        pattern = rf"^Node {node} MemTotal:\s+(\d+) kB"
        if not path.exists() and self.numa_nodes() == [node]:
            path, pattern = self._p("proc/meminfo"), r"^MemTotal:\s+(\d+) kB"
        m = re.search(pattern, path.read_text() if path.exists() else "", re.M)
        if not m:
            raise HostSetupError(f"cannot read the memory of NUMA node {node}; hugepages are bounded by it")
        return int(m.group(1)) * 1024

    def hugepage_room(self, node: int) -> int:
        """Bytes of hugepages a node may hold: its memory less what the host keeps, max(2G, 10%)."""
        memory = self.node_memory(node)
        return max(0, memory - max(HOST_KEEPS_MIN, memory * HOST_KEEPS_PERCENT // 100))

    def apply_hugepages(self, settings: Iterable[HugepageSetting]) -> HugepageReport:
        """Set the configured pages at runtime, read back what the kernel gave, drop-in for the rest."""
        settings = tuple(settings)
        wanted = self.wanted_hugepages(settings)
        supported = self.supported_sizes()
        for (node, size), count in sorted(wanted.items()):
            if size not in supported:
                raise HostSetupError(
                    f"this kernel has no {size} hugepages; allowed here: {', '.join(sorted(supported))}"
                )
            path = self._nr_path(node, size)
            try:
                self._write_sysfs(path, count)
            except OSError as e:  # the kernel refuses outright (EINVAL/ENOMEM): the read-back decides
                log.warning("setting %s to %d failed: %s", path, count, e)
        actual = self.hugepages()
        short_sizes = sorted({size for (node, size), count in wanted.items() if actual.get((node, size), 0) < count})
        if short_sizes:
            self._write_cmdline_dropin(settings, wanted, short_sizes)
        else:
            self._remove_cmdline_dropin()
        report = HugepageReport(actual=actual, wanted=wanted, reboot_sizes=tuple(self.pending_reboot_sizes()))
        for (node, size), (w, got) in report.short.items():
            log.warning("hugepages %s on node %d: wanted %d, the kernel gave %d", size, node, w, got)
        return report

    def _write_sysfs(self, path: Path, value: int) -> None:
        path.write_text(f"{value}\n")

    def _cmdline_args(self, wanted: dict[tuple[int, str], int], sizes: Sequence[str]) -> str:
        nodes = self.numa_nodes()
        # Keep the running kernel's default size: LXD backs VMs with the default size only, so changing it
        # would move every existing LXD hugepage VM to other pages after the reboot.
        args = [f"default_hugepagesz={self.default_hugepage_size()}"]
        for size in sizes:
            per_node = [wanted.get((n, size), 0) for n in nodes]
            count = (
                str(per_node[0])
                if len(nodes) == 1
                else ",".join(f"{n}:{c}" for n, c in zip(nodes, per_node, strict=True))
            )
            args += [f"hugepagesz={size}", f"hugepages={count}"]
        return " ".join(args)

    def _write_cmdline_dropin(self, settings, wanted, sizes: Sequence[str]) -> None:
        args = self._cmdline_args(wanted, sizes)
        path = self._p(GRUB_DROPIN)
        text = (
            "# Written by the vm-host charm: hugepages the kernel could not allocate at runtime.\n"
            f'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT {args}"\n'
        )
        if path.exists() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self._update_grub()

    def _remove_cmdline_dropin(self) -> None:
        path = self._p(GRUB_DROPIN)
        if path.exists():
            path.unlink()
            self._update_grub()

    def _update_grub(self) -> None:
        try:
            self.run(["update-grub"])
        except (OSError, subprocess.CalledProcessError) as e:
            log.warning("update-grub failed (%s); the kernel command line takes effect once grub is updated", e)

    def pending_reboot_sizes(self) -> list[str]:
        """Hugepage sizes in the drop-in whose arguments the running kernel was not booted with."""
        path = self._p(GRUB_DROPIN)
        if not path.exists():
            return []
        m = re.search(r'GRUB_CMDLINE_LINUX_DEFAULT="\$GRUB_CMDLINE_LINUX_DEFAULT ([^"]*)"', path.read_text())
        args = m.group(1).split() if m else []
        cmdline_path = self._p("proc/cmdline")
        booted = set(cmdline_path.read_text().split()) if cmdline_path.exists() else set()
        sizes, current = [], None
        for arg in args:
            if arg.startswith("hugepagesz="):
                current = arg.split("=", 1)[1]
            if (
                arg.startswith("hugepages=")
                and current
                and (f"hugepagesz={current}" not in booted or arg not in booted)
            ):
                sizes.append(current)
        return sorted(set(sizes))

    def reboot_required(self) -> bool:
        return bool(self.pending_reboot_sizes())

    # --- hugetlbfs ----------------------------------------------------------------------------

    def _mounts(self) -> dict[str, tuple[str, str]]:
        path = self._p("proc/mounts")
        out = {}
        for line in path.read_text().splitlines() if path.exists() else ():
            parts = line.split()
            if len(parts) >= 4:
                out[parts[1]] = (parts[2], parts[3])
        return out

    def default_hugepage_size(self) -> str:
        meminfo = self._p("proc/meminfo")
        m = re.search(r"^Hugepagesize:\s+(\d+) kB", meminfo.read_text() if meminfo.exists() else "", re.M)
        return {2048: "2M", 1048576: "1G"}.get(int(m.group(1)) if m else 2048, "2M")

    def ensure_hugetlbfs(self, sizes: Iterable[str] = ()) -> list[str]:
        """hugetlbfs at /dev/hugepages (default size) and /dev/hugepages-1G etc. for the others; returns new mounts.

        libvirt finds hugetlbfs mounts when it starts, so a new mount means libvirtd needs a restart.
        """
        mounts = self._mounts()
        wanted = {"/dev/hugepages": None}
        default = self.default_hugepage_size()
        for size in sizes:
            if size != default:
                wanted[f"/dev/hugepages-{size}"] = size
        made = []
        for target, size in wanted.items():
            if mounts.get(target, ("",))[0] == "hugetlbfs":
                continue
            self._p(target).mkdir(parents=True, exist_ok=True)
            opts = ["-o", f"pagesize={size}"] if size else []
            self.run(["mount", "-t", "hugetlbfs", *opts, "hugetlbfs", target])
            made.append(target)
        return made

    # --- packages -----------------------------------------------------------------------------

    def missing_packages(self, packages: Iterable[str]) -> list[str]:
        missing = []
        for p in packages:
            try:
                out = self.run(["dpkg-query", "-W", "-f=${Status}", p]).stdout
            except (OSError, subprocess.CalledProcessError):
                out = ""
            if "install ok installed" not in out:
                missing.append(p)
        return missing

    def libvirt_installed(self) -> bool:
        return self._p("usr/sbin/libvirtd").exists()

    def ensure_libvirt(self) -> list[str]:
        """Install the libvirt/KVM packages that are missing (charmlibs-apt); returns what was installed."""
        missing = self.missing_packages(libvirt_packages())
        if missing:
            apt = self.apt
            if apt is None:
                from charmlibs import apt
            try:
                apt.add_package(missing, update_cache=True)
            except Exception as e:
                raise HostSetupError(f"installing {', '.join(missing)} failed: {e}") from e
        return missing

    def lxd_installed(self) -> bool:
        return self._p("snap/bin/lxc").exists() or self._p("usr/bin/lxc").exists()

    def ensure_lxd(self, channel: str) -> bool:
        """Install or move the LXD snap to `channel` (charmlibs-snap); True when something changed."""
        snap = self.snap
        if snap is None:
            from charmlibs import snap
        try:
            return bool(snap.ensure_installed("lxd", channel=channel, update=False))
        except Exception as e:
            raise HostSetupError(f"installing the LXD snap from {channel} failed: {e}") from e

    def restart_libvirtd(self) -> None:
        """After a new hugetlbfs mount (libvirt only scans mounts at start); best effort."""
        try:
            self.run(["systemctl", "try-restart", "libvirtd.service"])
        except (OSError, subprocess.CalledProcessError) as e:
            log.warning("could not restart libvirtd (%s); restart it to use the new hugetlbfs mounts", e)


def _even_split(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares differing by at most one, the larger shares first (lowest nodes)."""
    share, extra = divmod(total, parts)
    return [share + (1 if i < extra else 0) for i in range(parts)]


def _largest_even_split(fit: list[int]) -> int:
    """The largest total whose even split (larger shares first) gives no part more than its `fit`."""
    low = min(fit)
    extra = 0
    while extra < len(fit) - 1 and fit[extra] > low:
        extra += 1
    return low * len(fit) + extra


def lxd_supports_vms(client=None) -> bool:
    """Whether the LXD server can run virtual machines (it lists "virtual-machine" among instance types)."""
    if client is None:
        import pylxd

        client = pylxd.Client()
    env = client.host_info.get("environment", {})
    return "virtual-machine" in (env.get("instance_types") or ())


class SpaceMappedProvider:
    """A provider whose discovered NICs carry the Juju space the operator mapped their bridge to.

    The hypervisor does not know Juju spaces; the `space-bridges` config does. Everything else is
    delegated unchanged.
    """

    def __init__(self, provider, space_bridges: dict[str, str]):
        self._provider = provider
        self._bridge_space = {bridge: space for space, bridge in space_bridges.items()}

    def __getattr__(self, name):
        return getattr(self._provider, name)

    def discover(self) -> HostTopology:
        topo = self._provider.discover()
        nics = tuple(
            Nic.from_dict({**n.to_dict(), "space": self._bridge_space[n.name]}) if n.name in self._bridge_space else n
            for n in topo.nics
        )
        return HostTopology(nodes=topo.nodes, nics=nics, storage_pools=topo.storage_pools)
