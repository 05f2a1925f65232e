"""LXD host set-up the charm drives: what is missing, by preseed from config; trust by certificate or join token.

No ops import (the CLI and tests use it too). Trust is never by password: LXD 6.1 removed
`core.trust_password`, and a shared secret in charm config would leak through `juju config`.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import yaml

from vmhost.timeouts import DEFAULT_CALL_TIMEOUT, HypervisorTimeout, no_answer

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class LxdHostState:
    """What the daemon already has, as far as set-up is concerned (read by `read_state`)."""

    pools: dict[str, str] = field(default_factory=dict)  # storage pool -> driver
    networks: frozenset[str] = frozenset()  # managed networks
    profile_devices: dict[str, dict] = field(default_factory=dict)  # devices of the default profile
    https_address: str = ""  # core.https_address


@dataclass(frozen=True)
class SetupReport:
    """What one set-up run did: the preseed applied ({} when nothing was missing), and config it could not honour."""

    applied: dict[str, Any]
    notes: tuple[str, ...] = ()


def _check(cfg: LxdHostConfig) -> None:
    if cfg.storage_driver not in STORAGE_DRIVERS:
        raise LxdSetupError(
            f"lxd-storage-driver {cfg.storage_driver!r} is not supported; allowed: {', '.join(STORAGE_DRIVERS)}"
        )
    for what, name in (("storage pool", cfg.storage_pool), ("network", cfg.network_name), ("bridge", cfg.bridge)):
        if name is not None and not _NAME_RE.match(name):
            raise LxdSetupError(
                f"{what} name {name!r} is not valid; use up to 15 letters, digits, '-', '_' or '.', starting with a letter or digit"
            )


def build_preseed(cfg: LxdHostConfig, existing: LxdHostState | None = None) -> dict[str, Any]:
    """The `lxd init --preseed` document for what this host lacks (no clustering, never a trust password).

    `existing` (None: a fresh daemon) is left out: LXD's preseed MERGES into existing objects, so a
    managed bridge given `ipv4.address: auto` again gets a new random subnet, and profile devices are
    overwritten. Only absent objects are created, and absent profile devices added.
    """
    _check(cfg)
    have = existing or LxdHostState()
    preseed: dict[str, Any] = {}
    if cfg.storage_pool not in have.pools:
        preseed["storage_pools"] = [{"name": cfg.storage_pool, "driver": cfg.storage_driver, "config": {}}]
    if cfg.bridge:
        eth0 = {"name": "eth0", "type": "nic", "nictype": "bridged", "parent": cfg.bridge}
    else:
        if cfg.network_name not in have.networks:
            preseed["networks"] = [
                {
                    "name": cfg.network_name,
                    "type": "bridge",
                    "config": {"ipv4.address": "auto", "ipv6.address": "none"},
                }
            ]
        eth0 = {"name": "eth0", "type": "nic", "network": cfg.network_name}
    devices: dict[str, dict] = {}
    present = have.profile_devices.values()
    # Matched by kind, not name: an operator's renamed root disk or NIC must not get a second one beside it.
    if not any(d.get("type") == "disk" and d.get("path") == "/" for d in present):
        devices["root"] = {"path": "/", "pool": cfg.storage_pool, "type": "disk"}
    if not any(d.get("type") == "nic" for d in present):
        devices["eth0"] = eth0
    if devices:
        preseed["profiles"] = [{"name": "default", "devices": devices}]
    if cfg.listen_address:
        address = _https_address(cfg.listen_address)
        if address != have.https_address:
            preseed["config"] = {"core.https_address": address}
    return preseed


def read_state(client=None, timeout: float = DEFAULT_CALL_TIMEOUT) -> LxdHostState:
    """The pools, managed networks, default profile devices and HTTPS address the daemon has now."""
    from pylxd import exceptions as pe

    try:
        with _answered("reading its set-up", timeout):
            c = _client(client, timeout)
            pools = c.api["storage-pools"].get(params={"recursion": 1}).json()["metadata"] or []
            nets = c.api.networks.get(params={"recursion": 1}).json()["metadata"] or []
            profile = c.api.profiles["default"].get().json()["metadata"] or {}
            server = c.api.get().json()["metadata"] or {}
    except (pe.LXDAPIException, pe.ClientConnectionFailed) as e:
        raise LxdSetupError(f"cannot read LXD's pools, networks and default profile: {e}") from e
    return LxdHostState(
        pools={p["name"]: p.get("driver") or "" for p in pools},
        networks=frozenset(n["name"] for n in nets if n.get("managed")),
        profile_devices=dict(profile.get("devices") or {}),
        https_address=str((server.get("config") or {}).get("core.https_address") or ""),
    )


def ensure_host(cfg: LxdHostConfig, client=None, timeout: float = DEFAULT_CALL_TIMEOUT) -> SetupReport:
    """Create what the host lacks, never touching what it has; safe to run on every hook.

    A pool that exists with another driver is kept (its volumes live there): the report says so
    instead, since lxd-storage-driver only applies when the pool is first made.
    """
    _check(cfg)
    state = read_state(client, timeout)
    preseed = build_preseed(cfg, state)
    if preseed:
        apply_preseed(preseed)
    notes = []
    driver = state.pools.get(cfg.storage_pool)
    if driver and driver != cfg.storage_driver:
        notes.append(
            f"storage pool {cfg.storage_pool} exists with driver {driver}; "
            f"lxd-storage-driver={cfg.storage_driver} only applies at first set-up"
        )
    return SetupReport(applied=preseed, notes=tuple(notes))


def apply_preseed(preseed: dict) -> None:
    """Apply a preseed with `lxd init --preseed` (LXD merges it into objects that exist: see build_preseed)."""
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


def _client(client, timeout: float = DEFAULT_CALL_TIMEOUT):
    """`client` (tests pass a fake), else a client on the local unix socket whose every request has `timeout`."""
    if client is not None:
        return client
    import pylxd

    return pylxd.Client(timeout=timeout)


@contextmanager
def _answered(what: str, timeout: float) -> Iterator[None]:
    """LXD's silence past `timeout` (requests' timeout) as one HypervisorTimeout sentence."""
    import requests

    try:
        yield
    except requests.Timeout:
        raise HypervisorTimeout(no_answer("LXD at the local unix socket", what, timeout)) from None


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


def describe_access(projects: Sequence[str] | None) -> str:
    """What a certificate restricted to `projects` (None: unrestricted) may do, in words."""
    if projects is None:
        return "full access"
    return f"access to project {', '.join(sorted(projects)) or '(none)'} only"


def _restriction(projects: Sequence[str] | None) -> dict[str, Any]:
    """The certificate fields for `projects` (None: unrestricted, which is root on the host)."""
    return {"restricted": True, "projects": list(projects)} if projects is not None else {"restricted": False}


def add_trusted_client(
    cert_pem: str,
    name: str,
    *,
    projects: Sequence[str] | None = None,
    client=None,
    timeout: float = DEFAULT_CALL_TIMEOUT,
) -> str:
    """Trust a client certificate (remote `vmhost --uri https://...`); returns its fingerprint.

    `projects` restricts it to those LXD projects; None gives full access. Adding the same certificate
    again under the same name and access changes nothing; under another name or access it is refused
    with what is trusted now, so a re-add never silently widens, narrows or renames a grant.
    """
    from pylxd import exceptions as pe

    _check_name(name)
    fingerprint, der_b64 = cert_fingerprint(cert_pem)
    c = _client(client, timeout)
    try:
        with _answered("reading its trusted certificates", timeout):
            have = c.api.certificates[fingerprint].get().json()["metadata"] or {}
    except pe.NotFound:
        have = None
    except (pe.LXDAPIException, pe.ClientConnectionFailed) as e:
        raise LxdSetupError(f"cannot read LXD's trusted certificates: {e}") from e
    want = _restriction(projects)
    if have is not None:
        have_access = describe_access(have.get("projects") or () if have.get("restricted") else None)
        want_access = describe_access(projects)
        if have.get("name") == name and have_access == want_access:
            return fingerprint
        raise LxdSetupError(
            f"this certificate ({fingerprint[:12]}) is already trusted as {have.get('name')!r} with {have_access}; "
            f"nothing changed: to trust it as {name!r} with {want_access}, remove it first "
            f"(lxc config trust remove {fingerprint[:12]})"
        )
    try:
        with _answered("adding a trusted client", timeout):
            c.api.certificates.post(json={"type": "client", "name": name, "certificate": der_b64, **want})
    except (pe.LXDAPIException, pe.ClientConnectionFailed) as e:
        raise LxdSetupError(f"LXD refused the client certificate: {e}") from e
    return fingerprint


@dataclass(frozen=True)
class JoinToken:
    """A join token as `lxc remote add <host> <token>` takes it, and when LXD stops accepting it."""

    token: str
    expires_at: str  # RFC 3339, as LXD gives it


EXPIRY_KEY = "core.remote_token_expiry"
TOKEN_EXPIRY_MAX = 7 * 86400  # s


def create_join_token(
    name: str,
    *,
    expiry_s: int = 3600,
    projects: Sequence[str] | None = None,
    client=None,
    timeout: float = DEFAULT_CALL_TIMEOUT,
) -> JoinToken:
    """A one-time join token for `name` that LXD refuses after `expiry_s` seconds; the server must listen on HTTPS.

    LXD stamps a token's expiry from the server setting core.remote_token_expiry when it makes the token
    (API extension remote_token_expiry, in LXD 5.0 and later), and refuses the token once it has passed.
    There is no per-token field, so the setting is ours for the one request and then put back as it was.
    The certificate the token turns into is restricted to `projects` (None: full access).
    """
    from pylxd import exceptions as pe

    _check_name(name)
    if not isinstance(expiry_s, int) or not 1 <= expiry_s <= TOKEN_EXPIRY_MAX:
        raise LxdSetupError(f"token expiry {expiry_s!r} s is not allowed; give 1 s to {TOKEN_EXPIRY_MAX} s (7 days)")
    c = _client(client, timeout)
    try:
        with _answered("issuing a join token", timeout):
            server = c.api.get().json()["metadata"] or {}
        if "remote_token_expiry" not in (server.get("api_extensions") or ()):
            raise LxdSetupError(
                "this LXD cannot make join tokens expire (no remote_token_expiry API extension; LXD 5.0 or later "
                "has it); no token issued: use add-trusted-client with the client's certificate instead"
            )
        before = str((server.get("config") or {}).get(EXPIRY_KEY) or "")
        with _answered("issuing a join token", timeout):
            c.api.patch(json={"config": {EXPIRY_KEY: f"{expiry_s}S"}})
            try:
                resp = c.api.certificates.post(
                    json={"type": "client", "name": name, "token": True, **_restriction(projects)}
                )
            finally:
                c.api.patch(json={"config": {EXPIRY_KEY: before}})  # "" removes the key again
    except (pe.LXDAPIException, pe.ClientConnectionFailed) as e:
        raise LxdSetupError(f"LXD cannot issue a join token: {e}") from e
    body = resp.json()
    meta = (body.get("metadata") or {}).get("metadata") or {}
    expires_at = str(meta.get("expiresAt") or "")
    if not meta.get("secret") or not expires_at or expires_at.startswith("0001-"):
        _cancel(c, body.get("operation"))
        raise LxdSetupError("LXD did not return an expiring join token; none was issued")
    token = {
        "client_name": name,
        "fingerprint": meta.get("fingerprint", ""),
        "addresses": meta.get("addresses") or [],
        "secret": meta["secret"],
        "expires_at": expires_at,
    }
    return JoinToken(base64.b64encode(json.dumps(token, separators=(",", ":")).encode()).decode(), expires_at)


def _cancel(c, operation: str | None) -> None:
    """Revoke a token LXD made but we will not hand out (its operation is the token)."""
    if not operation:
        return
    try:
        c.api.operations[operation.rstrip("/").rsplit("/", 1)[-1]].delete()
    except Exception as e:  # best effort: an unexpiring token we did not hand out is still only in LXD
        log.warning("could not revoke LXD token operation %s: %s", operation, e)
