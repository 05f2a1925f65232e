"""Base images on libvirt: a stream image downloaded once per pool, verified, shared by copy-on-write overlays.

A base is the volume `vmhost-base-<first 32 hex of its sha256>` in a file pool. libvirt volumes carry no
metadata, so what makes a base provably vm-host's is a record vm-host keeps in the same pool, the volume
`vmhost-bases.json` (docs/design.md §11): each base is written there, with its pool and name, BEFORE the
volume is created (as a domain's record names its volumes before they exist), and marked ready once its
bytes matched the stream's sha256. A volume of that name the record does not name is never used or removed.

Bases belong to no VM: compose never undoes one it did not create, gc never touches one, and only
`prune` removes a base, and only while no volume's backing store and no domain's disk uses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vmhost.model import DiskAllocation
from vmhost.parse import format_size, human_size
from vmhost.providers.base import NAME_PREFIX, ProviderError
from vmhost.providers.image_source import ImageServer
from vmhost.simplestreams import StreamImage

try:
    import libvirt
except ImportError:  # the provider says what is missing when it connects
    libvirt = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

BASE_PREFIX = f"{NAME_PREFIX}base-"
REGISTRY = f"{NAME_PREFIX}bases.json"
REGISTRY_FORMAT = "vmhost-bases:1"
REGISTRY_SIZE = 256 * 1024  # bytes: the record volume's fixed size (JSON, padded with spaces)
REGISTRY_MAX = 512  # bases recorded per pool
# Pools whose volumes are files: qcow2 there (thin, snapshot-able, overlays); raw everywhere else (LVM, disk, RBD, iSCSI).
FILE_POOLS = ("dir", "fs", "netfs", "gluster")
DOWNLOADING, READY = "downloading", "ready"
QCOW2_MAGIC = b"QFI\xfb"
_BASE_NAME_RE = re.compile(re.escape(BASE_PREFIX) + "[0-9a-f]{32}")
_SHA256_RE = re.compile("[0-9a-f]{64}")
QCOW2_HEAD = 80  # bytes of a qcow2 header read before anything is made: up to v3's incompatible features
QCOW2_EXTERNAL_DATA = 1 << 2  # incompatible feature bit: the guest's data lives in another file


@dataclass(frozen=True)
class BaseRecord:
    volume: str
    sha256: str
    image: str
    server: str
    version: str
    format: str = ""
    state: str = DOWNLOADING
    created: float = 0.0


def check_root_fits(root: DiskAllocation, virtual: int, image: str) -> None:
    """A root disk smaller than its image is refused: the volume would be the image's size while the
    allocation (and every pool count made from it) said less."""
    if root.size < virtual:
        raise ProviderError(
            f"disk {root.label} is {human_size(root.size)} but image {image} needs {human_size(virtual)}; "
            f"give {root.label}:{format_size(-(-virtual // 1024**2) * 1024**2)} or more"
        )


def check_self_contained(head: bytes, image: str) -> None:
    """A qcow2 from the server must hold all of its bytes: a backing or data file named in its header would
    be opened (and labelled for the guest) by libvirt and QEMU under every overlay, handing that host file,
    another VM's disk say, to the VM. Cloud images name neither."""
    version = int.from_bytes(head[4:8], "big")
    if int.from_bytes(head[8:16], "big"):
        what = "backing file"
    elif version >= 3 and int.from_bytes(head[72:80], "big") & QCOW2_EXTERNAL_DATA:
        what = "external data file"
    else:
        return
    raise ProviderError(
        f"{image} names a {what} in its qcow2 header; vm-host takes only self-contained images from an image server"
    )


def is_base(volume: str) -> bool:
    """Named like a base or the record of bases: gc leaves these to prune (it neither removes nor reports them)."""
    return volume.startswith(BASE_PREFIX) or volume == REGISTRY


