"""The LXD provider: VM records, custom volumes and devices over the LXD REST API.

Our VMs live in a project of our own (sharing the default project's profiles and images); each carries
its allocation in `user.vmhost.allocation`, each extra volume its owner VM in `user.vmhost.owner`, so
the daemon is the only database (docs/design.md §3). VMs made by others are counted from their own limits.

Transport: pylxd's client and session, for the local unix socket and for a remote daemon (https, client
certificate, pinned server certificate) alike; the provider speaks the REST API through that session
because pylxd's object layer has no call for several things it needs (pool resources, volume config).
Facts that cannot change within one provider instance (one CLI call, one charm hook) are read once: the
server's extensions, host resources, network kinds, pools, profile, project.

Over ~400 lines for now: one class over one REST API (transport with bounded operations, discovery,
compose transaction, gc). Config building is already lxd_config.py; the transport (`_call`/`_wait`) is
the next split.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

from vmhost.cloudinit import static_prefixes
from vmhost.hostkeys import generate_host_keys
from vmhost.model import Allocation, ComposePlan, Core, HostTopology, Nic, NumaNode, StoragePool, VmInfo
from vmhost.parse import HUGEPAGE_SIZES, ParseCache
from vmhost.providers import lxd_config as cfg
from vmhost.providers.addresses import static_addresses, vm_addresses
from vmhost.providers.base import (
    LXD_OUI,
    STATE_COMPOSING,
    STATE_DECOMPOSING,
    STATE_READY,
    NotFound,
    ProviderError,
    Transaction,
    check_plan,
    fault_point,
    name_taken,
    random_mac,
    with_retries,
)
from vmhost.providers.image_source import ImageServer
from vmhost.simplestreams import is_stream_name
from vmhost.timeouts import DEFAULT_CALL_TIMEOUT, IMAGE_TIMEOUT, HypervisorTimeout, no_answer, resolve
from vmhost.timeouts import OPERATION_TIMEOUT as _OPERATION_TIMEOUT

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "vmhost"
PREFERRED_PROFILE = "vmhost"
OPERATION_TIMEOUT = int(_OPERATION_TIMEOUT)  # s: bound on an operation, and on each wait request for a longer one
IMAGE_CREATE_TIMEOUT = int(IMAGE_TIMEOUT)  # s: creating a VM from an image may first download the image
_FINAL = ("Success", "Failure", "Cancelled")
_clock = time.monotonic  # what bounds waits (tests drive it with the fake daemon's own clock)
_NIC_KINDS = ("physical", "bridge", "vlan", "bond")


class LxdApiError(ProviderError):
    """LXD answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _transport_error(e: BaseException) -> bool:
    """The daemon could not be reached or the connection broke (not an answer from LXD, nor its silence)."""
    import requests

    return isinstance(e, (OSError, requests.ConnectionError)) and not isinstance(e, requests.Timeout)


def _transient(e: BaseException) -> bool:
    if isinstance(e, LxdApiError):
        return e.status == 503
    return _transport_error(e)


@dataclass
class _Connection:
    """A trusted connection: a requests-like session, the API root URL and the server's /1.0 answer."""

    session: Any
    endpoint: str
    server: dict


