"""`vmhost serve`: the host's resources as Prometheus metrics, a live page and JSON, read-only.

Every endpoint shows one snapshot: `VmHost.resources()` (the same dict `vmhost resources --json`
prints), read through `CachedReader` so that scrapes cannot pile up on the hypervisor: at most one
read runs at a time, each is time-limited, and its result is reused for a few seconds. The metrics
go through prometheus_client (a custom Collector that turns the snapshot into gauges on each scrape).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vmhost.page import render_page
from vmhost.parse import format_cpuset, parse_listen_address

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9477"
CACHE_SECONDS = 5.0  # a snapshot younger than this is served again (Prometheus scrapes every 15-60 s)
READ_TIMEOUT = 10.0  # s a request waits for the hypervisor before it reports it as not answering
HTTP_TIMEOUT = 15.0  # s a client connection may idle before the server drops it
MAX_CLIENTS = 32  # connections served at once (Prometheus needs one, a few people watching the page a few more)


@dataclass(frozen=True)
class Snapshot:
    """One read of the host: the resources dict, or the reason there is none."""

    resources: dict | None
    error: str | None
    duration: float  # s the read took (or had taken when the time limit ran out)
    taken_at: float  # time.time() of the read
    unfinished_since: dict[str, float] = field(default_factory=dict)  # VM -> time.time() first seen unfinished


class CachedReader:
    """`read()` behind a short cache, one read at a time, each bounded by `timeout`.

    A read that overruns keeps running in its worker (libvirt calls cannot be cancelled); the next
    request waits on that same read instead of starting another, so a hung hypervisor costs one thread.
    """

    def __init__(
        self,
        read: Callable[[], dict],
        *,
        ttl: float = CACHE_SECONDS,
        timeout: float = READ_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._read = read
        self.ttl = ttl
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vmhost-read")
        self._pending: Future | None = None
        self._started = 0.0
        self._last: Snapshot | None = None
        self._last_at = float("-inf")
        self._unfinished: dict[str, float] = {}

    def get(self) -> Snapshot:
        if not self._lock.acquire(timeout=self.timeout + 1):
            return Snapshot(None, "another request is still reading the hypervisor", 0.0, time.time())
        try:
            if self._last is not None and self._clock() - self._last_at < self.ttl:
                return self._last
            if self._pending is None:
                self._started = self._clock()
                self._pending = self._pool.submit(self._read)
            try:
                res = self._pending.result(timeout=max(0.0, self.timeout - (self._clock() - self._started)))
                error = None
            except FutureTimeout:
                return self._remember(None, f"the hypervisor did not answer within {self.timeout:g} s")
            except Exception as e:  # the hypervisor's own words, one line
                res, error = None, f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self._pending = None
            return self._remember(res, error)
        finally:
            self._lock.release()

    def _remember(self, res: dict | None, error: str | None) -> Snapshot:
        now = time.time()
        if res is not None:
            unfinished = {v["name"] for v in res.get("vms", ()) if v.get("phase", "ready") != "ready"}
            self._unfinished = {n: self._unfinished.get(n, now) for n in unfinished}
        snap = Snapshot(res, error, self._clock() - self._started, now, dict(self._unfinished))
        self._last, self._last_at = snap, self._clock()
        return snap

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- metrics ---------------------------------------------------------------------------------------


def _gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _origin(vm: dict) -> str:
    return "ours" if vm.get("managed", True) else "foreign"


def shared_with_foreign(res: dict) -> dict[int, int]:
    """Per NUMA node: threads a vm-host VM pins that a running VM made by others may also run on
    (from the resources' `shared_pinned_threads` report)."""
    node_of = {int(t): n["id"] for n in res["nodes"] for t in n.get("pinned", {})}
    foreign = {v["name"] for v in res["vms"] if not v.get("managed", True)}
    out = {n["id"]: 0 for n in res["nodes"]}
    for s in res.get("shared_pinned_threads") or ():
        if foreign & set(s["shared_with"]) and s["thread"] in node_of:
            out[node_of[s["thread"]]] += 1
    return out


def metric_families(snap: Snapshot) -> Iterator[GaugeMetricFamily]:
    """The snapshot as gauges. Only the read's own health when the hypervisor did not answer."""
    up = _gauge("vmhost_hypervisor_up", "1 if the hypervisor answered the last read, else 0.")
    up.add_metric([], 0 if snap.resources is None else 1)
    yield up
    took = _gauge("vmhost_hypervisor_read_duration_seconds", "How long the last read of the hypervisor took.")
    took.add_metric([], snap.duration)
    yield took
    res = snap.resources
    if res is None:
        return
    yield from _node_families(res)
    yield from _vm_families(res, snap)
    yield from _host_families(res)


def _node_families(res: dict) -> Iterator[GaugeMetricFamily]:
    threads = {
        k: _gauge(f"vmhost_node_{k}threads", doc, ("node",))
        for k, doc in (
            ("", "Online host threads on the NUMA node."),
            ("pinned_", "Threads pinned to a VM (each to exactly one)."),
            ("reserved_", "Threads reserved for the host (never given to VMs)."),
            ("free_", "Threads neither reserved nor pinned: where floating vCPUs run and pinning can take."),
        )
    }
    hp_total = _gauge("vmhost_node_hugepages", "Hugepages of a size on the NUMA node.", ("node", "size"))
    hp_free = _gauge("vmhost_node_hugepages_free", "Hugepages of a size not given to a VM.", ("node", "size"))
    mem = _gauge("vmhost_node_memory_bytes", "Memory of the NUMA node.", ("node",))
    mem_hp = _gauge("vmhost_node_memory_hugepages_bytes", "Memory of the NUMA node held as hugepages.", ("node",))
    mem_cap = _gauge(
        "vmhost_node_memory_general_capacity_bytes",
        "General (non-hugepage) memory VMs may be given on the node, overcommit applied.",
        ("node",),
    )
    mem_bound = _gauge(
        "vmhost_node_memory_general_committed_bytes", "General memory of VMs bound to the node.", ("node",)
    )
    shared = _gauge(
        "vmhost_node_pinned_threads_shared_foreign",
        "Pinned threads a running VM not made by vm-host may also run on.",
        ("node",),
    )
    foreign = shared_with_foreign(res)
    for n in res["nodes"]:
        node = str(n["id"])
        t = n["threads"]
        for k, key in (("", "total"), ("pinned_", "pinned"), ("reserved_", "reserved"), ("free_", "free")):
            threads[k].add_metric([node], t[key])
        for size, hp in n["hugepages"].items():
            hp_total.add_metric([node, size], hp["total"])
            hp_free.add_metric([node, size], hp["free"])
        m = n["memory"]
        mem.add_metric([node], m["total"])
        mem_hp.add_metric([node], m["hugepages"])
        mem_cap.add_metric([node], m["general_capacity"])
        mem_bound.add_metric([node], m["bound"])
        shared.add_metric([node], foreign.get(n["id"], 0))
    yield from threads.values()
    yield from (hp_total, hp_free, mem, mem_hp, mem_cap, mem_bound, shared)


def _vm_families(res: dict, snap: Snapshot) -> Iterator[GaugeMetricFamily]:
    counts: dict[tuple[str, str], int] = {}
    for v in res["vms"]:
        key = (v["state"], _origin(v))
        counts[key] = counts.get(key, 0) + 1
    vms = _gauge(
        "vmhost_vms", "VMs on the host by hypervisor state and origin (ours: made by vm-host).", ("state", "origin")
    )
    for (state, origin), n in sorted(counts.items()):
        vms.add_metric([state, origin], n)
    yield vms
    info = _gauge(
        "vmhost_vm_info",
        "One series per VM: its state, origin, NUMA nodes and pinned threads (empty: floating).",
        ("vm", "state", "origin", "phase", "nodes", "pinned"),
    )
    vcpus = _gauge("vmhost_vm_vcpus", "vCPUs of the VM.", ("vm",))
    memory = _gauge("vmhost_vm_memory_bytes", "Memory of the VM.", ("vm",))
    for v in res["vms"]:
        nodes = ",".join(str(n) for n in v.get("numa_nodes") or ())
        pinned = format_cpuset(v["pinned"]) if v.get("pinned") else ""
        info.add_metric([v["name"], v["state"], _origin(v), v.get("phase", "ready"), nodes, pinned], 1)
        vcpus.add_metric([v["name"]], v["vcpus"])
        memory.add_metric([v["name"]], v["memory"])
    yield from (info, vcpus, memory)
    age = _gauge(
        "vmhost_vm_unfinished_seconds",
        "Seconds since this service first saw the VM's compose or decompose unfinished (vm-host VMs only).",
        ("vm", "phase"),
    )
    phases = {v["name"]: v.get("phase", "ready") for v in res["vms"]}
    for name, since in sorted(snap.unfinished_since.items()):
        age.add_metric([name, phases.get(name, "composing")], max(0.0, snap.taken_at - since))
    yield age


def _host_families(res: dict) -> Iterator[GaugeMetricFamily]:
    pol = res["policy"]
    for key in ("cpu_overcommit_ratio", "memory_overcommit_ratio"):
        g = _gauge(f"vmhost_{key}", f"The {key.replace('_', ' ')} in effect.")
        g.add_metric([], float(pol[key]))
        yield g
    for name, (part, key), doc in (
        ("vmhost_shared_vcpus", ("shared_vcpus", "used"), "Floating vCPUs given to VMs."),
        (
            "vmhost_shared_vcpus_capacity",
            ("shared_vcpus", "capacity"),
            "Floating vCPUs the free threads hold, overcommit applied.",
        ),
        ("vmhost_memory_general_committed_bytes", ("memory", "used"), "General memory given to VMs."),
        (
            "vmhost_memory_general_capacity_bytes",
            ("memory", "capacity"),
            "General memory VMs may be given, overcommit applied.",
        ),
    ):
        g = _gauge(name, doc)
        g.add_metric([], res[part][key])
        yield g
    pools = {
        k: _gauge(f"vmhost_storage_pool_{k}bytes", doc, ("pool",))
        for k, doc in (
            ("", "Size of the storage pool."),
            ("used_", "Bytes the pool reports used."),
            ("committed_", "Bytes of disks vm-host VMs were given in the pool."),
        )
    }
    for p in res["storage_pools"]:
        pools[""].add_metric([p["name"]], p["total"])
        pools["used_"].add_metric([p["name"]], p["used"])
        pools["committed_"].add_metric([p["name"]], p["committed"])
    yield from pools.values()
    vfs = _gauge("vmhost_nic_sriov_vfs", "SR-IOV virtual functions the NIC offers.", ("nic", "node"))
    vfs_used = _gauge("vmhost_nic_sriov_vfs_used", "SR-IOV virtual functions given to VMs.", ("nic", "node"))
    for nic in res["nics"]:
        if nic["sriov_max_vfs"]:
            node = "" if nic["numa_node"] is None else str(nic["numa_node"])
            vfs.add_metric([nic["name"], node], nic["sriov_max_vfs"])
            vfs_used.add_metric([nic["name"], node], nic["vfs_used"])
    yield from (vfs, vfs_used)


class ResourceCollector(Collector):
    """prometheus_client calls collect() on every scrape; the reader decides whether that reads the host."""

    def __init__(self, reader: CachedReader):
        self.reader = reader

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from metric_families(self.reader.get())


def registry(reader: CachedReader) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ResourceCollector(reader))
    ProcessCollector(namespace="vmhost", registry=reg)
    return reg


