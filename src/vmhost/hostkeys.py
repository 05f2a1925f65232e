"""A VM's SSH host keys, made by vm-host so a client can pin them instead of trusting the first use.

ssh-keygen writes each pair into a private (0700) temporary directory that is removed before this returns,
whether or not it succeeded; the private halves then live only in memory until the seed is built, and in
the seed itself (see docs/design.md §13). Nothing here logs or raises with key material in it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vmhost.model import HostKey

__all__ = ["HOST_KEY_TYPES", "HostKeyPair", "generate_host_keys", "known_hosts_lines", "public_key_line"]

# (ssh-keygen -t, cloud-init ssh_keys prefix, algorithm name as sshd offers it)
HOST_KEY_TYPES = (("ed25519", "ed25519", "ssh-ed25519"),)
KEYGEN_TIMEOUT = 30.0  # s
_PUBLIC = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp256|ssh-rsa) ([A-Za-z0-9+/]+=*)$")
_FINGERPRINT = re.compile(r"^\d+ (SHA256:[A-Za-z0-9+/]+)")


@dataclass(frozen=True)
class HostKeyPair:
    """One generated pair: `cloud_init_type` keys cloud-init's `ssh_keys` (<type>_private, <type>_public)."""

    cloud_init_type: str
    public: HostKey
    private: str = field(repr=False)  # never printed: repr, logs and errors leave it out


def public_key_line(text: str) -> str:
    """'<algorithm> <base64>' from an OpenSSH public key line (its comment dropped)."""
    parts = text.split()
    line = " ".join(parts[:2])
    if not _PUBLIC.match(line):
        raise ValueError("ssh-keygen wrote a public key vm-host cannot read")
    return line


def generate_host_keys(tmp_parent: str | None = None) -> tuple[HostKeyPair, ...]:
    """A fresh host key pair per type in HOST_KEY_TYPES; the temporary directory is gone when this returns."""
    if shutil.which("ssh-keygen") is None:
        raise RuntimeError("ssh-keygen is not installed; install the openssh-client package")
    out = []
    with tempfile.TemporaryDirectory(prefix="vmhost-hostkeys-", dir=tmp_parent) as tmp:  # mkdtemp: mode 0700
        for keygen_type, ci_type, _algorithm in HOST_KEY_TYPES:
            path = Path(tmp) / f"ssh_host_{keygen_type}_key"
            _keygen(["-q", "-t", keygen_type, "-N", "", "-C", "", "-f", str(path)])
            public = public_key_line((path.with_suffix(".pub")).read_text())
            fp = _FINGERPRINT.match(_keygen(["-l", "-E", "sha256", "-f", str(path.with_suffix(".pub"))]))
            if fp is None:
                raise RuntimeError("ssh-keygen printed no SHA256 fingerprint for a host key it made")
            out.append(HostKeyPair(ci_type, HostKey(public.split()[0], public, fp.group(1)), path.read_text()))
    return tuple(out)


def _keygen(args: list[str]) -> str:
    try:
        done = subprocess.run(
            ["ssh-keygen", *args], capture_output=True, text=True, timeout=KEYGEN_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"ssh-keygen did not finish within {KEYGEN_TIMEOUT:g} s") from None
    if done.returncode != 0:
        # ssh-keygen's stderr names files and types, never key material; keep one line of it.
        raise RuntimeError(f"ssh-keygen failed: {(done.stderr.strip().splitlines() or ['no message'])[0][:200]}")
    return done.stdout


def known_hosts_lines(hosts: list[str], keys: tuple[HostKey, ...]) -> str:
    """An OpenSSH known_hosts file pinning `keys` for `hosts` (what a client builds from vm-host's report)."""
    names = ",".join(hosts)
    return "".join(f"{names} {k.public_key}\n" for k in keys)