def _code(e: BaseException) -> int | None:
    return e.get_error_code() if libvirt is not None and isinstance(e, libvirt.libvirtError) else None


def volume_xml(
    name: str, capacity: int, fmt: str, mode: str | None = None, backing: tuple[str, str] | None = None
) -> str:
    """A storage volume definition (mode: its file mode as octal text; with `backing` (path, format): a
    copy-on-write overlay on it); ElementTree escapes what the name carries."""
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(int(capacity))
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type=fmt)
    if mode:
        ET.SubElement(ET.SubElement(target, "permissions"), "mode").text = mode
    if backing is not None:
        bs = ET.SubElement(vol, "backingStore")
        ET.SubElement(bs, "path").text = backing[0]
        ET.SubElement(bs, "format", type=backing[1])
    return ET.tostring(vol, encoding="unicode")


def _well_formed(r: BaseRecord) -> bool:
    """Fields of the types vm-host writes, and a base's own name: prune deletes what a record names."""
    texts = (r.image, r.server, r.version)
    return (
        isinstance(r.volume, str)
        and _BASE_NAME_RE.fullmatch(r.volume) is not None
        and isinstance(r.sha256, str)
        and _SHA256_RE.fullmatch(r.sha256) is not None
        and all(isinstance(t, str) and len(t) <= 1024 for t in texts)
        and r.format in ("", "qcow2", "raw")
        and r.state in (DOWNLOADING, READY)
        and isinstance(r.created, int | float)
        and not isinstance(r.created, bool)
    )


def _decode_registry(data: bytes, pool: str) -> list[BaseRecord]:
    try:
        doc = json.loads(data.decode("utf-8", "replace").strip() or "{}")
        if doc.get("format") != REGISTRY_FORMAT or not isinstance(doc.get("bases"), list):
            raise ValueError
        fields = set(BaseRecord.__dataclass_fields__)
        records = [BaseRecord(**{k: v for k, v in r.items() if k in fields}) for r in doc["bases"][:REGISTRY_MAX]]
        if not all(map(_well_formed, records)):
            raise ValueError
        return records
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise ProviderError(
            f"volume {REGISTRY} in pool {pool!r} is not vm-host's record of base images (or is damaged); "
            "move it away, and remove the vmhost-base-* volumes there by hand if you mean to"
        ) from None


