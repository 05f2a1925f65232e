"""Images by name on the REAL libvirtd: a local simplestreams index (tests/functional/simplestreams_index.py)
serves a small qcow2; compose downloads it once into a verified base volume and gives each VM a
copy-on-write overlay on it; a bad checksum, a dead server, an unknown name leave nothing; prune keeps
what is in use. Each test uses a storage pool of its own (a temporary directory), removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.functional.simplestreams_index import ImageIndex, Product, sha256_of
from vmhost.model import Allocation, ComposePlan, DiskAllocation
from vmhost.providers.base import ProviderError, volume_name
from vmhost.providers.libvirt_images import BASE_PREFIX, REGISTRY

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils package) is not installed"),
]
M = 1024**2


@pytest.fixture
def qcow2(tmp_path):
    """A 64 MiB qcow2 holding 4 MiB of random data (a few MiB to download)."""
    raw, out = tmp_path / "disk.raw", tmp_path / "disk.qcow2"
    with open(raw, "wb") as fh:
        fh.write(os.urandom(4 * M))
        fh.truncate(64 * M)
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out)], check=True)
    raw.unlink()
    return out


def _dir_pool(libvirt_conn, path: Path):
    """A dir pool of this test's own at `path`; everything in it is deleted with it."""
    import libvirt

    name = f"ft-images-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    xml = f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    p = libvirt_conn.storagePoolCreateXML(xml, 0)
    yield p
    for vol in p.listAllVolumes(0):
        with contextlib.suppress(libvirt.libvirtError):
            vol.delete(0)
    p.destroy()


@pytest.fixture
def pool(libvirt_conn, tmp_path):
    yield from _dir_pool(libvirt_conn, tmp_path / "pool")


@pytest.fixture
def reachable_pool(libvirt_conn):
    """A pool QEMU can open files in (under libvirt's own image directory: a test's tmp_path is root's alone)."""
    path = Path("/var/lib/libvirt/images") / f"ft-images-{uuid.uuid4().hex[:8]}"
    try:
        yield from _dir_pool(libvirt_conn, path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def provider(libvirt_uri):
    from vmhost.providers.libvirt import LibvirtProvider

    made: list = []

    def new(server: str) -> LibvirtProvider:
        made.append(LibvirtProvider(uri=libvirt_uri, image_server=server))
        return made[-1]

    yield new
    for p in made:
        p.close()


def _alloc(name: str, pool, root: int = 128 * M) -> Allocation:
    return Allocation(name=name, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", root, pool.name()),))


def _volumes(pool) -> set[str]:
    pool.refresh(0)
    return {v.name() for v in pool.listAllVolumes(0)}


def _domains(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains(0)}


def test_first_compose_downloads_a_verified_base_and_later_ones_only_overlay_it(
    provider, pool, libvirt_conn, vm_names, qcow2, tmp_path
):
    noble = Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2}, aliases=("24.04", "noble", "lts"))
    with ImageIndex(tmp_path / "index", [noble]) as index:
        p = provider(index.url)
        first, second = vm_names("img"), vm_names("img")
        t0 = time.monotonic()
        p.compose(ComposePlan(_alloc(first, pool), boot="image", image="ubuntu:noble"))
        t1 = time.monotonic()
        p.compose(ComposePlan(_alloc(second, pool), boot="image", image="ubuntu:24.04"))
        t2 = time.monotonic()
        print(f"\ncompose from a new image: {t1 - t0:.2f} s; from the same image again: {t2 - t1:.2f} s")
        assert index.downloads("disk1.img") == 1  # the second compose downloaded nothing

        sha = sha256_of(qcow2)
        base = pool.storageVolLookupByName(BASE_PREFIX + sha[:32])
        assert sha256_of(Path(base.path())) == sha  # the bytes the stream named
        for vm in (first, second):
            overlay = pool.storageVolLookupByName(volume_name(vm, "root"))
            xml = ET.fromstring(overlay.XMLDesc(0))
            assert xml.findtext("backingStore/path") == base.path()
            assert xml.find("target/format").get("type") == "qcow2"
            info = json.loads(
                subprocess.run(
                    ["qemu-img", "info", "--output=json", overlay.path()], capture_output=True, text=True, check=True
                ).stdout
            )
            assert (info["virtual-size"], info["backing-filename"]) == (128 * M, base.path())
            assert info["actual-size"] < 4 * M  # an overlay, not a copy of the 4 MiB of data
        # The base is provably ours: the record in the pool names it, ready, with the stream's sha256.
        [listed] = [b for b in p.images() if b["pool"] == pool.name()]
        assert (listed["volume"], listed["sha256"], listed["state"], listed["image"]) == (
            base.name(),
            sha,
            "ready",
            "ubuntu:noble",
        )
        assert listed["used_by"] == sorted(f"{pool.name()}/{volume_name(vm, 'root')}" for vm in (first, second))

        # Kept while any VM uses it; gc never removes it; prune removes it once nothing does.
        assert p.prune_images() == []
        p.decompose(first)
        assert p.prune_images() == [] and base.name() in _volumes(pool)
        p.decompose(second)
        p.gc()
        assert base.name() in _volumes(pool)
        assert p.prune_images(dry_run=True) == [f"{pool.name()}/{base.name()}"]
        assert base.name() in _volumes(pool)
        assert p.prune_images() == [f"{pool.name()}/{base.name()}"]
        assert _volumes(pool) == set()  # base and record gone
        # After a prune, the next compose downloads again.
        third = vm_names("img")
        p.compose(ComposePlan(_alloc(third, pool), boot="image", image="ubuntu:lts"))
        assert index.downloads("disk1.img") == 2
        p.decompose(third)


