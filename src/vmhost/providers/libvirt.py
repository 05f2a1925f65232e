"""The libvirt/KVM provider: discovery, compose as a transaction, and reading allocations back.

libvirt is the only database (docs/design.md §3): each domain carries its Allocation in `<metadata>`, bound
to the domain's own uuid, with the list of volumes made for it written before any of them is created
(volumes have no metadata of their own). Usage is recomputed from libvirt, and `gc` finishes what a crash
left unfinished from those records alone, never from names. The XML itself comes from the pure builder in libvirt_xml.

Over ~400 lines for now: one class over one daemon (connection, discovery, compose transaction, gc,
floating affinity). XML building is already libvirt_xml.py; discovery is moving to libvirt_discovery.py
(numa branch), after which compose/gc are the next split.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from vmhost.cloudinit import seed_documents, static_prefixes, write_seed_iso
from vmhost.hostkeys import HostKeyPair, generate_host_keys
from vmhost.model import (
    Allocation,
    ComposePlan,
    Core,
    DiskAllocation,
    HostTopology,
    Nic,
    NicAllocation,
    NumaNode,
    StoragePool,
    VmInfo,
)
from vmhost.parse import HUGEPAGE_SIZES, ParseCache, format_cpuset, parse_cpuset
from vmhost.providers.addresses import static_addresses, vm_addresses
from vmhost.providers.base import (
    NAME_PREFIX,
    QEMU_OUI,
    STATE_COMPOSING,
    STATE_DECOMPOSING,
    STATE_READY,
    UNFINISHED,
    ComposeError,
    NotFound,
    ProviderError,
    Transaction,
    check_plan,
    fault_point,
    name_taken,
    random_mac,
    volume_name,
    with_retries,
)
from vmhost.providers.image_source import ImageServer
from vmhost.providers.libvirt_addresses import dynamic_addresses
from vmhost.providers.libvirt_discovery import cell_hugepages, is_remote, remote_nics
from vmhost.providers.libvirt_images import FILE_POOLS, Bases, check_root_fits, is_base
from vmhost.providers.libvirt_images import volume_xml as _volume_xml
from vmhost.providers.libvirt_xml import (
    DOMAIN_TYPES,
    METADATA_NS,
    METADATA_PREFIX,
    SEED_LABEL,
    Record,
    VolumeRef,
    allocation_from_foreign_xml,
    domain_xml,
    read_record,
    record_element,
)
from vmhost.simplestreams import StreamImage, is_stream_name
from vmhost.timeouts import DEFAULT_CALL_TIMEOUT, IMAGE_TIMEOUT, OPERATION_TIMEOUT, BoundedRunner, HypervisorTimeout

try:
    import libvirt

    # libvirt prints every error to stderr by default, even ones we handle (a lookup that finds nothing);
    # ours are raised as ProviderError with one sentence instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
except ImportError:  # importable without the binding (unit tests of the XML); connect() says what is missing
    libvirt = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_URI = "qemu:///system"
# Where images named by a bare name are looked up (the charm's libvirt-image-dir option).
DEFAULT_IMAGE_DIR = "/var/lib/vmhost/images"
IMAGE_SUFFIXES = ("", ".qcow2", ".img", ".raw")
_SYSFS_NET = Path("/sys/class/net")
_SYSFS_NODES = Path("/sys/devices/system/node")
_PAGE_DIR_SIZES = {f"hugepages-{b // 1024}kB": label for label, b in HUGEPAGE_SIZES.items()}


def _code(e: BaseException) -> int | None:
    return e.get_error_code() if libvirt is not None and isinstance(e, libvirt.libvirtError) else None


def _transient(e: BaseException) -> bool:
    """Worth retrying: libvirt's state-change lock timed out, or the daemon is (re)starting."""
    if libvirt is None or not isinstance(e, libvirt.libvirtError):
        return False
    msg = str(e).lower()
    return _code(e) == libvirt.VIR_ERR_OPERATION_TIMEOUT or "connection refused" in msg


def _transient_connect(e: BaseException) -> bool:
    return _transient(e) or _code(e) in (
        getattr(libvirt, "VIR_ERR_SYSTEM_ERROR", -1),
        getattr(libvirt, "VIR_ERR_NO_CONNECT", -1),
    )


# Calls that do real work on the host (start or stop a VM, create, grow, wipe or delete a volume, flush
# an upload) are allowed OPERATION_TIMEOUT s at least; everything else gets the call limit.
_SLOW_CALLS = frozenset(
    {
        "create",
        "createWithFlags",
        "destroy",
        "destroyFlags",
        "createXML",
        "delete",
        "resize",
        "wipe",
        "refresh",
        "finish",
    }
)
# Answered by the binding itself, no round trip to the daemon.
_LOCAL_CALLS = frozenset({"name", "UUIDString", "UUID"})
UPLOAD_CHUNK = 256 * 1024
SEED_MODE = "0600"