class LxdProvider:
    """LXD VM host backend (local unix socket, or https://host:8443 with a client certificate)."""

    name = "lxd"
    # LXD has no per-VM affinity that leaves the vCPU count alone (limits.cpu as a set also sets the
    # count), so floating VMs float over every thread; confine_floating says so and the report shows it.
    confines_floating = False

    def __init__(
        self,
        uri: str | None = None,
        project: str = DEFAULT_PROJECT,
        profile: str | None = None,
        cert: tuple[str, str] | None = None,
        verify: bool | str = True,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        image_server: str | None = None,
        image_server_cert: str | None = None,
    ):
        self.image_server = ImageServer(image_server, cafile=image_server_cert)  # checked now: one sentence if bad
        if uri is not None and not (uri.startswith("https://") or uri.startswith("/")):
            raise ProviderError(f"LXD uri {uri!r} is not usable; give https://host:8443 or a unix socket path")
        if uri is not None and uri.startswith("https://") and cert is None:
            from pylxd.client import DEFAULT_CERTS

            if not (os.path.exists(DEFAULT_CERTS.cert) and os.path.exists(DEFAULT_CERTS.key)):
                raise ProviderError(f"LXD at {uri} needs a client certificate; give cert=(cert.pem, key.pem)")
            cert = (DEFAULT_CERTS.cert, DEFAULT_CERTS.key)  # the one `lxc remote add` made
        self.uri = uri
        self.project = project
        self.profile = profile
        self.cert = tuple(cert) if cert else None
        self.verify = verify
        self.timeout = float(timeout)  # s: each request (requests' connect and read timeouts)
        self._conn: _Connection | None = None
        self._hung: str | None = None  # set once LXD did not answer in time: later calls fail at once
        self._parsed: ParseCache[Allocation] = ParseCache()  # our allocations, by their raw config text
        self._forget()

    def _forget(self) -> None:
        """Drop what was read once per provider instance (see the module docstring)."""
        self._resources_cache: dict | None = None
        self._facts: tuple[dict, tuple[int, str, dict[int, int]]] | None = None
        self._network_kinds: dict[str, str] | None = None
        self._nics_cache: list[Nic] | None = None
        self._pool_names: list[str] | None = None
        self._profile_name: str | None = None
        self._profile_devices: dict[str, dict] | None = None
        self._project_known = False

    # -- transport ---------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return self.uri or "the local unix socket"

    def _connection(self) -> _Connection:
        """Connected on first use (the charm builds providers before LXD is installed)."""
        if self._conn is None:
            try:
                conn = with_retries(self._connect, _transient, self.timeout)
            except Exception as e:
                if _transport_error(e):
                    raise ProviderError(f"cannot reach LXD at {self._where}: {e}") from e
                raise
            if conn.server.get("auth") != "trusted":
                conn.session.close()
                raise ProviderError(
                    f"LXD at {self._where} does not trust this client; add its certificate (add-trusted-client) or use a join token"
                )
            self._conn = conn
        return self._conn

    @property
    def _remote(self) -> bool:
        return self.uri is not None and self.uri.startswith("https://")

    def _connect(self) -> _Connection:
        import pylxd
        from pylxd import exceptions as pe
        from requests import ConnectionError as RequestsConnectionError

        if self.uri and not self._remote and not os.path.exists(self.uri):
            raise FileNotFoundError(f"no LXD socket at {self.uri}")  # pylxd would take the path for a URL
        if self._remote:
            # requests' timeouts do not cover the name lookup: a dead resolver is met here, within the limit.
            where = urlsplit(self.uri)
            try:
                resolve(where.hostname or "", where.port or 8443, self.timeout)
            except TimeoutError as e:
                raise HypervisorTimeout(
                    f"LXD at {self.uri}: {e}; check this machine's DNS, or use an address"
                ) from None
        with self._bounded("the connection"):
            try:
                client = pylxd.Client(endpoint=self.uri, timeout=self.timeout, session=self._session())
            except pe.ClientConnectionFailed as e:
                raise RequestsConnectionError(str(e) or "connection failed") from e
        return _Connection(client.api.session, client.api._api_endpoint, client.host_info)

    @contextlib.contextmanager
    def _bounded(self, what: str, limit: float | None = None) -> Iterator[None]:
        """Run one request: at once HypervisorTimeout if LXD hung before, and a timeout makes it hung."""
        import requests

        if self._hung is not None:
            raise HypervisorTimeout(self._hung)
        try:
            yield
        except requests.Timeout as e:
            self._hung = no_answer(f"LXD at {self._where}", what, limit or self.timeout)
            raise HypervisorTimeout(self._hung) from e

    def _session(self):
        """None (pylxd's own) for the local socket; for https, pylxd's session where an explicit `verify` wins.

        requests lets REQUESTS_CA_BUNDLE override a session's verify setting, which would make a pinned
        server certificate (or verify=False) silently ignored, so the environment is not consulted then.
        """
        if not self._remote:
            return None
        from pylxd.client import CERTS_PATH, get_session_for_url

        verify = self.verify
        if verify is True:
            # Like pylxd and lxc: a server certificate accepted earlier (`lxc remote add`) pins the server.
            host = re.sub(r"]?(:[0-9]+)?$", "", re.sub(r"^https://\[?", "", self.uri.rstrip("/")))
            known = os.path.join(CERTS_PATH, "servercerts", f"{host}.crt")
            verify = known if os.path.exists(known) else True
        session = get_session_for_url(self.uri.rstrip("/"), verify=verify, cert=self.cert)
        if verify is not True:
            session.trust_env = False
        return session

    def has_extension(self, name: str) -> bool:
        return name in (self._connection().server.get("api_extensions") or ())

    @staticmethod
    def _body(r: Any) -> Any:
        """The metadata of a sync answer; LxdApiError for an error answer."""
        try:
            body = r.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if r.status_code >= 400 or body.get("type") == "error":
            raise LxdApiError(
                r.status_code if r.status_code >= 400 else int(body.get("error_code") or 500),
                body.get("error") or r.text.strip(),
            )
        return body

    def _call(
        self,
        method: str,
        path: str,
        *,
        project: str | None = None,
        json: Any = None,
        params: dict | None = None,
        bound: float = OPERATION_TIMEOUT,
    ) -> Any:
        """One API call (path below /1.0), retried while transient; an async operation is waited for, `bound` s at most."""
        params = dict(params or {})
        if project is not None:
            params["project"] = project
        try:
            body = self._request(method, path, json=json, params=params)
            if body.get("type") == "async":
                return self._wait(body["metadata"]["id"], bound)
            return body.get("metadata")
        except Exception as e:
            if _transport_error(e):
                raise ProviderError(f"cannot reach LXD at {self._where}: {e}") from e
            raise

    def _request(
        self, method: str, path: str, *, json: Any = None, params: dict | None = None, timeout: float | None = None
    ) -> dict:
        """One request's answer body, retried while transient (waiting for an operation is not part of it)."""
        conn = self._connection()

        def once() -> dict:
            with self._bounded(f"{method} {path}", timeout):
                r = conn.session.request(
                    method, conn.endpoint + path, json=json, params=params, timeout=timeout or self.timeout
                )
            return self._body(r)

        return with_retries(once, _transient, self.timeout)

    def _wait(self, op_id: str, bound: float = OPERATION_TIMEOUT) -> Any:
        """The operation's result once it is final, waiting OPERATION_TIMEOUT s at a time, `bound` s in all.

        A wait whose timeout passed answers with the operation still Running (newer LXD with an error):
        giving up there would undo a VM LXD goes on making. Past `bound` the operation is cancelled before
        the caller undoes; LXD cannot cancel every kind (not an image download), and a VM it makes later
        still carries user.vmhost.state=composing, so gc removes it.
        """
        path = f"/operations/{quote(op_id, safe='')}"
        deadline = _clock() + bound
        while True:
            step = max(1, min(OPERATION_TIMEOUT, math.ceil(deadline - _clock())))
            try:
                op = self._request("GET", path + "/wait", params={"timeout": step}, timeout=step + 10)
            except LxdApiError as e:
                if e.status == 404:
                    raise
                op = self._request("GET", path)
            meta = op.get("metadata") or {}
            status = meta.get("status")
            if status == "Success":
                return meta.get("metadata")
            if status in _FINAL:
                raise LxdApiError(int(meta.get("status_code") or 500), meta.get("err") or f"operation {status}")
            if _clock() >= deadline:
                break
        what = meta.get("description") or f"operation {op_id}"
        try:
            self._request("DELETE", path)
            outcome = "cancelled it"
        except Exception as e:  # best effort: the caller undoes either way
            log.warning("could not cancel LXD operation %s (%s): %s", op_id, what, e)
            outcome = "LXD could not cancel it"
        raise LxdApiError(504, f"LXD did not finish {what!r} within {bound:g} s; {outcome}")

    def _get(self, path: str, *, project: str | None = None, **params: Any) -> Any:
        return self._call("GET", path, project=project, params=params)

    def _exists(self, path: str, *, project: str | None = None) -> bool:
        try:
            self._get(path, project=project)
            return True
        except LxdApiError as e:
            if e.status == 404:
                return False
            raise

    def images(self) -> list[dict]:
        """LXD keeps pulled images in its own image store, of which vm-host keeps no record (design §12)."""
        return []

    def prune_images(self, dry_run: bool = False) -> list[str]:
        """Nothing vm-host can prove is its own: LXD's image store is the operator's (`lxc image delete`)."""
        return []

    def confine_floating(self, threads: tuple[int, ...], foreign: bool = False) -> bool:
        """Nothing: LXD cannot keep a floating VM to a thread set without fixing its vCPU count (see
        `confines_floating`). Returns False so callers and the resources report know."""
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.session.close()
            self._conn = None
        self._forget()

    # -- discovery -----------------------------------------------------------------------------

    def _resources(self, fresh: bool = False) -> dict:
        """GET /resources, read once per provider instance unless `fresh` (discover re-reads: pages change)."""
        if fresh or self._resources_cache is None:
            self._resources_cache = self._get("/resources") or {}
        return self._resources_cache

    def discover(self) -> HostTopology:
        res = self._resources(fresh=True)
        return HostTopology(
            nodes=self._nodes(res), nics=tuple(self._nics(res)), storage_pools=tuple(self.storage_pools())
        )

    def _nodes(self, res: dict) -> tuple[NumaNode, ...]:
        cores: dict[int, list[Core]] = {}
        for sock in res.get("cpu", {}).get("sockets") or []:
            for core in sock.get("cores") or []:
                by_node: dict[int, list[int]] = {}
                for t in core.get("threads") or []:
                    if t.get("online", True):
                        by_node.setdefault(int(t.get("numa_node") or 0), []).append(int(t["id"]))
                for node, threads in by_node.items():
                    # Core numbers repeat per socket; the lowest thread id is unique host-wide.
                    cores.setdefault(node, []).append(Core(id=min(threads), threads=tuple(sorted(threads))))
        mem = res.get("memory", {})
        # LXD backs `limits.memory.hugepages` with the host's default page size only, so that is the
        # only size offered to placement.
        hp_size = self._default_hugepage_size(mem)
        nodes_mem = {int(n.get("numa_node") or 0): n for n in mem.get("nodes") or []}
        if not nodes_mem:
            nodes_mem = {0: mem}
        nodes = []
        for node_id in sorted(set(cores) | set(nodes_mem)):
            m = nodes_mem.get(node_id, {})
            pages: dict[str, int] = {}
            if hp_size and m.get("hugepages_total"):
                pages[hp_size] = int(m["hugepages_total"]) // HUGEPAGE_SIZES[hp_size]
            nodes.append(
                NumaNode(
                    id=node_id,
                    memory=int(m.get("total") or 0),
                    cores=tuple(sorted(cores.get(node_id, []), key=lambda c: c.id)),
                    hugepages={k: v for k, v in pages.items() if v},
                )
            )
        return tuple(nodes)

    @staticmethod
    def _default_hugepage_size(mem: dict) -> str | None:
        size = int(mem.get("hugepages_size") or 0)
        return next((k for k, v in HUGEPAGE_SIZES.items() if v == size), None)

    def _nics(self, res: dict) -> list[Nic]:
        cards: dict[str, tuple[int | None, int, int | None]] = {}
        for card in (res.get("network") or {}).get("cards") or []:
            numa = card.get("numa_node")
            vfs = int((card.get("sriov") or {}).get("maximum_vfs") or 0)
            for port in card.get("ports") or []:
                speed = port.get("link_speed")  # Mbit/s; 0 or absent: unknown (link down)
                cards[port["id"]] = (numa, vfs, int(speed) if isinstance(speed, int) and speed > 0 else None)
        nics = []
        nets = self._get("/networks", recursion=1) or []
        self._network_kinds = {n["name"]: n.get("type") for n in nets}
        states: dict[str, dict] = {}
        for net in nets:
            if net.get("type") in _NIC_KINDS:
                try:
                    states[net["name"]] = self._get(f"/networks/{quote(net['name'], safe='')}/state") or {}
                except LxdApiError:
                    states[net["name"]] = {}
        port_of = {
            port: name for name, st in states.items() for port in ((st.get("bridge") or {}).get("upper_devices") or [])
        }
        for net in nets:
            kind = net.get("type")
            if kind not in _NIC_KINDS:
                continue
            name = net["name"]
            st = states.get(name, {})
            vlan = (st.get("vlan") or {}).get("vid")
            numa, vfs, speed = cards.get(name, (None, 0, None))
            addresses = tuple(
                f"{a['address']}/{a['netmask']}" for a in st.get("addresses") or [] if a.get("scope") == "global"
            )
            nics.append(
                Nic(
                    name=name,
                    numa_node=numa,
                    sriov_max_vfs=vfs,
                    bridge=port_of.get(name),
                    vlan=int(vlan) if vlan else None,
                    addresses=addresses,
                    kind=kind,
                    link_speed=speed,
                )
            )
        self._nics_cache = nics
        return nics

    def storage_pools(self) -> list[StoragePool]:
        pools = []
        listed = self._get("/storage-pools", recursion=1) or []
        self._pool_names = [p["name"] for p in listed]
        for p in listed:
            space = (self._get(f"/storage-pools/{quote(p['name'], safe='')}/resources") or {}).get("space") or {}
            pools.append(
                StoragePool(
                    name=p["name"],
                    driver=p.get("driver") or "dir",
                    total=int(space.get("total") or 0),
                    used=int(space.get("used") or 0),
                )
            )
        return pools

    def networks(self) -> list[Nic]:
        return self._nics(self._resources())

    # -- VMs -----------------------------------------------------------------------------------

    def _project_exists(self) -> bool:
        if not self._project_known:
            self._project_known = self._exists(f"/projects/{quote(self.project, safe='')}")
        return self._project_known

    def ensure_project(self) -> None:
        """Our project exists (made on first need: a compose, or a client certificate restricted to it)."""
        if self.project == "default" or self._project_exists():
            return
        try:
            self._call(
                "POST",
                "/projects",
                json={
                    "name": self.project,
                    "description": "VMs composed by vm-host",
                    # Share the default project's profiles and images; keep our volumes to ourselves.
                    "config": {
                        "features.images": "false",
                        "features.profiles": "false",
                        "features.storage.volumes": "true",
                    },
                },
            )
        except LxdApiError as e:
            if e.status != 409:
                raise ProviderError(f"cannot create LXD project {self.project!r}: {e}") from e
        self._project_known = True

    def _instances(self) -> list[tuple[str, dict]]:
        """(project, instance) for every VM this host runs that we can see."""
        if self.has_extension("instance_all_projects"):
            items = self._get("/instances", recursion=1, **{"all-projects": "true"}) or []
            found = [(i.get("project") or "default", i) for i in items]
            self._project_known = self._project_known or any(p == self.project for p, _ in found)
            return found
        out = []
        for project in dict.fromkeys(["default", self.project]):
            if project != "default" and not self._project_exists():
                continue
            out += [(project, i) for i in self._get("/instances", project=project, recursion=1) or []]
        return out

    def list_vms(self, addresses: bool = True) -> list[VmInfo]:
        out = [
            self._vm_info(project, inst, addresses)
            for project, inst in self._instances()
            if inst.get("type") == "virtual-machine"
        ]
        self._parsed.end_read()
        return out

    def _host_facts(self) -> tuple[int, str, dict[int, int]]:
        """(memory, default hugepage size, thread -> NUMA node): what reading a VM's limits needs, once per read."""
        res = self._resources()
        if self._facts is None or self._facts[0] is not res:
            mem = res.get("memory", {})
            thread_node = {
                int(t["id"]): int(t.get("numa_node") or 0)
                for s in res.get("cpu", {}).get("sockets") or []
                for c in s.get("cores") or []
                for t in c.get("threads") or []
            }
            self._facts = (res, (int(mem.get("total") or 0), self._default_hugepage_size(mem) or "2M", thread_node))
        return self._facts[1]

    def _vm_info(self, project: str, inst: dict, addresses: bool = True) -> VmInfo:
        """One VM as vm-host sees it: ours from its record, anyone else's from its expanded limits."""
        host_memory, hp_size, thread_node = self._host_facts()
        ours = project == self.project and cfg.owned(inst.get("config") or {})
        name = inst["name"] if project in (self.project, "default") else f"{project}/{inst['name']}"
        config = (
            inst.get("config") if ours else cfg.foreign_config(inst.get("expanded_config") or inst.get("config") or {})
        )
        devices = inst.get("expanded_devices") or inst.get("devices") or {}
        try:
            alloc = cfg.allocation_from_config(
                name,
                config,
                devices,
                host_memory=host_memory,
                thread_node=thread_node,
                hugepage_size=hp_size,
                cache=self._parsed,
            )
        except (ValueError, KeyError) as e:
            log.warning("VM %s has an unreadable allocation (%s); counting it from its limits", name, e)
            config = {k: v for k, v in config.items() if k != cfg.ALLOCATION_KEY}
            alloc = cfg.allocation_from_config(name, config, devices, host_memory=host_memory)
            ours = False
        macs = tuple(
            inst.get("config", {}).get(f"volatile.{label}.hwaddr") or dev.get("hwaddr", "")
            for label, dev in sorted(devices.items())
            if dev.get("type") == "nic"
        )
        if ours:
            alloc = cfg.with_macs(
                alloc, {n.label: inst["config"].get(f"volatile.{n.label}.hwaddr", "") for n in alloc.nics}
            )
        state = str(inst.get("status") or "unknown").lower()
        login_user, host_keys = cfg.access_from_config(inst.get("config") or {}) if ours else (None, ())
        return VmInfo(
            name=name,
            state=state,
            allocation=alloc,
            managed=ours,
            macs=tuple(m for m in macs if m),
            phase=(inst.get("config") or {}).get(cfg.STATE_KEY, STATE_READY) if ours else STATE_READY,
            addresses=self._addresses(project, inst["name"], alloc, macs)
            if addresses and state == "running"
            else static_addresses(alloc),
            login_user=login_user,
            host_keys=host_keys,
        )

    def _addresses(self, project: str, name: str, alloc: Allocation, macs: tuple[str, ...]) -> tuple[str, ...]:
        """Static ip= addresses, then what the instance state reports on its NICs; a failed read logs and keeps the static."""
        try:
            state = self._get(f"/instances/{quote(name, safe='')}/state", project=project)
        except ProviderError as e:
            log.warning("could not read the addresses of VM %s from LXD: %s", name, e)
            state = None
        return vm_addresses(static_addresses(alloc), cfg.state_addresses(state, macs))

    def _read_profile(self, name: str) -> dict | None:
        try:
            return self._get(f"/profiles/{quote(name, safe='')}", project="default") or {}
        except LxdApiError as e:
            if e.status == 404:
                return None
            raise

    def _choose_profile(self) -> str:
        if self._profile_name is None:
            wanted = self.profile or PREFERRED_PROFILE
            found = self._read_profile(wanted)
            if found is None and self.profile:
                raise ProviderError(f"LXD profile {self.profile!r} does not exist; create it or leave profile unset")
            self._profile_name = wanted if found is not None else "default"
            if found is not None:
                self._profile_devices = found.get("devices") or {}
        return self._profile_name

    def _chosen_profile_devices(self) -> dict[str, dict]:
        """The chosen profile's devices (the NICs a VM would inherit), read at most once."""
        name = self._choose_profile()
        if self._profile_devices is None:
            self._profile_devices = (self._read_profile(name) or {}).get("devices") or {}
        return self._profile_devices

    def compose(self, plan: ComposePlan) -> VmInfo:
        check_plan(plan)
        a = plan.allocation
        if plan.cloud_init is not None and any(not n.mac for n in a.nics):
            # The guest's network config matches NICs by MAC, so fix the MACs before LXD would.
            a = cfg.with_macs(a, {n.label: random_mac(LXD_OUI) for n in a.nics if not n.mac})
            plan = replace(plan, allocation=a)
        try:
            body = cfg.instance_body(
                plan,
                profile=self._choose_profile(),
                numa_placement=self.has_extension("numa_cpu_placement"),
                cloud_init_keys=self.has_extension("cloud_init"),
                prefixes=self._prefixes(a) if plan.cloud_init is not None else None,
                profile_devices=None if cfg.keeps_profile_nics(a) else self._chosen_profile_devices(),
                uuid=str(uuid_mod.uuid4()),
                host_keys=generate_host_keys() if plan.cloud_init is not None else (),
            )
            if plan.image and plan.boot == "image" and is_stream_name(plan.image):
                # Resolved here by vm-host's own name rule (one sentence for an unknown name), pulled by LXD.
                found = self.image_server.resolve(plan.image, "lxd")
                cert = self.image_server.certificate()
                body["source"] = cfg.pull_source(self.image_server.url, found.fingerprint, cert)
        except ValueError as e:
            raise ProviderError(str(e)) from e
        if a.hugepages is not None:
            default = self._default_hugepage_size(self._resources().get("memory", {}))
            if a.hugepages.size != default:
                raise ProviderError(
                    f"LXD backs VM memory with the host's default hugepage size ({default or 'none'}), "
                    f"so {a.hugepages.size} pages cannot be used; ask for hugepage_size={default or 'none'}"
                )
        self.ensure_project()
        vm_path = f"/instances/{quote(a.name, safe='')}"
        if self._exists(vm_path, project=self.project):
            raise ProviderError(name_taken(a.name, f"in LXD project {self.project!r}"))
        local = body["source"].get("alias")
        if local and not self._exists(f"/images/aliases/{quote(local, safe='')}", project=self.project):
            raise ProviderError(
                f"LXD has no image alias {local!r} for project {self.project!r} (lxc image alias list); "
                "give one it has, or a stream name such as ubuntu:24.04"
            )
        tx = Transaction()
        for pool, vol in cfg.volume_bodies(a):
            vol_path = f"/storage-pools/{quote(pool, safe='')}/volumes/custom/{quote(vol['name'], safe='')}"
            with tx.step(f"create volume {vol['name']} in pool {pool}"):
                self._call(
                    "POST", f"/storage-pools/{quote(pool, safe='')}/volumes/custom", project=self.project, json=vol
                )
                tx.on_undo(
                    f"delete volume {vol['name']}", lambda p=vol_path: self._call("DELETE", p, project=self.project)
                )
        with tx.step(f"create VM {a.name}"):
            # Registered first: a failed create can leave a half-made record behind.
            # LXD checks NIC parents only at start (which may be much later); check them now.
            self._check_nic_parents(a)
            tx.on_undo(f"delete VM {a.name}", lambda: self._delete_if_exists(vm_path))
            bound = IMAGE_CREATE_TIMEOUT if body["source"]["type"] == "image" else OPERATION_TIMEOUT
            self._call("POST", "/instances", project=self.project, json=body, bound=bound)
        with tx.step(f"mark VM {a.name} ready"):
            self._call("PATCH", vm_path, project=self.project, json={"config": {cfg.STATE_KEY: STATE_READY}})
        if plan.start:
            with tx.step(f"start VM {a.name}"):
                self._state(a.name, "start")
        return self._vm_info(self.project, self._instance(a.name), addresses=False)  # just made: nothing learned yet

    def _prefixes(self, a: Allocation) -> dict[str, int]:
        if not any(n.ip and "/" not in n.ip for n in a.nics):
            return {}
        nics = self._nics_cache if self._nics_cache is not None else self.networks()
        return static_prefixes(a.nics, {n.name: n.addresses for n in nics})

    def _check_nic_parents(self, a: Allocation) -> None:
        if not a.nics:
            return
        if self._network_kinds is None:
            self._network_kinds = {n["name"]: n.get("type") for n in self._get("/networks", recursion=1) or []}
        kinds = self._network_kinds
        for nic in a.nics:
            kind = kinds.get(nic.parent)
            if kind is None:
                raise ProviderError(
                    f"NIC {nic.label} parent {nic.parent!r} is not an interface or network on this host"
                )
            if nic.type == "bridge" and kind != "bridge":
                raise ProviderError(
                    f"NIC {nic.label} parent {nic.parent!r} is a {kind}, not a bridge; use attach=macvlan"
                )

    def _delete_if_exists(self, path: str) -> None:
        try:
            self._call("DELETE", path, project=self.project)
        except LxdApiError as e:
            if e.status != 404:
                raise

    def _instance(self, name: str) -> dict:
        try:
            return self._get(f"/instances/{quote(name, safe='')}", project=self.project)
        except LxdApiError as e:
            if e.status == 404:
                raise NotFound(f"no VM named {name!r} in LXD project {self.project!r}") from e
            raise

    def decompose(self, name: str) -> None:
        inst = self._instance(name)  # 404 also when our project does not exist (yet)
        if not cfg.owned(inst.get("config") or {}):
            raise ProviderError(f"VM {name!r} was not made by vm-host; remove it with lxc, not vmhost")
        self._remove(name, inst)

    def _remove(self, name: str, inst: dict) -> list[str]:
        """Mark decomposing, stop, delete the VM, then the volumes it had attached that carry its owner tag.

        The mark comes first so that a crash anywhere leaves a VM gc finishes; a volume left after the VM is
        gone carries our owner tag naming a VM that no longer exists, which is what gc removes.
        """
        path = f"/instances/{quote(name, safe='')}"
        attached = {
            (d.get("pool"), d.get("source"))
            for d in (inst.get("devices") or {}).values()
            if d.get("type") == "disk" and d.get("source") and d.get("pool")
        }
        try:
            if (inst.get("config") or {}).get(cfg.STATE_KEY) != STATE_DECOMPOSING:
                fault_point(f"mark VM {name} decomposing")
                self._call("PATCH", path, project=self.project, json={"config": {cfg.STATE_KEY: STATE_DECOMPOSING}})
            if str(inst.get("status", "")).lower() != "stopped":
                fault_point(f"stop VM {name}")
                self._state(name, "stop", force=True)
            fault_point(f"delete VM {name}")
            self._delete_if_exists(path)
        except LxdApiError as e:
            raise ProviderError(f"removing VM {name!r} failed: {e}") from e
        removed = []
        for pool, vol in self._our_volumes():
            if vol["config"].get(cfg.OWNER_KEY) == name and (pool, vol["name"]) in attached:
                fault_point(f"delete volume {vol['name']}")
                if self._delete_volume(pool, vol):
                    removed.append(f"{pool}/{vol['name']}")
        return removed

    def _delete_volume(self, pool: str, vol: dict) -> bool:
        """Delete one of our volumes; False (logged) when LXD refuses, e.g. a copy of its VM still uses it."""
        try:
            self._delete_if_exists(
                f"/storage-pools/{quote(pool, safe='')}/volumes/custom/{quote(vol['name'], safe='')}"
            )
            return True
        except (LxdApiError, ProviderError) as e:
            log.warning("kept volume %s/%s: %s", pool, vol["name"], e)
            return False

    def _our_volumes(self) -> list[tuple[str, dict]]:
        out = []
        if self._pool_names is None:
            self._pool_names = [p.rsplit("/", 1)[-1] for p in self._get("/storage-pools") or []]
        for pool in self._pool_names:
            for vol in (
                self._get(f"/storage-pools/{quote(pool, safe='')}/volumes/custom", project=self.project, recursion=1)
                or []
            ):
                if cfg.OWNER_KEY in (vol.get("config") or {}):
                    out.append((pool, vol))
        return out

    def _state(self, name: str, action: str, force: bool = False) -> None:
        try:
            self._call(
                "PUT",
                f"/instances/{quote(name, safe='')}/state",
                project=self.project,
                json={"action": action, "force": force, "timeout": 30},
            )
        except LxdApiError as e:
            if e.status == 404:
                raise NotFound(f"no VM named {name!r} in LXD project {self.project!r}") from e
            raise ProviderError(f"cannot {action} VM {name!r}: {e}") from e

    def start(self, name: str) -> None:
        self._state(name, "start")

    def stop(self, name: str, force: bool = False) -> None:
        self._state(name, "stop", force=force)

    def gc(self) -> list[str]:
        """Finish composes and decomposes a crash left unfinished, and remove our volumes whose VM is gone.

        Only what proves itself ours is touched: VMs in our project whose record is bound to their own
        volatile.uuid (or that never finished compose), volumes with our owner tag. Each failure is logged
        and gc goes on; what it skipped is left for the next gc.
        """
        if not self._project_exists():
            return []
        removed: list[str] = []
        instances = {i["name"]: i for i in self._get("/instances", project=self.project, recursion=1) or []}
        live = set()
        for name, inst in instances.items():
            config = inst.get("config") or {}
            if not cfg.owned(config):
                if cfg.ALLOCATION_KEY in config:
                    log.info("gc left VM %s alone: its vm-host record is not bound to it (a copy?)", name)
                continue
            if config.get(cfg.STATE_KEY) not in (STATE_COMPOSING, STATE_DECOMPOSING):
                live.add(name)
                continue
            try:
                vols = self._remove(name, inst)
                removed += [name, *vols]
                log.info("gc removed unfinished VM %s and volumes %s", name, ", ".join(vols) or "none")
            except Exception as e:
                live.add(name)
                log.warning("gc skipped VM %s for now: %s", name, e)
        try:
            volumes = self._our_volumes()
        except Exception as e:
            log.warning("gc could not list volumes: %s", e)
            volumes = []
        for pool, vol in volumes:
            owner = vol["config"][cfg.OWNER_KEY]
            if owner in live:
                continue
            if self._delete_volume(pool, vol):
                removed.append(f"{pool}/{vol['name']}")
        return removed


__all__ = ["LxdProvider"]
