"""A nested multi-NUMA test host: the guest from scripts/build-numa-guest.sh booted under TCG.

One QEMU per profile (2 nodes; 4 nodes; 2 nodes with an igb SR-IOV NIC on node 1), reached over ssh
on a port forwarded to 127.0.0.1 only (user-mode networking: nothing leaves loopback), with a key made
for the test and the guest's host key pinned. Its own QEMU is stopped by its own pid, always.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 420  # s: about 90 s on an idle 2-core box, TCG on a loaded one is slower
SSH_TIMEOUT = 180  # s per command: a domain start in the guest takes 7-25 s


@dataclass(frozen=True)
class Profile:
    name: str
    # per node: (CPUs, MiB of memory, 2M hugepages)
    nodes: tuple[tuple[int, int, int], ...]
    igb: bool = False  # an igb NIC (7 possible VFs) behind a PCIe expander bridge on node 1

    def qemu_args(self, guest_dir: Path) -> list[str]:
        cpus = sum(n[0] for n in self.nodes)
        mem = sum(n[1] for n in self.nodes)
        # One TCG thread for all vCPUs: with a thread per vCPU (QEMU's default) the igb guest froze in about 1
        # boot of 5 once its VFs were enabled on a loaded 2-core box; with one thread, 12 of 12 did not, and
        # boot time was the same (design §9.1).
        args = ["-accel", "tcg,thread=single", "-cpu", "max", "-machine", "q35"]
        args += ["-smp", f"{cpus},sockets={len(self.nodes)},cores={self.nodes[0][0]},threads=1", "-m", f"{mem}M"]
        first = 0
        for i, (n_cpus, n_mem, _pages) in enumerate(self.nodes):
            args += ["-object", f"memory-backend-ram,id=m{i},size={n_mem}M"]
            args += ["-numa", f"node,nodeid={i},cpus={first}-{first + n_cpus - 1},memdev=m{i}"]
            first += n_cpus
        if self.igb:
            args += ["-device", "intel-iommu,intremap=off,caching-mode=on"]
            args += ["-device", "pxb-pcie,id=pxb1,bus_nr=128,numa_node=1,bus=pcie.0"]
            args += ["-device", "pcie-root-port,id=rp1,bus=pxb1,chassis=1"]
            args += ["-netdev", "user,id=n1,restrict=on", "-device", "igb,netdev=n1,bus=rp1,romfile="]
        return args

    def cmdline(self) -> str:
        pages = ",".join(f"{i}:{n[2]}" for i, n in enumerate(self.nodes))
        extra = " intel_iommu=on iommu=pt" if self.igb else ""
        return (
            "console=ttyS0 root=/dev/vda rw quiet systemd.show_status=0 "
            f"default_hugepagesz=2M hugepagesz=2M hugepages={pages}{extra}"
        )


PROFILES = {
    "two": Profile("two", ((2, 768, 128), (2, 768, 128))),
    # Uneven pages, so which two nodes a spanning VM gets is a real choice.
    "four": Profile("four", ((1, 384, 32), (1, 384, 96), (1, 384, 64), (1, 384, 96))),
    "igb": Profile("igb", ((2, 768, 64), (2, 768, 64)), igb=True),
}


def build_guest() -> Path:
    """The cached guest image directory (building it on first use: several minutes)."""
    out = subprocess.run(
        ["bash", str(REPO / "scripts/build-numa-guest.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"scripts/build-numa-guest.sh failed: {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills this QEMU if pytest dies without running its finalizers."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """One booted nested host. `ssh(cmd)` runs a command as root in it; `uri` is its libvirt over ssh."""

    def __init__(self, profile: Profile, guest_dir: Path, workdir: Path):
        self.profile = profile
        self.dir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        key = workdir / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
        hostkey = (guest_dir / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        (workdir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(hostkey)}\n")
        self.ssh_config = workdir / "ssh_config"
        self.ssh_config.write_text(
            "Host *\n"
            f"  IdentityFile {key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {workdir / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
            "  BatchMode yes\n  ConnectTimeout 10\n  ServerAliveInterval 10\n  ServerAliveCountMax 6\n"
            "  LogLevel ERROR\n"
        )
        # libvirt's ssh transport runs `command=` in place of ssh: ours pins the key and the host key.
        self.ssh_wrapper = workdir / "ssh"
        self.ssh_wrapper.write_text(f'#!/bin/sh\nexec ssh -F {shlex.quote(str(self.ssh_config))} "$@"\n')
        self.ssh_wrapper.chmod(0o755)
        self.uri = f"qemu+ssh://root@127.0.0.1:{self.port}/system?command={self.ssh_wrapper}"
        self.console = workdir / "console.log"
        self.guest_dir = guest_dir
        self.hung = False  # stopped answering ssh mid-session: never handed out again

    def _qemu(self) -> list[str]:
        if not self.profile.igb:
            return ["qemu-system-x86_64"]
        q = (self.guest_dir / "qemu10").resolve()
        return [
            str(q / "lib64/ld-linux-x86-64.so.2"),
            "--library-path",
            f"{q}/lib/x86_64-linux-gnu:{q}/usr/lib/x86_64-linux-gnu",
            str(q / "usr/bin/qemu-system-x86_64"),
            "-L",
            str(q / "usr/share/qemu"),
        ]

    def boot(self) -> None:
        g = self.guest_dir
        cmd = self._qemu() + self.profile.qemu_args(g)
        cmd += ["-nodefaults", "-display", "none", "-serial", f"file:{self.console}", "-monitor", "none"]
        cmd += ["-kernel", str(g / "vmlinuz"), "-initrd", str(g / "initrd.img"), "-append", self.profile.cmdline()]
        cmd += ["-drive", f"file={g / 'rootfs.img'},format=raw,if=none,id=d0,snapshot=on"]
        cmd += ["-device", "virtio-blk-pci,drive=d0,bus=pcie.0"]
        cmd += ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22"]
        cmd += ["-device", "virtio-net-pci,netdev=n0,romfile=,bus=pcie.0"]
        cmd += ["-fw_cfg", f"name=opt/vmhost/authorized_keys,file={self.dir / 'id_ed25519.pub'}"]
        env = dict(os.environ)
        if self.profile.igb:
            env["QEMU_MODULE_DIR"] = str((g / "qemu10").resolve() / "usr/lib/x86_64-linux-gnu/qemu")
        (self.dir / "qemu.cmd").write_text(shlex.join(cmd) + "\n")
        with open(self.dir / "qemu.stderr", "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"QEMU ({self.profile.name}) exited with {self.proc.returncode}: "
                    + (self.dir / "qemu.stderr").read_text()[-1500:]
                )
            r = self.run("systemctl is-active libvirtd.service", check=False, timeout=20)
            if r.returncode == 0 and r.stdout.strip() == "active":
                return
            time.sleep(3)
        self.stop()
        raise RuntimeError(
            f"the {self.profile.name} guest did not answer ssh within {BOOT_TIMEOUT} s; console: " + self.console_tail()
        )

    def stalled(self) -> str | None:
        """Why a booted guest cannot be trusted, or None: the kernel's own RCU stall report, or a vCPU that
        does not run a trivial task within 20 s."""
        script = (
            "dmesg | grep -m1 'detected stalls'; "
            'for c in $(seq 0 $(($(nproc --all) - 1))); do timeout 20 taskset -c $c true || echo "vCPU $c does not run"; done'
        )
        r = self.run(script, check=False, timeout=120)
        if r.returncode == 255:
            return f"ssh to the guest failed: {r.stderr.strip()[-300:]}"
        found = r.stdout.strip()
        return f"{found}; console: {self.console_tail()}" if found else None

    def answers(self) -> bool:
        """Whether the guest still runs a trivial command over ssh (twice given 30 s: one slow moment is not a hang)."""
        return any(self.run("true", check=False, timeout=30).returncode == 0 for _ in range(2))

    def console_tail(self, chars: int = 1500) -> str:
        try:
            return self.console.read_text(errors="replace")[-chars:]
        except OSError as e:
            return f"(no console: {e})"

    def run(
        self, command: str, check: bool = True, timeout: float = SSH_TIMEOUT, stdin: str | None = None
    ) -> subprocess.CompletedProcess:
        cmd = ["ssh", "-F", str(self.ssh_config), "-p", str(self.port), "root@127.0.0.1", command]
        try:
            feed = {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **feed)
        except subprocess.TimeoutExpired:
            if check:
                raise
            return subprocess.CompletedProcess(cmd, 255, "", "timed out")
        if check and r.returncode != 0:
            raise RuntimeError(f"guest command {command!r} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
        return r

    def ssh(self, command: str) -> str:
        return self.run(command).stdout

    def run_input(self, command: str, stdin: str) -> str:
        return self.run(command, stdin=stdin).stdout

    def stop(self) -> None:
        """Stop our own QEMU by its pid: SIGTERM, then SIGKILL after 10 s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