# --- HTTP ------------------------------------------------------------------------------------------

# Nothing is fetched from anywhere: inline style and script only, and requests back to this server.
CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src data:"


class _Handler(BaseHTTPRequestHandler):
    server: ExporterServer
    timeout = HTTP_TIMEOUT
    server_version = "vmhost"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", b"read-only: GET or HEAD\n", True)

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse

    def _serve(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                data, ctype = generate_latest(self.server.registry), CONTENT_TYPE_LATEST
            elif path in ("/", "/index.html"):
                data, ctype = render_page(self.server.reader.get()).encode(), "text/html; charset=utf-8"
            elif path == "/api/resources":
                snap = self.server.reader.get()
                if snap.resources is None:
                    payload = json.dumps({"error": snap.error}).encode() + b"\n"
                    self._send(HTTPStatus.SERVICE_UNAVAILABLE, "application/json", payload, body)
                    return
                data = json.dumps(snap.resources, indent=2, sort_keys=True).encode() + b"\n"
                ctype = "application/json"
            else:
                self._send(
                    HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found: /, /metrics, /api/resources\n", body
                )
                return
        except Exception:
            log.exception("serving %s failed", path)
            self._send(
                HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", b"internal error; see the log\n", body
            )
            return
        self._send(HTTPStatus.OK, ctype, data, body)

    def _send(self, status: HTTPStatus, ctype: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class ExporterServer(ThreadingHTTPServer):
    """A thread per connection, at most `max_clients` at once: one more is closed at once, not queued."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], reader: CachedReader, max_clients: int = MAX_CLIENTS):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.reader = reader
        self.registry = registry(reader)
        self._slots = threading.BoundedSemaphore(max_clients)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(listen: str, read: Callable[[], dict], **reader_options: float) -> ExporterServer:
    """A server bound to `listen` (IP:PORT, validated); serve_forever() runs it."""
    return ExporterServer(parse_listen_address(listen), CachedReader(read, **reader_options))