class _Bounded:
    """A libvirt object whose calls run on the connection's worker with a time limit (see vmhost.timeouts).

    Objects the calls return (domains, pools, volumes, streams, lists of them) come back wrapped the same
    way, so no call on the connection can block its caller past the limit.
    """

    __slots__ = ("_obj", "_provider")

    def __init__(self, obj: Any, provider: LibvirtProvider):
        self._obj = obj
        self._provider = provider

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._obj, name)
        if name.startswith("_") or name in _LOCAL_CALLS or not callable(attr):
            return attr
        p = self._provider
        bound = max(p.timeout, OPERATION_TIMEOUT) if name in _SLOW_CALLS else p.timeout

        def call(*args: Any) -> Any:
            return _bounded(p._runner.call(attr, *args, bound=bound, what=name), p)

        return call


def _bounded(value: Any, provider: LibvirtProvider) -> Any:
    if isinstance(value, list):
        return [_bounded(v, provider) for v in value]
    if type(value).__module__ == "libvirt" and type(value).__name__.startswith("vir"):
        return _Bounded(value, provider)
    return value


def _msg(e: BaseException) -> str:
    return (e.get_error_message() if _code(e) is not None else str(e)) or str(e)


_STATES = {
    0: "unknown",  # NOSTATE
    1: "running",
    2: "running",  # BLOCKED: running, waiting on I/O
    3: "paused",
    4: "stopping",
    5: "stopped",
    6: "crashed",
    7: "suspended",
}