def test_checksum_mismatch_is_refused_and_leaves_nothing(provider, pool, libvirt_conn, vm_names, qcow2, tmp_path):
    bad = Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2}, sha256={"disk1.img": "0" * 64})
    with ImageIndex(tmp_path / "index", [bad]) as index:
        p = provider(index.url)
        name = vm_names("img")
        before = _domains(libvirt_conn)
        with pytest.raises(ProviderError, match="does not match its stream's sha256"):
            p.compose(ComposePlan(_alloc(name, pool), boot="image", image="ubuntu:noble"))
        assert index.downloads("disk1.img") == 1
    assert _volumes(pool) == set()  # no partial base, no record, no overlay
    assert _domains(libvirt_conn) == before


def test_dead_server_unknown_name_and_small_root_are_refused_and_leave_nothing(
    provider, pool, libvirt_conn, vm_names, qcow2, tmp_path
):
    noble = Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2})
    before = _domains(libvirt_conn)
    name = vm_names("img")
    with pytest.raises(ProviderError, match=r"image server http://127\.0\.0\.1:9 is unreachable"):
        provider("http://127.0.0.1:9").compose(ComposePlan(_alloc(name, pool), boot="image", image="ubuntu:noble"))
    with ImageIndex(tmp_path / "index", [noble]) as index:
        p = provider(index.url)
        with pytest.raises(ProviderError, match="has no disk image named 'ubuntu:jammy' for amd64"):
            p.compose(ComposePlan(_alloc(name, pool), boot="image", image="ubuntu:jammy"))
        with pytest.raises(
            ProviderError, match=r"disk root is 16M but image ubuntu:noble needs 64M; give root:64M or more"
        ):
            p.compose(ComposePlan(_alloc(name, pool, root=16 * M), boot="image", image="ubuntu:noble"))
        assert index.downloads("disk1.img") == 1  # stopped at the header: nothing written
    assert _volumes(pool) == set()
    assert _domains(libvirt_conn) == before


def test_a_volume_named_like_a_base_that_no_record_names_is_neither_used_nor_removed(
    provider, pool, libvirt_conn, vm_names, qcow2, tmp_path
):
    noble = Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2})
    foreign = BASE_PREFIX + sha256_of(qcow2)[:32]
    pool.createXML(f"<volume><name>{foreign}</name><capacity>1048576</capacity></volume>", 0)
    with ImageIndex(tmp_path / "index", [noble]) as index:
        p = provider(index.url)
        with pytest.raises(ProviderError, match="record of base images does not name it"):
            p.compose(ComposePlan(_alloc(vm_names("img"), pool), boot="image", image="ubuntu:noble"))
        assert p.prune_images() == []
    assert _volumes(pool) == {foreign}
    assert REGISTRY not in _volumes(pool)


def test_a_download_a_crash_cut_short_is_replaced_by_the_next_compose(
    provider, pool, libvirt_conn, vm_names, qcow2, tmp_path
):
    from vmhost.providers.libvirt_images import BaseRecord

    noble = Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2})
    sha = sha256_of(qcow2)
    name = BASE_PREFIX + sha[:32]
    with ImageIndex(tmp_path / "index", [noble]) as index:
        p = provider(index.url)
        # As a kill -9 mid-download leaves it: the record says downloading, the volume holds a part.
        p.bases._write(p._pool(pool.name()), [BaseRecord(name, sha, "ubuntu:noble", index.url, "20250101")])
        pool.createXML(f"<volume><name>{name}</name><capacity>1048576</capacity></volume>", 0)
        vm = vm_names("img")
        p.compose(ComposePlan(_alloc(vm, pool), boot="image", image="ubuntu:noble"))
        assert index.downloads("disk1.img") == 1
        assert sha256_of(Path(pool.storageVolLookupByName(name).path())) == sha
        assert [b["state"] for b in p.images() if b["pool"] == pool.name()] == ["ready"]
        p.decompose(vm)
        assert p.prune_images() == [f"{pool.name()}/{name}"]


