"""LXD host set-up the charm drives: preseed from config, and trust by client certificate or join token.

No ops import (the CLI and tests use it too). Trust is never by password: LXD 6.1 removed
`core.trust_password`, and a shared secret in charm config would leak through `juju config`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import yaml

STORAGE_DRIVERS = ("dir", "zfs", "btrfs", "lvm")
DEFAULT_HTTPS_PORT = 8443
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")
_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.S)


class LxdSetupError(ValueError):
    """Bad set-up input, or LXD refused the set-up; one sentence an operator can act on."""


@dataclass
class LxdHostConfig:
    storage_driver: str = "dir"
    bridge: str | None = None  # an existing host bridge; None: LXD manages `network_name`
    listen_address: str | None = None  # "10.0.0.5", "10.0.0.5:8443", "[::]:8443"
    storage_pool: str = "default"
    network_name: str = "lxdbr0"


def _https_address(value: str) -> str:
    """LXD's core.https_address from an address with or without a port."""
    v = value.strip()
    host, port = v, str(DEFAULT_HTTPS_PORT)
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", v)
    if m:
        host, port = m.group(1), m.group(2) or port
    elif v.count(":") == 1:
        host, port = v.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise LxdSetupError(
            f"lxd-listen-address {value!r} is not an IP address with an optional port; e.g. 10.0.0.5 or 10.0.0.5:8443"
        ) from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise LxdSetupError(f"lxd-listen-address {value!r} has port {port!r}; use 1-65535")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def build_preseed(cfg: LxdHostConfig) -> dict[str, Any]:
    """The `lxd init --preseed` document for this host (no clustering, never a trust password)."""
    if cfg.storage_driver not in STORAGE_DRIVERS:
        raise LxdSetupError(
            f"lxd-storage-driver {cfg.storage_driver!r} is not supported; allowed: {', '.join(STORAGE_DRIVERS)}"
        )
    for what, name in (("storage pool", cfg.storage_pool), ("network", cfg.network_name), ("bridge", cfg.bridge)):
        if name is not None and not _NAME_RE.match(name):
            raise LxdSetupError(
                f"{what} name {name!r} is not valid; use up to 15 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )
    preseed: dict[str, Any] = {
        "storage_pools": [{"name": cfg.storage_pool, "driver": cfg.storage_driver, "config": {}}],
    }
    if cfg.bridge:
        eth0 = {"name": "eth0", "type": "nic", "nictype": "bridged", "parent": cfg.bridge}
    else:
        preseed["networks"] = [
            {
                "name": cfg.network_name,
                "type": "bridge",
                "config": {"ipv4.address": "auto", "ipv6.address": "none"},
            }
        ]
        eth0 = {"name": "eth0", "type": "nic", "network": cfg.network_name}
    preseed["profiles"] = [
        {
            "name": "default",
            "devices": {"root": {"path": "/", "pool": cfg.storage_pool, "type": "disk"}, "eth0": eth0},
        }
    ]
    if cfg.listen_address:
        preseed["config"] = {"core.https_address": _https_address(cfg.listen_address)}
    return preseed


def apply_preseed(preseed: dict) -> None:
    """Apply a preseed with `lxd init --preseed` (re-applying the same document is harmless)."""
    try:
        proc = subprocess.run(
            ["lxd", "init", "--preseed"],
            input=yaml.safe_dump(preseed, sort_keys=True),
            capture_output=True,
            text=True,
            timeout=300,
        )
    except FileNotFoundError:
        raise LxdSetupError("lxd is not installed; install the lxd snap or package first") from None
    except subprocess.TimeoutExpired:
        raise LxdSetupError(
            "lxd init --preseed did not finish within 300 s; check that the LXD daemon is running"
        ) from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LxdSetupError(f"lxd init --preseed failed: {detail[-1] if detail else f'exit code {proc.returncode}'}")


def _client(client):
    if client is not None:
        return client
    import pylxd

    return pylxd.Client()


def cert_fingerprint(cert_pem: str) -> tuple[str, str]:
    """(sha256 fingerprint, base64 DER body) of one PEM certificate; refuses anything else."""
    from cryptography import x509

    if not isinstance(cert_pem, str):
        raise LxdSetupError("client certificate must be PEM text starting with -----BEGIN CERTIFICATE-----")
    m = _PEM_RE.search(cert_pem)
    if not m:
        raise LxdSetupError(
            "client certificate is not PEM; give the text from -----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----"
        )
    try:
        cert = x509.load_pem_x509_certificate(m.group(0).encode())
    except ValueError:
        raise LxdSetupError("client certificate is PEM-framed but not a valid X.509 certificate") from None
    from cryptography.hazmat.primitives.serialization import Encoding

    der = cert.public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest(), base64.b64encode(der).decode()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,62}", name):
        raise LxdSetupError(f"client name {name!r} is not valid; use letters, digits, '-', '_', '.' or '@'")


def add_trusted_client(cert_pem: str, name: str, client=None) -> str:
    """Trust a client certificate (remote `vmhost --uri https://...`); returns its fingerprint. Idempotent."""
    from pylxd import exceptions as pe

    _check_name(name)
    fingerprint, der_b64 = cert_fingerprint(cert_pem)
    c = _client(client)
    try:
        c.api.certificates.post(json={"type": "client", "name": name, "certificate": der_b64})
    except pe.Conflict:
        pass  # already trusted
    except pe.LXDAPIException as e:
        if "already exists" not in str(e):
            raise LxdSetupError(f"LXD refused the client certificate: {e}") from e
    return fingerprint


def create_join_token(name: str, client=None) -> str:
    """A one-time join token for `name` (as `lxc config trust add` makes); the server must listen on HTTPS."""
    from pylxd import exceptions as pe

    _check_name(name)
    c = _client(client)
    try:
        resp = c.api.certificates.post(json={"type": "client", "name": name, "token": True})
    except pe.LXDAPIException as e:
        raise LxdSetupError(f"LXD cannot issue a join token: {e}") from e
    meta = (resp.json().get("metadata") or {}).get("metadata") or {}
    if not meta.get("secret"):
        raise LxdSetupError("LXD did not return a join token; it needs the certificate_token API extension")
    token = {
        "client_name": name,
        "fingerprint": meta.get("fingerprint", ""),
        "addresses": meta.get("addresses") or [],
        "secret": meta["secret"],
        "expires_at": meta.get("expiresAt") or "0001-01-01T00:00:00Z",
    }
    return base64.b64encode(json.dumps(token, separators=(",", ":")).encode()).decode()
