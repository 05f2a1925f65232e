"""An in-memory Provider for unit tests of everything above the provider (service, CLI, charm, relation)."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from datetime import UTC

from vmhost.model import ComposePlan, HostTopology, Nic, StoragePool, VmInfo
from vmhost.providers.base import NotFound

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
    project = "vmhost"
    confines_floating = True

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
        self.projects_made = 0

    def ensure_project(self) -> None:
        self.projects_made += 1

    def discover(self) -> HostTopology:
        return self.topology

    @property
    def plans(self) -> dict[str, ComposePlan]:
        return {p.allocation.name: p for p in self.composed}

    def list_vms(self, addresses: bool = True) -> list[VmInfo]:
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

    def images(self) -> list[dict]:
        return []  # the fake keeps no base images (LXD-like: the hypervisor's own store)

    def prune_images(self, dry_run: bool = False) -> list[str]:
        return []

    def close(self) -> None:
        self.closed += 1

    def confine_floating(self, threads: tuple[int, ...], foreign: bool = False) -> bool:
        self.confined.append(tuple(threads))
        self.confined_foreign.append(foreign)
        if self.fail_confine:
            raise self.fail_confine
        return True


class CommandRecorder:
    """A command runner for vmhost.machine_setup.Host: records every command; dpkg-query knows `installed` packages."""

    def __init__(self, installed=()):
        self.calls: list[list[str]] = []
        self.installed = set(installed)
        self.failures: dict[str, Exception] = {}  # command name -> what running it raises

    def __call__(self, cmd):
        cmd = list(cmd)
        self.calls.append(cmd)
        if cmd[0] in self.failures:
            raise self.failures[cmd[0]]
        if cmd[0] == "dpkg-query":
            if cmd[-1] not in self.installed:
                raise subprocess.CalledProcessError(1, cmd)
            return subprocess.CompletedProcess(cmd, 0, "install ok installed", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def apt_lock_error(step: str = "install") -> Exception:
    """What charmlibs-apt raises while another apt/dpkg run holds the lock (apt's own stderr)."""
    stderr = (
        "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (unattended-upgr)\n"
        "E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), is another process using it?\n"
    )
    if step == "update":
        return subprocess.CalledProcessError(100, ["apt-get", "update", "--error-on=any"], b"", stderr.encode())
    from charmlibs.apt import PackageError

    return PackageError(f"Could not install package(s) ['genisoimage']: {stderr}")


def apt_update_error() -> Exception:
    """apt-get update with the archive unreachable (charmlibs-apt re-raises the CalledProcessError)."""
    stderr = (
        b"W: Failed to fetch http://archive.ubuntu.com/ubuntu/dists/noble/InRelease  "
        b"Temporary failure resolving 'archive.ubuntu.com'\n"
        b"E: Some index files failed to download. They have been ignored, or old ones used instead.\n"
    )
    return subprocess.CalledProcessError(100, ["apt-get", "update", "--error-on=any"], b"", stderr)


def snap_store_error() -> Exception:
    """snapd cannot reach the store (charmlibs-snap raises an APIError with snapd's message)."""
    from charmlibs.snap import APIError

    return APIError(
        'cannot install "lxd": Post "https://api.snapcraft.io/v2/snaps/refresh": dial tcp: '
        "lookup api.snapcraft.io: Temporary failure in name resolution",
        kind="",
        value="lxd",
        status_code=400,
    )


class FakeApt:
    """charmlibs.apt as vmhost.machine_setup uses it: update(), then add_package(); queued failures are raised in order."""

    def __init__(self):
        self.added: list[list[str]] = []
        self.updates = 0
        self.update_failures: list[Exception] = []
        self.add_failures: list[Exception] = []

    def update(self):
        self.updates += 1
        if self.update_failures:
            raise self.update_failures.pop(0)

    def add_package(self, names, update_cache=False):
        if self.add_failures:
            raise self.add_failures.pop(0)
        self.added.append(list(names))


class FakeSnap:
    """charmlibs.snap as vmhost.machine_setup uses it: list_one() and ensure_installed() on snapd's state `tracking`."""

    def __init__(self, tracking: str | None = None):
        self.tracking = tracking  # the channel an installed LXD snap tracks; None: not installed
        self.ensured: list[tuple[str, str | None]] = []
        self.update_flags: list[bool] = []
        self.failures: list[Exception] = []

    def list_one(self, name):
        from types import SimpleNamespace

        from charmlibs.snap import NotInstalledError

        if self.tracking is None:
            raise NotInstalledError("snap not installed", kind="snap-not-found", value=name)
        return SimpleNamespace(name=name, tracking=self.tracking)

    def ensure_installed(self, name, channel=None, update=True):
        if self.failures:
            raise self.failures.pop(0)
        self.ensured.append((name, channel))
        self.update_flags.append(update)
        changed = self.tracking != channel
        self.tracking = channel
        return changed or update


def self_signed_pem(cn: str = "vmhost-test") -> str:
    """A fresh client certificate, PEM."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class _Response:
    def __init__(self, body: dict, status: int = 200):
        self._body, self.status_code = body, status

    def json(self) -> dict:
        return self._body


class FakeLxdTrust:
    """The LXD daemon's trust store as pylxd's raw API nodes (client.api...) show it to vmhost.lxd_setup.

    Certificates by fingerprint, join tokens, and the server config; a token gets its expiry from
    core.remote_token_expiry when it is made, as LXD does (remote_token_expiry extension).
    """

    def __init__(self, extensions=("certificate_token", "remote_token_expiry")):
        self.certs: dict[str, dict] = {}
        self.tokens: list[dict] = []  # the request, plus the expiry LXD stamped
        self.config: dict[str, str] = {}
        self.extensions = list(extensions)
        self.cancelled: list[str] = []
        self.now = 1_800_000_000.0

    @property
    def api(self) -> _Node:
        return _Node(self, ())


class _Node:
    def __init__(self, lxd: FakeLxdTrust, path: tuple[str, ...]):
        self._lxd, self._path = lxd, path

    def __getattr__(self, name: str) -> _Node:
        return _Node(self._lxd, (*self._path, name))

    def __getitem__(self, name: str) -> _Node:
        return _Node(self._lxd, (*self._path, name))

    def get(self, **_kw) -> _Response:
        lxd = self._lxd
        if self._path == ():
            return _Response({"metadata": {"api_extensions": lxd.extensions, "config": dict(lxd.config)}})
        if self._path[0] == "certificates" and len(self._path) == 2:
            if self._path[1] not in lxd.certs:
                from pylxd import exceptions as pe

                raise pe.NotFound(_Response({"error": "Certificate not found"}, 404))
            return _Response({"metadata": lxd.certs[self._path[1]]})
        raise AssertionError(f"unexpected GET {self._path}")

    def patch(self, json: dict) -> _Response:
        assert self._path == ()
        for key, value in json["config"].items():
            if value == "":
                self._lxd.config.pop(key, None)
            else:
                self._lxd.config[key] = value
        return _Response({})

    def post(self, json: dict) -> _Response:
        import base64
        import hashlib
        import re
        from datetime import datetime, timedelta

        lxd = self._lxd
        assert self._path == ("certificates",)
        if json.get("token"):
            expiry = lxd.config.get("core.remote_token_expiry", "")
            meta = {"secret": "5ecret", "fingerprint": "5e7ver", "addresses": ["10.0.0.5:8443"], "request": json}
            if expiry:
                n, unit = re.fullmatch(r"(\d+)([SMHd])", expiry).groups()
                seconds = int(n) * {"S": 1, "M": 60, "H": 3600, "d": 86400}[unit]
                at = datetime.fromtimestamp(lxd.now, UTC) + timedelta(seconds=seconds)
                meta["expiresAt"] = at.strftime("%Y-%m-%dT%H:%M:%SZ")
            lxd.tokens.append(meta)
            return _Response({"operation": f"/1.0/operations/op-{len(lxd.tokens)}", "metadata": {"metadata": meta}})
        fp = hashlib.sha256(base64.b64decode(json["certificate"])).hexdigest()
        lxd.certs[fp] = {
            "name": json["name"],
            "fingerprint": fp,
            "restricted": bool(json.get("restricted")),
            "projects": list(json.get("projects") or []),
        }
        return _Response({})

    def delete(self) -> _Response:
        assert self._path[0] == "operations"
        self._lxd.cancelled.append(self._path[1])
        return _Response({})