@pytest.mark.parametrize("points_at", ["backing file", "external data file"])
def test_a_base_whose_qcow2_header_points_at_another_file_is_refused_and_leaves_nothing(
    provider, pool, libvirt_conn, vm_names, tmp_path, points_at
):
    """The server's qcow2 must hold all of the VM's bytes: a backing or data file named in its header would
    make every overlay on it read that host file (another VM's disk, a key) into the guest."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host secret\n".ljust(64 * M, b"\0"))
    hostile = tmp_path / "hostile.qcow2"
    if points_at == "backing file":
        args = ["-b", str(secret), "-F", "raw", str(hostile)]
    else:
        args = ["-o", f"data_file={secret},data_file_raw=on", str(hostile), str(64 * M)]
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args], check=True)
    product = Product("ubuntu", "noble", "24.04", {"disk1.img": hostile})
    before = _domains(libvirt_conn)
    with ImageIndex(tmp_path / "index", [product]) as index:
        p = provider(index.url)
        with pytest.raises(
            ProviderError, match=f"image ubuntu:noble on {index.url} names a {points_at} in its qcow2 header"
        ):
            p.compose(ComposePlan(_alloc(vm_names("img"), pool), boot="image", image="ubuntu:noble"))
    assert _volumes(pool) == set()
    assert _domains(libvirt_conn) == before


def _unused_base(provider, pool, vm_names, qcow2):
    """The base volume a compose from ubuntu:noble downloaded, its VM gone again (so nothing of ours uses it)."""
    vm = vm_names("img")
    provider.compose(ComposePlan(_alloc(vm, pool), boot="image", image="ubuntu:noble"))
    provider.decompose(vm)
    return pool.storageVolLookupByName(BASE_PREFIX + sha256_of(qcow2)[:32])


def _overlay(base, path: Path) -> None:
    """A qcow2 overlay on `base` at `path`, made as an operator would, outside vm-host."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base.path(), "-F", "qcow2", str(path)], check=True)


def test_prune_keeps_a_base_a_running_vm_uses_through_an_overlay_outside_any_pool(
    provider, reachable_pool, libvirt_conn, vm_names, qcow2, tmp_path
):
    """Its inactive definition names only the overlay; the live one names the base as the overlay's backing
    store: prune reads both, and deletes nothing under a running VM."""
    noble = Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2})
    with ImageIndex(tmp_path / "index", [noble]) as index:
        p = provider(index.url)
        base = _unused_base(p, reachable_pool, vm_names, qcow2)
        # Someone else's overlay on the base, a file in a directory no pool covers.
        outside = Path(base.path()).parent / "theirs" / "disk.qcow2"
        outside.parent.mkdir()
        _overlay(base, outside)
        theirs = vm_names("fx")
        kind = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"
        dom = libvirt_conn.defineXML(
            f"<domain type='{kind}'><name>{theirs}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os><devices><memballoon model='none'/>"
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{outside}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
        dom.create()
        try:
            assert p.prune_images() == []
            assert base.name() in _volumes(reachable_pool)
            [listed] = [b for b in p.images() if b["pool"] == reachable_pool.name()]
            assert listed["used_by"] == [f"domain {theirs}"]
        finally:
            dom.destroy()
        outside.unlink()
        assert p.prune_images() == [f"{reachable_pool.name()}/{base.name()}"]


def test_prune_keeps_a_base_under_an_overlay_put_into_a_pool_by_hand(
    provider, pool, libvirt_conn, vm_names, qcow2, tmp_path
):
    """A file copied or made in a pool's directory is a volume of it once the pool is refreshed: prune
    refreshes before it looks, so the overlay's backing store counts though libvirt had not listed it."""
    noble = Product("ubuntu", "noble", "24.04", {"disk1.img": qcow2})
    with ImageIndex(tmp_path / "index", [noble]) as index:
        p = provider(index.url)
        base = _unused_base(p, pool, vm_names, qcow2)
        by_hand = Path(base.path()).parent / "their-disk.qcow2"
        _overlay(base, by_hand)
        assert p.prune_images() == []
        assert base.name() in _volumes(pool)
        by_hand.unlink()
        assert p.prune_images() == [f"{pool.name()}/{base.name()}"]


def test_a_first_record_write_that_fails_leaves_no_record_volume(provider, pool, qcow2, tmp_path, monkeypatch):
    """The record volume is made, then filled: a fill that fails must not leave a volume of zeros that every
    later compose from an image in that pool refuses as a damaged record."""
    from vmhost.providers.base import ProviderError as Refused
    from vmhost.providers.libvirt_images import BaseRecord

    p = provider("http://127.0.0.1:9")

    def failing_upload(vol, path):
        raise Refused("copying image to libvirt took more than 1 s")

    monkeypatch.setattr(p, "_upload", failing_upload)
    record = BaseRecord(BASE_PREFIX + "a" * 32, "a" * 64, "ubuntu:noble", p.image_server.url, "1")
    with pytest.raises(Refused, match="took more than"):
        p.bases._write(p._pool(pool.name()), [record])
    assert REGISTRY not in _volumes(pool)
    assert [b for b in p.images() if b["pool"] == pool.name()] == []