class LibvirtProvider:
    """vm-host on libvirt/QEMU-KVM (`qemu:///system`, or remote `qemu+ssh://user@host/system`)."""

    name = "libvirt"
    confines_floating = True

    def __init__(
        self,
        uri: str | None = None,
        image_dir: str | None = None,
        timeout: float = DEFAULT_CALL_TIMEOUT,
        image_server: str | None = None,
        image_server_cert: str | None = None,
        domain_type: str = "auto",
    ):
        if domain_type not in ("auto", *DOMAIN_TYPES):
            raise ProviderError(f"domain type {str(domain_type)[:20]!r} is not one of auto, {', '.join(DOMAIN_TYPES)}")
        self.domain_type = domain_type  # auto: kvm where the hypervisor offers it, else qemu (TCG)
        self.uri = uri or DEFAULT_URI
        self.image_dir = image_dir or DEFAULT_IMAGE_DIR
        self.image_server = ImageServer(image_server, cafile=image_server_cert)  # checked now: one sentence if bad
        self.bases = Bases(self)
        self.timeout = float(timeout)
        self._runner = BoundedRunner(f"libvirt at {self.uri}", self.timeout)
        self._conn = None
        self._caps: ET.Element | None = None
        self._parsed: ParseCache[tuple[Allocation, bool, tuple[str, ...], str, Record | None]] = (
            ParseCache()
        )  # by domain XML
        # sysfs describes this machine only; a remote host is read through libvirt alone (libvirt_discovery).
        self.local = not is_remote(self.uri)

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def conn(self):
        if self._conn is None:
            if libvirt is None:
                raise ProviderError("libvirt-python is not installed; install the libvirt-python package")
            try:
                raw = with_retries(
                    lambda: self._runner.call(libvirt.open, self.uri, what="the connection"),
                    _transient_connect,
                    self.timeout,
                )
                self._conn = _Bounded(raw, self)
            except libvirt.libvirtError as e:
                raise ProviderError(f"cannot connect to libvirt at {self.uri}: {_msg(e)}") from e
        return self._conn

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return with_retries(lambda: fn(*args), _transient, self.timeout)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except ProviderError:
            raise
        except Exception as e:
            if _code(e) is None:
                raise
            raise ProviderError(f"libvirt could not {what}: {_msg(e)}") from e

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _domain(self, name: str):
        try:
            return self._call(self.conn.lookupByName, name)
        except ProviderError:
            raise
        except Exception as e:
            if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"no VM named {name!r} on this host") from e
            raise ProviderError(f"libvirt could not look up VM {name!r}: {_msg(e)}") from e

    # -- discovery ----------------------------------------------------------------------------

    def _capabilities(self) -> ET.Element:
        """The host's CPU and NUMA layout; read once per provider (it cannot change while we run)."""
        if self._caps is None:
            with self._errors("read the host capabilities"):
                self._caps = ET.fromstring(self._call(self.conn.getCapabilities))
        return self._caps

    def resolved_domain_type(self) -> str:
        """kvm or qemu: the forced type if the hypervisor offers it, else (auto) kvm where offered, else qemu."""
        offered = {d.get("type") for d in self._capabilities().findall("guest/arch[@name='x86_64']/domain")}
        if self.domain_type == "auto":
            return "kvm" if "kvm" in offered else "qemu"
        if self.domain_type not in offered:
            raise ProviderError(
                f"domain type {self.domain_type!r} is not offered by libvirt at {self.uri} "
                f"(it offers: {', '.join(sorted(t for t in offered if t)) or 'none'}); use auto"
            )
        return self.domain_type

    def discover(self) -> HostTopology:
        caps = self._capabilities()
        cells = caps.findall("host/topology/cells/cell")
        if not cells:
            raise ProviderError(f"libvirt at {self.uri} reports no NUMA cells; its capabilities lack a host topology")
        nodes = []
        for cell in cells:
            node_id = int(cell.get("id"))
            mem_el = cell.find("memory")
            memory = int(mem_el.text) * (1024 if mem_el.get("unit", "KiB") == "KiB" else 1)
            nodes.append(
                NumaNode(id=node_id, memory=memory, cores=_cores(cell), hugepages=self._hugepages(node_id, cell))
            )
        return HostTopology(nodes=tuple(nodes), nics=tuple(self.networks()), storage_pools=tuple(self.storage_pools()))

    def _hugepages(self, node_id: int, cell: ET.Element) -> dict[str, int]:
        """Total pages per size on a node: sysfs when local (exact, per node), else libvirt's <pages>."""
        pages: dict[str, int] = {}
        node_dir = _SYSFS_NODES / f"node{node_id}" / "hugepages"
        if self.local and node_dir.is_dir():
            for d in node_dir.iterdir():
                label = _PAGE_DIR_SIZES.get(d.name)
                if label:
                    pages[label] = int((d / "nr_hugepages").read_text())
            return pages
        return cell_hugepages(cell)

    def storage_pools(self) -> list[StoragePool]:
        out = []
        with self._errors("list storage pools"):
            for pool in self._call(self.conn.listAllStoragePools, libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
                _state, capacity, _allocation, available = pool.info()
                driver = ET.fromstring(pool.XMLDesc(0)).get("type", "dir")
                out.append(StoragePool(pool.name(), driver, capacity, capacity - available))
        return sorted(out, key=lambda p: p.name)

    def networks(self) -> list[Nic]:
        """Host interfaces (sysfs + `ip` when local, libvirt node devices when remote) and libvirt networks."""
        nics = _local_nics() if self.local else self._remote_nics()
        with self._errors("list networks"):
            for net in self._call(self.conn.listAllNetworks, libvirt.VIR_CONNECT_LIST_NETWORKS_ACTIVE):
                nics.append(Nic(name=net.name(), kind="network"))
        return nics

    def _remote_nics(self) -> list[Nic]:
        with self._errors("list host interfaces"):
            return remote_nics(self.conn, self._call, libvirt)

    # -- reading VMs back -----------------------------------------------------------------------

    def _node_ids(self) -> tuple[int, ...]:
        return tuple(int(c.get("id")) for c in self._capabilities().findall("host/topology/cells/cell")) or (0,)

    def _info(self, dom, host_nodes: tuple[int, ...] | None = None, addresses: bool = True) -> VmInfo:
        """One domain; its definition is parsed only when it changed since the last read (self._parsed).

        The definition, not the live XML: vm-host's live confinement of a foreign VM would otherwise
        read back as that VM pinning itself to the shared threads.
        """
        alloc, managed, macs, phase, rec = self._parsed.get(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), lambda text: self._read(text, host_nodes)
        )
        state = _STATES.get(dom.state()[0], "unknown")
        learned = addresses and state == "running"
        dynamic = dynamic_addresses(dom, macs, (libvirt.libvirtError, ProviderError)) if learned else []
        return VmInfo(
            dom.name(),
            state,
            alloc,
            managed=managed,
            macs=macs,
            phase=phase,
            addresses=vm_addresses(static_addresses(alloc) if managed else (), dynamic),
            login_user=rec.login_user if rec else None,
            host_keys=rec.host_keys if rec else (),
        )

    def _read(
        self, text: str, host_nodes: tuple[int, ...] | None
    ) -> tuple[Allocation, bool, tuple[str, ...], str, Record | None]:
        xml = ET.fromstring(text)
        rec = read_record(xml)
        macs = tuple(m.get("address") for m in xml.findall("devices/interface/mac") if m.get("address"))
        if rec is None:
            foreign = allocation_from_foreign_xml(xml, host_nodes=host_nodes or self._node_ids())
            return foreign, False, macs, "ready", None
        return rec.allocation, True, macs, rec.state, rec

    def list_vms(self, addresses: bool = True) -> list[VmInfo]:
        host_nodes = self._node_ids()
        out = []
        with self._errors("list domains"):
            for dom in self._call(self.conn.listAllDomains, 0):
                try:
                    out.append(self._info(dom, host_nodes, addresses))
                except libvirt.libvirtError as e:
                    if _code(e) != libvirt.VIR_ERR_NO_DOMAIN:  # vanished between list and read
                        raise
        self._parsed.end_read()
        return sorted(out, key=lambda v: v.name)

    # -- compose --------------------------------------------------------------------------------

    def compose(self, plan: ComposePlan) -> VmInfo:
        a = plan.allocation
        check_plan(plan)
        if plan.boot == "image" and not (plan.image and a.disks):
            raise ProviderError("boot=image needs an image and a root disk; give both or use boot=network")
        stream: StreamImage | None = None
        if plan.image and is_stream_name(plan.image):
            if not a.disks:
                raise ProviderError(f"image {plan.image} needs a root disk to be copied onto; give storage")
            stream = self.image_server.resolve(plan.image, "disk")  # before anything is made
        elif plan.image:
            plan = replace(plan, image=resolve_image(plan.image, self.image_dir))
            if a.disks:
                _check_root_holds_image(a.disks[0], plan.image)
        with contextlib.suppress(NotFound):
            self._domain(a.name)
            raise ProviderError(name_taken(a.name))
        untagged = self._check_vlans(a.nics)
        domain_type = self.resolved_domain_type()
        nics = tuple(replace(n, mac=n.mac or random_mac(QEMU_OUI)) for n in a.nics)
        plan = replace(plan, allocation=replace(a, nics=nics))
        a = plan.allocation
        # Every volume is planned, checked free and recorded in the domain's metadata BEFORE it is created,
        # so a volume vm-host deletes is one its own record names (gc never goes by name alone).
        volumes: dict[str, VolumeRef] = {}
        sizes: dict[str, tuple[int, int]] = {}  # label -> (capacity at creation, size to grow to)
        for i, disk in enumerate(a.disks):
            image = plan.image if i == 0 and plan.image and not stream else None
            fmt, capacity = self._volume_format(disk.pool, disk.size, image)
            volumes[disk.label] = VolumeRef(disk.pool, volume_name(a.name, disk.label), fmt)
            sizes[disk.label] = (capacity, disk.size)
        seed = VolumeRef(self._seed_pool(a), volume_name(a.name, SEED_LABEL), "raw") if plan.cloud_init else None
        owned = [(v.pool, v.volume) for v in [*volumes.values(), *([seed] if seed else [])]]
        self._check_volumes_free(owned)
        # A stream image's base is shared, not this VM's: made (and verified) before the VM, never undone by it.
        base = None
        if stream:
            with self._errors(f"make the base volume of image {plan.image}"):
                base = self.bases.ensure(self.image_server, stream, a.disks[0].pool, a.disks[0])
        tx = Transaction()
        # The VM's SSH host keys: public halves into its record, the pairs into its seed only.
        host_keys = generate_host_keys() if plan.cloud_init else ()
        with tx.step("resolve SR-IOV VFs"):
            vfs = self._free_vfs([n for n in nics if n.type == "sriov"])
        with tx.step("define domain"):
            xml = domain_xml(
                plan,
                volumes=volumes,
                seed=seed,
                vf_addresses=vfs,
                state=STATE_COMPOSING,
                uuid=str(uuid_mod.uuid4()),
                owned_volumes=owned,
                untagged=untagged,
                disabled_cpu_features=self._emulated_only_features(),
                domain_type=domain_type,
                host_keys=[k.public for k in host_keys],
            )
            dom = self._call(self.conn.defineXML, xml)
            # Kept when an undo before it failed: its record is then what lets gc remove the rest.
            tx.on_undo("undefine domain", lambda: _undefine(dom) if not tx.undo_failures else None)
        for i, disk in enumerate(a.disks):
            with tx.step(f"create volume {disk.label} in pool {disk.pool}"):
                if i == 0 and base:
                    vol = self.bases.overlay(disk.pool, volumes[disk.label].volume, disk.size, base)
                    tx.on_undo(f"delete volume {volumes[disk.label].volume}", vol.delete)
                    continue
                image = plan.image if i == 0 and plan.image else None
                self._create_volume(tx, volumes[disk.label], *sizes[disk.label], image)
        if seed:
            with tx.step("create cloud-init seed"):
                self._create_seed(tx, plan, seed, host_keys)
        if plan.start:
            with tx.step("start domain"):
                self._call(dom.create)
                tx.on_undo("destroy domain", lambda: _destroy(dom))
        with tx.step("mark ready"):
            self._set_state(dom, STATE_READY)
        return self._info(dom, addresses=False)  # just made: its static addresses, no lease yet

    def _emulated_only_features(self) -> tuple[str, ...]:
        """Features KVM offers host-passthrough guests that the host CPU itself lacks and QEMU may fail to set.

        arch-capabilities (MSR 0x10a) on AMD or nested hosts makes QEMU abort at start ("failed to set MSR
        0x10a"); hiding it when the hardware has no such MSR loses nothing.
        """
        caps = self._capabilities()
        host = {f.get("name") for f in caps.findall("host/cpu/feature")}
        return tuple(f for f in ("arch-capabilities",) if f not in host)

    def _check_vlans(self, nics: tuple[NicAllocation, ...]) -> set[str]:
        """Labels of bridge NICs whose VLAN the bridge already carries; refuse tags a Linux bridge cannot set.

        libvirt tags guest ports only on Open vSwitch bridges; tagging by hand after start would be lost on
        the next `virsh start`, silently putting the guest on the wrong VLAN, so we refuse instead.
        """
        tagged = [n for n in nics if n.type == "bridge" and n.vlan is not None]
        if not tagged:
            return set()
        host = {n.name: n for n in (_local_nics() if self.local else self._remote_nics())}
        untagged = set()
        for nic in tagged:
            br = host.get(nic.parent)
            if br is not None and br.vlan == nic.vlan:
                untagged.add(nic.label)
            elif self.local and (_SYSFS_NET / nic.parent / "bridge").is_dir():
                raise ProviderError(
                    f"NIC {nic.label!r} wants VLAN {nic.vlan} on Linux bridge {nic.parent!r}, which libvirt cannot tag; "
                    f"use a bridge over a VLAN {nic.vlan} interface or an Open vSwitch bridge"
                )
        return untagged

    def _set_state(self, dom, state: str) -> None:
        """Rewrite our record with a new state (uuid and volumes kept)."""
        rec = read_record(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if rec is None:
            raise ProviderError(f"domain {dom.name()!r} lost its vm-host metadata")
        el = record_element(replace(rec, state=state))
        el.tag = "allocation"  # libvirt puts it in METADATA_NS itself
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            ET.tostring(el, encoding="unicode"),
            METADATA_PREFIX,
            METADATA_NS,
            flags,
        )

    def _pool(self, name: str):
        try:
            return self._call(self.conn.storagePoolLookupByName, name)
        except Exception as e:
            if _code(e) == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise ProviderError(f"storage pool {name!r} does not exist on this host") from e
            raise

    def _volume_format(self, pool_name: str, size: int, image: str | None) -> tuple[str, int]:
        """(format, capacity at creation) of a volume of `size` in `pool_name`, filled from `image` when given."""
        pool = self._pool(pool_name)
        driver = ET.fromstring(pool.XMLDesc(0)).get("type", "dir")
        if not image:
            return ("qcow2" if driver in FILE_POOLS else "raw"), size
        img_fmt, virtual = _image_format(image)
        if img_fmt == "qcow2" and driver not in FILE_POOLS:
            raise ProviderError(
                f"image {image} is qcow2 but pool {pool_name!r} ({driver}) holds raw volumes; "
                "convert it with qemu-img convert -O raw"
            )
        return img_fmt, (virtual if img_fmt == "qcow2" else max(size, virtual))

    def _check_volumes_free(self, volumes: list[tuple[str, str]]) -> None:
        """Refuse a volume name that already exists: vm-host never takes over a volume it did not make."""
        for pool_name, name in volumes:
            try:
                self._pool(pool_name).storageVolLookupByName(name)
            except Exception as e:
                if _code(e) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                    continue
                raise ProviderError(f"libvirt could not look up volume {name!r} in pool {pool_name!r}: {_msg(e)}")
            raise ProviderError(
                f"a volume named {name!r} already exists in pool {pool_name!r} and vm-host did not make it for "
                "this VM; remove or rename that volume, or choose another VM name"
            )

    def _create_volume(self, tx: Transaction, ref: VolumeRef, capacity: int, size: int, image: str | None) -> None:
        """The volume `ref` (recorded in the domain beforehand); filled from `image` when given, then grown to `size`."""
        pool = self._pool(ref.pool)
        vol = self._call(pool.createXML, _volume_xml(ref.volume, capacity, ref.format), 0)
        tx.on_undo(f"delete volume {ref.volume}", vol.delete)
        if image:
            self._upload(vol, image)
            if ref.format == "qcow2" and size > capacity:
                pool.refresh(0)
                vol = pool.storageVolLookupByName(ref.volume)
                vol.resize(size, 0)

    def _upload(self, vol, path: str) -> None:
        """Copy an image into a volume, chunk by chunk: each chunk within the call limit, all within IMAGE_TIMEOUT."""
        length = os.path.getsize(path)
        stream = self.conn.newStream(0)
        vol.upload(stream, 0, length, 0)
        limit = max(self.timeout, IMAGE_TIMEOUT)
        deadline = time.monotonic() + limit
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(UPLOAD_CHUNK):
                    while chunk:
                        chunk = chunk[stream.send(chunk) :]
                    if time.monotonic() > deadline:
                        raise HypervisorTimeout(
                            f"copying image {path} to libvirt at {self.uri} took more than {limit:g} s"
                        )
            stream.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise

    def _seed_pool(self, a) -> str:
        # a.resource_pool is the operator's resource pool (a VM grouping), never a storage pool.
        return a.disks[0].pool if a.disks else self._default_pool()

    def _create_seed(
        self, tx: Transaction, plan: ComposePlan, ref: VolumeRef, host_keys: tuple[HostKeyPair, ...]
    ) -> None:
        a = plan.allocation
        host = {n.name: n.addresses for n in (_local_nics() if self.local else [])}
        prefixes = static_prefixes(a.nics, host)
        docs = seed_documents(plan.cloud_init, a.nics, instance_id=a.name, prefixes=prefixes, host_keys=host_keys)
        with tempfile.TemporaryDirectory(prefix="vmhost-seed-") as tmp:
            iso = write_seed_iso(docs, Path(tmp) / "seed.iso")
            pool = self._pool(ref.pool)
            # The seed holds the VM's private SSH host keys: root (and the VM's QEMU) only.
            vol = self._call(pool.createXML, _volume_xml(ref.volume, iso.stat().st_size, "raw", SEED_MODE), 0)
            tx.on_undo(f"delete volume {ref.volume}", vol.delete)
            self._upload(vol, str(iso))

    def _default_pool(self) -> str:
        names = [p.name for p in self.storage_pools()]
        if not names:
            raise ProviderError("no active storage pool on this host for the cloud-init seed")
        return "default" if "default" in names else names[0]

    def _free_vfs(self, nics: list[NicAllocation]) -> dict[str, str]:
        """NIC label -> PCI address of a VF of its parent that no domain uses (via libvirt node devices)."""
        if not nics:
            return {}
        used = set()
        for dom in self.conn.listAllDomains(0):
            xml = ET.fromstring(dom.XMLDesc(0))
            for addr in xml.findall("devices/interface/source/address") + xml.findall("devices/hostdev/source/address"):
                if addr.get("bus") is not None:
                    used.add(_pci_str(addr))
        out: dict[str, str] = {}
        for nic in nics:
            free = [vf for vf in self._vfs_of(nic.parent) if vf not in used]
            if not free:
                raise ProviderError(
                    f"no free SR-IOV VF on {nic.parent!r}; all of its VFs are in use or none are enabled"
                )
            out[nic.label] = free[0]
            used.add(free[0])
        return out

    def _vfs_of(self, ifname: str) -> list[str]:
        for dev in self.conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET):
            xml = ET.fromstring(dev.XMLDesc(0))
            if xml.findtext("capability/interface") != ifname:
                continue
            pf = ET.fromstring(self.conn.nodeDeviceLookupByName(xml.findtext("parent")).XMLDesc(0))
            return [_pci_str(a) for a in pf.findall("capability/capability[@type='virt_functions']/address")]
        raise ProviderError(f"host interface {ifname!r} does not exist")

    # -- lifecycle ------------------------------------------------------------------------------

    def decompose(self, name: str) -> None:
        dom = self._domain(name)
        rec = read_record(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        if rec is None:
            raise ProviderError(f"VM {name!r} was not made by vm-host; remove it with virsh if you mean to")
        with self._errors(f"remove VM {name!r}"):
            self._remove(dom, rec)

    def _remove(self, dom, rec: Record) -> list[str]:
        """Destroy, delete the recorded volumes, undefine: the record goes last, so a crash anywhere leaves a
        domain marked decomposing that still names what is left, and gc finishes the job."""
        if rec.state != STATE_DECOMPOSING:
            fault_point("mark decomposing")
            self._set_state(dom, STATE_DECOMPOSING)
        fault_point("destroy domain")
        if dom.isActive():
            _destroy(dom)
        removed = []
        for pool, vol in rec.volumes:
            fault_point(f"delete volume {vol}")
            with contextlib.suppress(NotFound):
                self._delete_volume(pool, vol)
                removed.append(f"{pool}/{vol}")
        fault_point("undefine domain")
        _undefine(dom)
        return removed

    def _delete_volume(self, pool_name: str, vol_name: str) -> None:
        try:
            vol = self._pool(pool_name).storageVolLookupByName(vol_name)
        except Exception as e:
            if _code(e) == libvirt.VIR_ERR_NO_STORAGE_VOL or (
                isinstance(e, ProviderError) and "does not exist" in str(e)
            ):
                raise NotFound(f"no volume {vol_name!r} in pool {pool_name!r}") from e
            raise
        self._call(vol.delete, 0)

    def start(self, name: str) -> None:
        dom = self._domain(name)
        with self._errors(f"start VM {name!r}"):
            if not dom.isActive():
                self._call(dom.create)

    def stop(self, name: str, force: bool = False) -> None:
        dom = self._domain(name)
        with self._errors(f"stop VM {name!r}"):
            if dom.isActive():
                self._call(dom.destroy if force else dom.shutdown)

    # -- floating affinity ----------------------------------------------------------------------

    def confine_floating(self, threads: tuple[int, ...], foreign: bool = False) -> bool:
        """Pin every vCPU and the emulator of each floating VM we made to `threads`, live and in its config.

        Otherwise the kernel runs floating vCPUs on threads that pinned VMs own (docs/design.md §4 rule 1). Only
        pins that differ are set, so repeating it is cheap. With `foreign`, running VMs made by others that
        pin nothing themselves get the same affinity, live only: their definition is not ours to change.
        """
        wanted = frozenset(threads)
        where = format_cpuset(wanted) or "no threads"
        with self._errors(f"confine floating VMs to {where}"):
            ncpus = self._call(self.conn.getCPUMap, 0)[0]
            outside = sorted(t for t in wanted if not 0 <= t < ncpus)
            if outside:
                raise ProviderError(
                    f"threads {format_cpuset(outside)} are not CPUs of this host; it has CPUs 0-{ncpus - 1}"
                )
            cpumap = tuple(i in wanted for i in range(ncpus))
            host_nodes = self._node_ids()
            for dom in self._call(self.conn.listAllDomains, 0):
                try:
                    xml = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                    rec = read_record(xml)
                    if rec is None:
                        if not foreign or not dom.isActive():
                            continue
                        if allocation_from_foreign_xml(xml, host_nodes=host_nodes).pinned is not None:
                            continue  # pins itself to threads placement already keeps ours off
                        if not wanted:
                            log.warning("no shared thread left to keep foreign VM %s off pinned threads", dom.name())
                            continue
                        self._pin_floating(dom, cpumap, config=False)
                        continue
                    if rec.allocation.pinned is not None:
                        continue
                    if not wanted:
                        raise ProviderError(
                            f"no host thread is left for floating VM {dom.name()!r}: every thread is reserved or "
                            "pinned; free a thread or remove the floating VM"
                        )
                    self._pin_floating(dom, cpumap)
                except libvirt.libvirtError as e:
                    if _code(e) != libvirt.VIR_ERR_NO_DOMAIN:  # removed meanwhile: nothing to confine
                        raise
        return True

    def _pin_floating(self, dom, cpumap: tuple[bool, ...], config: bool = True) -> None:
        """Set each vCPU's and the emulator's affinity to `cpumap` in the config, and live when running."""
        scopes = [libvirt.VIR_DOMAIN_AFFECT_CONFIG] if config else []
        if dom.isActive():
            scopes.append(libvirt.VIR_DOMAIN_AFFECT_LIVE)
        for flags in scopes:
            try:
                for vcpu, current in enumerate(self._call(dom.vcpuPinInfo, flags)):
                    if tuple(current) != cpumap:
                        self._call(dom.pinVcpuFlags, vcpu, cpumap, flags)
                if tuple(self._call(dom.emulatorPinInfo, flags)) != cpumap:
                    self._call(dom.pinEmulator, cpumap, flags)
            except libvirt.libvirtError as e:
                # Stopped between isActive() and the live pin: the config pin already covers its next start.
                live = flags == libvirt.VIR_DOMAIN_AFFECT_LIVE
                if live and _code(e) == libvirt.VIR_ERR_OPERATION_INVALID and not dom.isActive():
                    continue
                raise

    def gc(self) -> list[str]:
        """Finish every compose or decompose a crash left unfinished; return what was removed.

        Only domains whose record is ours (bound to their own uuid) are touched, and only the volumes that
        record names. A volume no record names is left alone whatever it is called (it is logged), and one
        domain that cannot be removed now (a busy pool, say) is logged and left for the next gc.
        """
        removed: list[str] = []
        recorded: set[tuple[str, str]] = set()
        with self._errors("list domains"):
            domains = self._call(self.conn.listAllDomains, 0)
        for dom in domains:
            try:
                rec = read_record(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                if rec is None:
                    continue
                recorded.update(rec.volumes)
                if rec.state not in UNFINISHED:
                    continue
                name = dom.name()
                vols = self._remove(dom, rec)
                removed += [name, *vols]
                log.info("gc removed unfinished VM %s (%s) and volumes %s", name, rec.state, ", ".join(vols) or "none")
            except Exception as e:
                if _code(e) == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                log.warning("gc skipped VM %s for now: %s", _safe_name(dom), _msg(e))
        self._log_unrecorded(recorded)
        return removed

    def images(self) -> list[dict]:
        """The base images vm-host keeps (libvirt_images), with what uses each."""
        with self._errors("list base images"):
            return self.bases.listing()

    def prune_images(self, dry_run: bool = False) -> list[str]:
        """Remove the base images no volume or domain uses; returns pool/volume of each."""
        with self._errors("prune base images"):
            return self.bases.prune(dry_run)

    def _log_unrecorded(self, recorded: set[tuple[str, str]]) -> None:
        """Log volumes named like ours that no record names: gc keeps them (it cannot prove they are ours)."""
        try:
            pools = self._call(self.conn.listAllStoragePools, libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
        except Exception as e:
            log.debug("gc could not list pools: %s", _msg(e))
            return
        for pool in pools:
            try:
                names = [v.name() for v in pool.listAllVolumes(0)]
            except Exception as e:
                log.info("gc skipped pool %s: %s", pool.name(), _msg(e))
                continue
            for vname in names:
                if vname.startswith(NAME_PREFIX) and (pool.name(), vname) not in recorded and not is_base(vname):
                    log.info(
                        "gc kept volume %s/%s: no vm-host VM records it, so it is not provably ours", pool.name(), vname
                    )


# -- helpers ---------------------------------------------------------------------------------------


def _cores(cell: ET.Element) -> tuple[Core, ...]:
    """Cores of a capabilities <cell>, grouped by sibling set; offline CPUs (no core_id) left out."""
    groups: dict[tuple[int, ...], int] = {}
    for cpu in cell.findall("cpus/cpu"):
        if cpu.get("core_id") is None:
            continue
        siblings = cpu.get("siblings") or cpu.get("id")
        key = parse_cpuset(siblings)
        groups.setdefault(key, int(cpu.get("core_id")))
    ids = list(groups.values())
    unique = len(set(ids)) == len(ids)  # core_id is per socket: fall back to the first thread when it clashes
    return tuple(
        sorted(
            (Core(id=cid if unique else threads[0], threads=threads) for threads, cid in groups.items()),
            key=lambda c: c.threads,
        )
    )


def _link_speed(text: str | None) -> int | None:
    """Mbit/s from sysfs `speed`; None where the kernel does not know it (-1, a link that is down, a bridge)."""
    if text is None or not text.strip().isdigit():
        return None
    return int(text) or None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _local_nics() -> list[Nic]:
    """Host NICs from `ip -j -d addr` (kinds, masters, VLAN ids, addresses) and sysfs (NUMA node, VFs)."""
    try:
        links = json.loads(
            subprocess.run(["ip", "-j", "-d", "addr"], capture_output=True, text=True, check=True, timeout=10).stdout
        )
    except (OSError, subprocess.SubprocessError, ValueError):  # a hung `ip` too: sysfs names the NICs
        links = [{"ifname": p.name} for p in sorted(_SYSFS_NET.iterdir())] if _SYSFS_NET.is_dir() else []
    kinds = {}
    for link in links:
        name = link["ifname"]
        info_kind = (link.get("linkinfo") or {}).get("info_kind")
        if name == "lo" or (info_kind is None and not (_SYSFS_NET / name / "device").exists()):
            continue
        kind = {None: "physical", "dummy": "physical", "bridge": "bridge", "vlan": "vlan", "bond": "bond"}.get(
            info_kind
        )
        if kind is not None:
            kinds[name] = (kind, link)
    bridge_vlan: dict[str, int] = {}
    gateways = _local_gateways()
    nics = []
    for name, (kind, link) in kinds.items():
        dev = _SYSFS_NET / name / "device"
        node = _read(dev / "numa_node")
        vfs = _read(dev / "sriov_numvfs")  # VFs that exist can be handed out; enabling more is the operator's
        speed = _link_speed(_read(_SYSFS_NET / name / "speed"))
        master = link.get("master")
        bridge = master if master and (_SYSFS_NET / name / "brport").exists() else None
        vlan = ((link.get("linkinfo") or {}).get("info_data") or {}).get("id") if kind == "vlan" else None
        if bridge and vlan is not None:
            bridge_vlan[bridge] = vlan
        addresses = tuple(
            f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info") or () if a.get("scope") == "global"
        )
        nics.append(
            Nic(
                name=name,
                numa_node=int(node) if node and int(node) >= 0 else None,
                sriov_max_vfs=int(vfs) if vfs else 0,
                bridge=bridge,
                vlan=vlan,
                addresses=addresses,
                kind=kind,
                gateways=gateways.get(name, ()),
                link_speed=speed,
            )
        )
    return [replace(n, vlan=bridge_vlan[n.name]) if n.name in bridge_vlan else n for n in nics]


def _local_gateways() -> dict[str, tuple[str, ...]]:
    """Interface -> the routers the host's routes go through on it (placement keeps VMs off them)."""
    out: dict[str, list[str]] = {}
    for family in ("-4", "-6"):
        try:
            routes = json.loads(
                subprocess.run(
                    ["ip", "-j", family, "route"], capture_output=True, text=True, check=True, timeout=10
                ).stdout
            )
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
        for r in routes if isinstance(routes, list) else ():
            if isinstance(r, dict) and r.get("gateway") and r.get("dev"):
                gws = out.setdefault(r["dev"], [])
                if r["gateway"] not in gws:
                    gws.append(r["gateway"])
    return {dev: tuple(gws) for dev, gws in out.items()}


def _pci_str(addr: ET.Element) -> str:
    return (
        f"{int(addr.get('domain', '0'), 16):04x}:{int(addr.get('bus'), 16):02x}:"
        f"{int(addr.get('slot'), 16):02x}.{int(addr.get('function'), 16):x}"
    )


def resolve_image(image: str, image_dir: str | Path) -> str:
    """The file an image stands for: an absolute path as given, a bare name looked up in `image_dir`.

    Only the operator (CLI, compose action) can give an absolute path: the relation passes bare names
    only (vmhost.relation_policy refuses anything else), so a remote model can never point at a host file. A
    name is tried as is, then with .qcow2, .img and .raw; relative paths and '..' are refused, as they
    would depend on the working directory of whatever process composes.
    """
    if os.path.isabs(image):
        if not Path(image).is_file():
            raise ProviderError(f"image {image!r} is not a readable file on this machine")
        return image
    if not image or "/" in image or ".." in image:
        raise ProviderError(
            f"image {image[:80]!r} is neither an absolute path nor the name of an image in {image_dir} "
            "(a name has no '/' and no '..')"
        )
    for suffix in IMAGE_SUFFIXES:
        path = Path(image_dir) / f"{image}{suffix}"
        if path.is_file():
            return str(path)
    tried = ", ".join(f"{image}{s}" for s in IMAGE_SUFFIXES)
    raise ProviderError(f"no image named {image!r} in {image_dir} (looked for {tried}); put the image there")


def _check_root_holds_image(root: DiskAllocation, image: str) -> None:
    """A root disk smaller than its image is refused: the volume would be the image's size while the
    allocation (and every pool count made from it) said less."""
    check_root_fits(root, _image_format(image)[1], image)


def _image_format(path: str) -> tuple[str, int]:
    """("qcow2", virtual size) from the qcow2 header, else ("raw", file size)."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if head[:4] == b"QFI\xfb":
        return "qcow2", int.from_bytes(head[24:32], "big")
    return "raw", os.path.getsize(path)


def _safe_name(dom) -> str:
    try:
        return dom.name()
    except Exception:
        return "?"


def _destroy(dom) -> None:
    with contextlib.suppress(Exception):
        if not dom.isActive():
            return
    dom.destroy()


def _undefine(dom) -> None:
    flags = (
        libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        | getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
    )
    dom.undefineFlags(flags)


__all__ = ["DEFAULT_IMAGE_DIR", "DEFAULT_URI", "ComposeError", "LibvirtProvider", "resolve_image"]