class Bases:
    """The base images of one libvirt provider (`p`: its connection, pools and bounded calls)."""

    def __init__(self, provider: Any):
        self.p = provider

    # -- the record ------------------------------------------------------------------------------

    def _lookup(self, pool, name: str):
        try:
            return pool.storageVolLookupByName(name)
        except Exception as e:
            if _code(e) == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    def records(self, pool) -> list[BaseRecord]:
        vol = self._lookup(pool, REGISTRY)
        if vol is None:
            return []
        stream = self.p.conn.newStream(0)
        vol.download(stream, 0, REGISTRY_SIZE, 0)
        data = b""
        try:
            while len(data) <= REGISTRY_SIZE:
                chunk = stream.recv(64 * 1024)
                if not isinstance(chunk, bytes) or not chunk:
                    break
                data += chunk
            stream.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                stream.abort()
            raise
        return _decode_registry(data[:REGISTRY_SIZE], pool.name())

    def _write(self, pool, records: list[BaseRecord]) -> None:
        vol = self._lookup(pool, REGISTRY)
        if not records:
            if vol is not None:
                self.p._call(vol.delete, 0)
            return
        if len(records) > REGISTRY_MAX:
            raise ProviderError(f"pool {pool.name()!r} has {REGISTRY_MAX} base images; run vmhost images prune")
        data = json.dumps({"format": REGISTRY_FORMAT, "bases": [asdict(r) for r in records]}).encode()
        if len(data) > REGISTRY_SIZE:
            raise ProviderError(f"the record of base images in pool {pool.name()!r} is full; run vmhost images prune")
        made = vol is None
        if made:
            vol = self.p._call(pool.createXML, volume_xml(REGISTRY, REGISTRY_SIZE, "raw"), 0)
        with tempfile.TemporaryDirectory(prefix="vmhost-bases-") as tmp:
            path = Path(tmp) / "bases.json"
            path.write_bytes(data.ljust(REGISTRY_SIZE, b" "))
            try:
                self.p._upload(vol, str(path))
            except BaseException:
                if made:  # zeros, not a record: every later compose in this pool would refuse it as damaged
                    with contextlib.suppress(Exception):
                        self.p._call(vol.delete, 0)
                raise

    # -- compose ----------------------------------------------------------------------------------

    def ensure(self, server: ImageServer, image: StreamImage, pool_name: str, root: DiskAllocation) -> tuple[str, str]:
        """(path, format) of the verified base for `image` in `pool_name`, downloading it if it is not there.

        A failed download leaves no volume and no record; the base is kept once verified, whatever the
        compose does next (it is a cache, shared by every VM made from the image)."""
        pool = self.p._pool(pool_name)
        driver = ET.fromstring(pool.XMLDesc(0)).get("type", "dir")
        if driver not in FILE_POOLS:
            raise ProviderError(
                f"pool {pool_name!r} ({driver}) holds raw volumes, so a VM cannot be a copy-on-write overlay there; "
                f"put the root disk in a file pool ({', '.join(FILE_POOLS)}) to boot {image.name}"
            )
        name = BASE_PREFIX + image.fingerprint[:32]
        records = self.records(pool)
        rec = next((r for r in records if r.volume == name), None)
        vol = self._lookup(pool, name)
        if rec is not None and rec.state == READY and vol is not None:
            check_root_fits(root, vol.info()[1], str(image.name))
            return vol.path(), rec.format
        if rec is None and vol is not None:
            raise ProviderError(
                f"a volume named {name!r} already exists in pool {pool_name!r} and vm-host's record of base images "
                "does not name it; remove or rename that volume"
            )
        if vol is not None:  # ours, left by a download that did not finish
            self.p._call(vol.delete, 0)
        records = [r for r in records if r.volume != name]
        rec = BaseRecord(name, image.disk.sha256, str(image.name), server.url, image.version, created=time.time())
        self._write(pool, [*records, rec])
        try:
            fmt = self._download(server, image, pool, name, root)
        except BaseException:
            with contextlib.suppress(Exception):
                if (left := self._lookup(pool, name)) is not None:
                    self.p._call(left.delete, 0)
                self._write(pool, records)
            raise
        self._write(pool, [*records, replace(rec, format=fmt, state=READY)])
        self.p._call(pool.refresh, 0)
        vol = pool.storageVolLookupByName(name)
        return vol.path(), fmt

    def _download(self, server: ImageServer, image: StreamImage, pool, name: str, root: DiskAllocation) -> str:
        """Stream the disk into a new volume `name`, hashing as it goes; returns the format found in its header."""
        f = image.disk
        head = b""
        state: dict[str, Any] = {}

        def sink(chunk: bytes) -> None:
            nonlocal head
            if "stream" not in state:
                head += chunk
                if len(head) < QCOW2_HEAD and len(head) < f.size:
                    return
                qcow2 = head[:4] == QCOW2_MAGIC
                if qcow2:
                    check_self_contained(head, f"image {image.name} on {server.url}")
                virtual = int.from_bytes(head[24:32], "big") if qcow2 else f.size
                check_root_fits(root, virtual, str(image.name))
                state["format"] = "qcow2" if qcow2 else "raw"
                vol = self.p._call(pool.createXML, volume_xml(name, virtual, state["format"]), 0)
                stream = self.p.conn.newStream(0)
                vol.upload(stream, 0, f.size, 0)
                state["stream"] = stream
                chunk, head = head, b""
            stream = state["stream"]
            while chunk:
                chunk = chunk[stream.send(chunk) :]

        try:
            server.download(f, sink)
            if "stream" not in state:
                raise ProviderError(f"image {image.name} on {server.url} is empty")
            state["stream"].finish()
        except BaseException:
            if "stream" in state:
                with contextlib.suppress(Exception):
                    state["stream"].abort()
            raise
        return state["format"]

    def overlay(self, pool_name: str, name: str, size: int, base: tuple[str, str]):
        """A qcow2 volume `name` of `size` bytes whose backing store is the base (path, format)."""
        pool = self.p._pool(pool_name)
        return self.p._call(pool.createXML, volume_xml(name, size, "qcow2", backing=base), 0)

    # -- listing and pruning ------------------------------------------------------------------------

    def _users(self) -> dict[str, list[str]]:
        """Path -> what uses it as a backing store (pool/volume) or a disk (domain)."""
        users: dict[str, list[str]] = {}
        for pool in self._pools():
            try:  # a file put in the pool's directory by hand is one of its volumes too
                self.p._call(pool.refresh, 0)
            except Exception as e:  # libvirt refuses while a volume is being built there: what it listed stands
                if _code(e) is None:
                    raise
                log.warning("could not refresh pool %s before looking for base image users: %s", pool.name(), e)
            for vol in pool.listAllVolumes(0):
                path = ET.fromstring(vol.XMLDesc(0)).findtext("backingStore/path")
                if path:
                    users.setdefault(path, []).append(f"{pool.name()}/{vol.name()}")
        for dom in self.p._call(self.p.conn.listAllDomains, 0):
            # A running domain's live definition names its disks' backing chains (an overlay outside any pool
            # on a base); its inactive one, the disks it boots from next.
            flags = (0, libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isActive() else (libvirt.VIR_DOMAIN_XML_INACTIVE,)
            files: set[str] = set()
            for flag in flags:
                for disk in ET.fromstring(dom.XMLDesc(flag)).findall("devices/disk"):
                    for src in (disk.find("source"), *disk.findall(".//backingStore/source")):
                        if src is not None and src.get("file"):
                            files.add(src.get("file"))
            for path in files:
                users.setdefault(path, []).append(f"domain {dom.name()}")
        return users

    def _pools(self) -> list:
        return self.p._call(self.p.conn.listAllStoragePools, libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)

    def listing(self) -> list[dict]:
        users = self._users()
        out = []
        for pool in self._pools():
            for rec in self.records(pool):
                vol = self._lookup(pool, rec.volume)
                path = vol.path() if vol is not None else None
                out.append(
                    {
                        "pool": pool.name(),
                        "volume": rec.volume,
                        "image": rec.image,
                        "server": rec.server,
                        "version": rec.version,
                        "sha256": rec.sha256,
                        "state": rec.state if vol is not None else "missing",
                        "size": vol.info()[2] if vol is not None else 0,
                        "used_by": sorted(users.get(path, [])) if path else [],
                    }
                )
        return out

    def prune(self, dry_run: bool = False) -> list[str]:
        """Remove every recorded base nothing uses (pool/volume names); keep the rest."""
        users = self._users()
        removed = []
        for pool in self._pools():
            try:
                records = self.records(pool)
            except ProviderError as e:
                log.warning("prune skipped pool %s: %s", pool.name(), e)
                continue
            keep = []
            for rec in records:
                vol = self._lookup(pool, rec.volume)
                if vol is not None and users.get(vol.path()):
                    keep.append(rec)
                    continue
                removed.append(f"{pool.name()}/{rec.volume}")
                if vol is not None and not dry_run:
                    self.p._call(vol.delete, 0)
            if not dry_run and len(keep) != len(records):
                self._write(pool, keep)
        return removed


__all__ = ["BASE_PREFIX", "FILE_POOLS", "REGISTRY", "Bases", "check_root_fits", "is_base", "volume_xml"]
