"""Host preparation: hugepages, hugetlbfs, the kernel command line, /dev/kvm, hypervisor packages.

Everything touches the machine through `root` (the file system root, "/" in production) and `run`
(a command runner), so unit tests drive it against a temp directory and a fake runner. Hugepages
are set per NUMA node through sysfs and then READ BACK: the kernel gives what it can, and what it
could not give (typically 1G pages on a fragmented host) goes to a kernel command-line drop-in plus
"reboot required", so the next boot reserves them before memory fragments.

Over ~400 lines on purpose: one machine's preparation (hugepages per node, hugetlbfs, kernel command
line, packages with their transient-failure retries) is one Host class over one injectable root and runner.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vmhost.model import HugepageSetting, even_split
from vmhost.parse import HUGEPAGE_SIZES, human_size
from vmhost.providers.base import with_retries
from vmhost.timeouts import DEFAULT_CALL_TIMEOUT

log = logging.getLogger(__name__)

__all__ = [
    "GRUB_DROPIN",
    "Host",
    "HostSetupError",
    "HugepageReport",
    "libvirt_packages",
    "older_channel",
    "systemd_unit",
]

GRUB_DROPIN = "etc/default/grub.d/60-vmhost-hugepages.cfg"
# Hugepages never take the memory the host runs in: each NUMA node keeps at least max(2G, 10%) of its
# memory for the OS, at runtime and in the GRUB drop-in alike (README "Hugepages").
HOST_KEEPS_MIN = 2 * 1024**3
HOST_KEEPS_PERCENT = 10
_KB = {"2M": "2048kB", "1G": "1048576kB"}
Runner = Callable[[Sequence[str]], subprocess.CompletedProcess]
T = TypeVar("T")
RUN_TIMEOUT = 300  # s, for any one host command (mount, update-grub, systemctl, dpkg-query)
# Waits between in-hook attempts at a step that failed transiently (a held dpkg lock, an unreachable
# archive or snap store): "retry a small number of times, with short delays" (ops docs, Handle errors).
RETRY_WAITS = (5.0, 15.0)
RETRY_BUDGET = math.inf  # attempts are bounded by RETRY_WAITS; see Host._retrying


class HostSetupError(Exception):
    """The host cannot be prepared; the message says what is wrong and how to fix it.

    `transient`: the cause may clear by itself (a held dpkg lock, an unreachable archive or snap store).
    The charm shows Waiting and the next hook tries again; otherwise it is Blocked until the operator acts.
    """

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:  # callers handle a failed command; a hung one is one too
        raise subprocess.CalledProcessError(-9, e.cmd, e.output, f"timed out after {RUN_TIMEOUT} s") from None


def _detail(e: BaseException) -> str:
    """The last non-empty line of what a failed command or library said (apt and snapd put the cause there)."""
    text = getattr(e, "stderr", None) or getattr(e, "message", None) or str(e)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


_DPKG_LOCK = re.compile(r"Could not get lock|Unable to acquire the dpkg|Unable to lock|is another process using it")
_HELD_BY = re.compile(r"held by process \d+ \([^)]*\)")


def _apt_failure(e: Exception, step: str, packages: Sequence[str]) -> HostSetupError:
    """What a failed `apt-get update` or install means for the operator (charmlibs-apt raises CalledProcessError
    from update() and PackageError from add_package(), both carrying apt's stderr)."""
    text = str(getattr(e, "stderr", None) or e)
    if isinstance(getattr(e, "stderr", None), bytes):
        text = e.stderr.decode(errors="replace")
    if _DPKG_LOCK.search(text):
        holder = _HELD_BY.search(text)
        return HostSetupError(
            f"the dpkg lock is {holder.group(0) if holder else 'held by another process'}; "
            "vm-host tries again on the next hook (wait for that apt run, e.g. unattended-upgrades, to finish)",
            transient=True,
        )
    if isinstance(e, OSError):
        return HostSetupError(f"apt-get cannot run here ({e}); backend=libvirt needs a Debian or Ubuntu machine")
    if step == "update":
        return HostSetupError(
            f"apt update failed ({_detail(e)}); check the machine's network and apt proxy "
            "(juju model-config apt-http-proxy); vm-host tries again on the next hook",
            transient=True,
        )
    return HostSetupError(
        f"installing {', '.join(packages)} failed: {_detail(e)}; fix apt on the machine, then run the refresh action"
    )


_STORE_DOWN = re.compile(
    r"api\.snapcraft\.io|dial tcp|name resolution|no such host|i/o timeout|connection refused|TLS handshake|"
    r"network is unreachable|persistent network error|unable to contact snap store",
    re.I,
)


def _snap_failure(e: Exception, channel: str) -> HostSetupError:
    """What a failed LXD snap install or refresh means for the operator (charmlibs-snap errors)."""
    from charmlibs import snap

    detail = _detail(e)
    if isinstance(e, snap.SocketNotFoundError):
        return HostSetupError("snapd is not running here (no /run/snapd.socket): install snapd, or use backend=libvirt")
    if isinstance(e, snap.TimeoutError | snap.ConnectionError) or _STORE_DOWN.search(str(e)):
        return HostSetupError(
            f"the snap store is unreachable ({detail}); check the machine's network and snap proxy "
            "(juju model-config snap-https-proxy); vm-host tries again on the next hook",
            transient=True,
        )
    if isinstance(e, snap.ChannelNotAvailableError | snap.NotInStoreError):
        return HostSetupError(
            f"the LXD snap has no channel {channel} ({detail}); set lxd-snap-channel to one it has, e.g. 5.21/stable"
        )
    return HostSetupError(f"installing the LXD snap from {channel} failed: {detail}")


_RISKS = ("stable", "candidate", "beta", "edge")


def _channel_key(channel: str, default_track: str = "latest") -> tuple[tuple[float, ...], int] | None:
    """(track as numbers, risk rank) of a snap channel, for ordering; None when the track is not a version.

    "latest" is newer than any numbered track; a channel without a track ("stable") is on `default_track`.
    """
    parts = channel.split("/")
    if parts[0] in _RISKS:
        parts = [default_track, *parts]
    track, risk = parts[0], parts[1] if len(parts) > 1 else "stable"
    if risk not in _RISKS:
        return None
    if track == "latest":
        return (float("inf"),), _RISKS.index(risk)
    if not re.fullmatch(r"\d+(\.\d+)*", track):
        return None
    return tuple(float(x) for x in track.split(".")), _RISKS.index(risk)


def older_channel(wanted: str, installed: str) -> bool:
    """Whether moving from `installed` to `wanted` could go back in LXD versions (an older track, or a
    less risky one on the same track: its revision may be older). LXD's database only migrates forward,
    so a downgrade can leave the daemon unable to start. Tracks that are not versions: treated as older.
    """
    have = _channel_key(installed)
    if have is None:
        return True
    want = _channel_key(wanted, default_track=installed.split("/")[0])
    if want is None:
        return True
    return want[0] < have[0] or (want[0] == have[0] and want[1] < have[1])


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
    retry_waits: Sequence[float] = RETRY_WAITS
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    def _p(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def _retrying(self, step: Callable[[], T], failure: Callable[[Exception], HostSetupError]) -> T:
        """step(), tried again after each of `retry_waits` while its failure is transient; else the failure.

        The project's one retry helper (with_retries), with waits of its own: a held dpkg lock or an
        unreachable store clears in seconds to minutes, not in a daemon's fraction of a second. The
        attempts are bounded in number, not in time (RETRY_BUDGET): charmlibs-apt runs apt-get with no
        time limit, so a budget could not cut a hung attempt short anyway.
        """
        try:
            return with_retries(
                step,
                lambda error: isinstance(error, Exception) and failure(error).transient,
                RETRY_BUDGET,
                waits=self.retry_waits,
                sleep=self.sleep,
                before_wait=lambda error, seconds: log.warning("%s; trying again in %g s", failure(error), seconds),
            )
        except Exception as error:
            raise failure(error) from error

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
            shares = even_split(s.count, len(targets))
            if any(share > max(0, f) for share, f in zip(shares, fit, strict=True)):
                largest = _largesteven_split([max(0, f) for f in fit])
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
            opts = ["-o", f"pagesize={size}"] if size else []
            cmd = ["mount", "-t", "hugetlbfs", *opts, "hugetlbfs", target]
            try:
                self._p(target).mkdir(parents=True, exist_ok=True)
                self.run(cmd)
            except (OSError, subprocess.CalledProcessError) as e:
                # Typically an unprivileged container: mounting is not allowed there.
                raise HostSetupError(
                    f"cannot mount hugetlbfs at {target} ({_detail(e)}); in a container, mount it on the host "
                    f"and pass it in, or make the container privileged; elsewhere run: {' '.join(cmd)}"
                ) from e
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
        """Install the libvirt/KVM packages that are missing (charmlibs-apt); returns what was installed.

        The archive index is refreshed first, as a step of its own, so its failure is told apart.
        """
        missing = self.missing_packages(libvirt_packages())
        if missing:
            apt = self.apt
            if apt is None:
                from charmlibs import apt
            self._retrying(apt.update, lambda e: _apt_failure(e, "update", missing))
            self._retrying(lambda: apt.add_package(missing), lambda e: _apt_failure(e, "install", missing))
        return missing

    def lxd_installed(self) -> bool:
        return self._p("snap/bin/lxc").exists() or self._p("usr/bin/lxc").exists()

    def _snap(self):
        if self.snap is not None:
            return self.snap
        from charmlibs import snap

        return snap

    def lxd_channel(self) -> str | None:
        """The channel the LXD snap tracks, or None when it is not installed as a snap."""
        from charmlibs.snap import NotInstalledError

        try:
            return self._snap().list_one("lxd").tracking or None
        except NotInstalledError:
            return None
        except Exception as e:
            raise _snap_failure(e, "") from e

    def ensure_lxd(self, channel: str) -> bool:
        """Install the LXD snap, or move it to `channel` (charmlibs-snap); True when something changed.

        Never to an older channel: an LXD already tracking a newer one is kept, and that is logged.
        An LXD from distribution packages is used as it is (a snap beside it would be a second daemon).
        """
        tracking = self.lxd_channel()
        if tracking is None and self._p("usr/bin/lxd").exists():
            log.info("LXD is installed from distribution packages: used as it is, lxd-snap-channel does not apply")
            return False
        if tracking and tracking != channel and older_channel(channel, tracking):
            log.warning(
                "the LXD snap tracks %s, newer than lxd-snap-channel=%s: kept there (LXD is never moved back)",
                tracking,
                channel,
            )
            return False
        return bool(
            self._retrying(
                lambda: self._snap().ensure_installed("lxd", channel=channel, update=False),
                lambda e: _snap_failure(e, channel),
            )
        )

    def restart_libvirtd(self) -> None:
        """After a new hugetlbfs mount (libvirt only scans mounts at start); best effort."""
        try:
            self.run(["systemctl", "try-restart", "libvirtd.service"])
        except (OSError, subprocess.CalledProcessError) as e:
            log.warning("could not restart libvirtd (%s); restart it to use the new hugetlbfs mounts", e)

    def ensure_service(self, name: str, unit: str | None, *, restart: bool = False) -> str:
        """Make systemd unit `name` exactly `unit` and running (None: stopped and removed).

        Returns what changed ("installed", "restarted", "removed" or ""). A changed unit, or `restart`
        (new charm code behind the same unit), restarts the service; an unchanged one is only started
        if it is not running, so a config-changed hook never bounces it for nothing.
        """
        path = self._p(f"etc/systemd/system/{name}")
        try:
            old = path.read_text() if path.exists() else None
            if unit is None:
                if old is None:
                    return ""
                self.run(["systemctl", "disable", "--now", name])
                path.unlink()
                self.run(["systemctl", "daemon-reload"])
                return "removed"
            if old != unit:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(unit)
                self.run(["systemctl", "daemon-reload"])
            self.run(["systemctl", "enable", name])
            if old != unit or restart:
                self.run(["systemctl", "restart", name])
                return "installed" if old is None else "restarted"
            self.run(["systemctl", "start", name])
            return ""
        except (OSError, subprocess.CalledProcessError) as e:
            raise HostSetupError(f"could not run {name}: {_detail(e)}; see journalctl -u {name}") from e


def systemd_unit(description: str, argv: Sequence[str], environment: dict[str, str], after: Sequence[str] = ()) -> str:
    """A simple service unit that restarts on failure; every word quoted so systemd takes it literally."""

    def quote(word: str, command: bool = True) -> str:  # "$" is only expanded on command lines
        word = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        return f'"{word.replace("$", "$$") if command else word}"'

    env = "".join(f"Environment={quote(f'{k}={v}', command=False)}\n" for k, v in sorted(environment.items()))
    return (
        f"# Written by the vm-host charm; changes are overwritten.\n[Unit]\nDescription={description}\n"
        f"After=network-online.target {' '.join(after)}\nWants=network-online.target\n\n"
        f"[Service]\nType=simple\n{env}ExecStart={' '.join(quote(a) for a in argv)}\n"
        "Restart=on-failure\nRestartSec=5\nNoNewPrivileges=yes\nProtectSystem=full\nProtectHome=yes\nPrivateTmp=yes\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    )


def _largesteven_split(fit: list[int]) -> int:
    """The largest total whose even split (larger shares first) gives no part more than its `fit`."""
    low = min(fit)
    extra = 0
    while extra < len(fit) - 1 and fit[extra] > low:
        extra += 1
    return low * len(fit) + extra


def lxd_supports_vms(client=None, timeout: float = DEFAULT_CALL_TIMEOUT) -> bool:
    """Whether the LXD server can run virtual machines (it lists "virtual-machine" among instance types)."""
    if client is None:
        import pylxd

        client = pylxd.Client(timeout=timeout)
    env = client.host_info.get("environment", {})
    return "virtual-machine" in (env.get("instance_types") or ())
