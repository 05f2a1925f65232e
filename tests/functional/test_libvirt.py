"""The libvirt provider against the real libvirtd + QEMU/KVM: what it composes really runs as allocated.

Allocations are built by hand: placement, collisions and the host lock are tested through the service
layer (test_service_libvirt.py); here the provider must make exactly what it is told, and undo it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmhost.model import Allocation, Cell, CloudInit, ComposePlan, DiskAllocation, HugepageAllocation, NicAllocation
from vmhost.parse import parse_cpuset
from vmhost.providers.base import (
    NAME_PREFIX,
    STATE_COMPOSING,
    STATE_DECOMPOSING,
    ComposeError,
    NotFound,
    ProviderError,
    volume_name,
)
from vmhost.providers.libvirt_xml import METADATA_NS, domain_xml

pytestmark = pytest.mark.libvirt

M = 1024**2
TEST_BRIDGE = "vmhostbr0"


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _affinity(name: str) -> dict[int, tuple[int, ...]]:
    """vCPU -> host CPUs it may run on, as `virsh vcpuinfo` reports it."""
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "vcpuinfo", name], capture_output=True, text=True, check=True
    )
    vcpus = [int(v) for v in re.findall(r"^VCPU:\s+(\d+)", out.stdout, re.M)]
    masks = re.findall(r"^CPU Affinity:\s+(\S+)", out.stdout, re.M)
    return {v: tuple(i for i, c in enumerate(mask) if c == "y") for v, mask in zip(vcpus, masks, strict=True)}


def _our_volumes(conn, vm: str) -> list[str]:
    out = []
    for pool in conn.listAllStoragePools(0):
        if pool.isActive():
            pool.refresh(0)
            out += [v.name() for v in pool.listAllVolumes(0) if v.name().startswith(volume_name(vm, ""))]
    return out


def _domains(conn) -> set[str]:
    return {d.name() for d in conn.listAllDomains(0)}


def _free_thread(provider) -> int:
    """The highest thread no other VM pins (thread 1 on this 2-CPU host; 0 stays for the host)."""
    pinned = {t for v in provider.list_vms() for t in (v.allocation.pinned or ())}
    free = [t for t in provider.discover().threads if t not in pinned]
    if not free:
        pytest.fail(f"every host thread is pinned by another VM: {sorted(pinned)}")
    return free[-1]


def _pinned_hugepage_alloc(name: str, thread: int, node: int, **extra) -> Allocation:
    return Allocation(
        name=name,
        vcpus=1,
        memory=128 * M,
        pinned=(thread,),
        numa_nodes=(node,),
        hugepages=HugepageAllocation("2M", {node: 64}),
        cells=(Cell(node, (0,), 128 * M),),
        disks=(DiskAllocation("root", 16 * M, "default"),),
        **extra,
    )


def test_pinned_hugepage_vm_runs_as_allocated_and_decompose_gives_everything_back(
    libvirt_provider, libvirt_conn, vm_names
):
    p = libvirt_provider
    topo = p.discover()
    thread = _free_thread(p)
    node = topo.thread_node[thread]
    name = vm_names()
    alloc = _pinned_hugepage_alloc(name, thread, node, nics=(NicAllocation("eth0", "bridge", TEST_BRIDGE),))
    free_before = _meminfo("HugePages_Free")
    if free_before < 64:
        pytest.fail(f"needs 64 free 2M hugepages, host has {free_before}; run scripts/host-setup.sh")

    vm = p.compose(ComposePlan(alloc, start=True, boot="network"))

    assert vm.state == "running" and vm.managed
    assert _affinity(name) == {0: (thread,)}
    assert _meminfo("HugePages_Free") == free_before - 64
    listed = {v.name: v for v in p.list_vms()}[name]
    assert listed.managed and listed.state == "running"
    # Read back from libvirt's metadata: the allocation as given, plus the MAC the provider chose.
    assert len(listed.macs) == 1 and listed.allocation.nics[0].mac == listed.macs[0]
    assert listed.allocation == alloc.__class__.from_dict(
        {**alloc.to_dict(), "nics": [{**alloc.nics[0].to_dict(), "mac": listed.macs[0]}]}
    )
    assert _our_volumes(libvirt_conn, name) == [volume_name(name, "root")]

    p.decompose(name)

    assert name not in _domains(libvirt_conn)
    assert _our_volumes(libvirt_conn, name) == []
    assert _meminfo("HugePages_Free") == free_before
    with pytest.raises(NotFound, match=name):
        p.decompose(name)


def test_compose_failing_after_its_first_step_leaves_nothing(libvirt_provider, libvirt_conn, vm_names):
    p = libvirt_provider
    name = vm_names()
    missing_bridge = f"nobr{name[-6:]}"
    alloc = Allocation(
        name=name,
        vcpus=1,
        memory=64 * M,
        disks=(DiskAllocation("root", 8 * M, "default"),),
        nics=(NicAllocation("eth0", "bridge", missing_bridge),),
    )
    before = _domains(libvirt_conn)
    with pytest.raises(ComposeError) as err:
        p.compose(ComposePlan(alloc, start=True))
    assert err.value.step == "start domain"
    assert missing_bridge in str(err.value)
    assert _domains(libvirt_conn) == before
    assert _our_volumes(libvirt_conn, name) == []


def test_compose_with_a_missing_pool_for_a_later_volume_is_refused_before_anything_is_made(
    libvirt_provider, libvirt_conn, vm_names
):
    name = vm_names()
    alloc = Allocation(
        name=name,
        vcpus=1,
        memory=64 * M,
        disks=(DiskAllocation("root", 8 * M, "default"), DiskAllocation("data", 8 * M, f"nopool-{name}")),
    )
    with pytest.raises(ProviderError, match=f"storage pool 'nopool-{name}' does not exist"):
        libvirt_provider.compose(ComposePlan(alloc))
    assert name not in _domains(libvirt_conn)
    assert _our_volumes(libvirt_conn, name) == []


def test_compose_refuses_to_take_over_an_existing_volume_of_its_name(libvirt_provider, libvirt_conn, vm_names):
    """A volume already carrying the name vm-host would give is not ours: compose refuses, and it survives."""
    name = vm_names()
    taken = volume_name(name, "data")
    _virsh_volume(taken)
    alloc = Allocation(
        name=name,
        vcpus=1,
        memory=64 * M,
        disks=(DiskAllocation("root", 8 * M, "default"), DiskAllocation("data", 8 * M, "default")),
    )
    with pytest.raises(ProviderError, match=f"a volume named '{taken}' already exists in pool 'default'"):
        libvirt_provider.compose(ComposePlan(alloc))
    assert name not in _domains(libvirt_conn)
    assert _our_volumes(libvirt_conn, name) == [taken]


def test_discover_reports_this_hosts_cpus_memory_hugepages_pools_and_bridge(libvirt_provider):
    topo = libvirt_provider.discover()
    online = parse_cpuset(Path("/sys/devices/system/cpu/online").read_text().strip())
    assert topo.threads == online
    nodes = sorted(int(p.name[4:]) for p in Path("/sys/devices/system/node").glob("node[0-9]*"))
    assert [n.id for n in topo.nodes] == nodes
    for n in topo.nodes:
        sysnode = Path(f"/sys/devices/system/node/node{n.id}")
        assert n.threads == tuple(sorted(parse_cpuset((sysnode / "cpulist").read_text().strip())))
        memtotal_kib = int(re.search(r"MemTotal:\s+(\d+)", (sysnode / "meminfo").read_text()).group(1))
        assert n.memory == memtotal_kib * 1024
        pages = int((sysnode / "hugepages/hugepages-2048kB/nr_hugepages").read_text())
        assert n.hugepages["2M"] == pages
    for core in (c for n in topo.nodes for c in n.cores):
        siblings = Path(f"/sys/devices/system/cpu/cpu{core.threads[0]}/topology/thread_siblings_list").read_text()
        assert core.threads == parse_cpuset(siblings.strip())
    pools = {sp.name: sp for sp in topo.storage_pools}
    assert "default" in pools and pools["default"].driver == "dir"
    assert pools["default"].total > 0 and 0 <= pools["default"].used <= pools["default"].total
    nics = {n.name: n for n in topo.nics}
    assert nics[TEST_BRIDGE].kind == "bridge"


def test_stop_and_start(libvirt_provider, vm_names):
    p = libvirt_provider
    name = vm_names()
    p.compose(ComposePlan(Allocation(name=name, vcpus=1, memory=64 * M)))
    assert {v.name: v.state for v in p.list_vms()}[name] == "stopped"
    p.start(name)
    assert {v.name: v.state for v in p.list_vms()}[name] == "running"
    p.stop(name, force=True)
    assert {v.name: v.state for v in p.list_vms()}[name] == "stopped"
    p.decompose(name)
    with pytest.raises(NotFound):
        p.start(name)


def test_domain_defined_outside_vmhost_is_listed_as_other_and_not_decomposed(libvirt_provider, libvirt_conn, vm_names):
    name = vm_names("other")
    libvirt_conn.defineXML(
        f"""<domain type='kvm'><name>{name}</name><memory unit='MiB'>96</memory><vcpu>2</vcpu>
        <cputune><vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='1' cpuset='1'/></cputune>
        <os><type arch='x86_64'>hvm</type></os></domain>"""
    )
    vm = {v.name: v for v in libvirt_provider.list_vms()}[name]
    assert not vm.managed and vm.allocation.other
    assert vm.allocation.vcpus == 2 and vm.allocation.memory == 96 * M and vm.allocation.pinned == (0, 1)
    with pytest.raises(ProviderError, match="not made by vm-host"):
        libvirt_provider.decompose(name)
    assert name in _domains(libvirt_conn)


def _virsh_volume(vol: str, pool: str = "default") -> None:
    """A volume made the way an operator would, with plain virsh."""
    subprocess.run(
        ["virsh", "-c", "qemu:///system", "vol-create-as", pool, vol, "1M", "--format", "raw"],
        capture_output=True,
        text=True,
        check=True,
    )


def _crashed_compose(libvirt_conn, name: str, state: str = STATE_COMPOSING) -> None:
    """What a compose killed after its volume leaves: our record (bound to its uuid, naming the volume), the volume."""
    alloc = Allocation(name=name, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", M, "default"),))
    vol = volume_name(name, "root")
    libvirt_conn.defineXML(
        domain_xml(ComposePlan(alloc), state=state, uuid=str(uuid.uuid4()), owned_volumes=[("default", vol)])
    )
    _virsh_volume(vol)


def test_gc_removes_unfinished_vms_and_their_recorded_volumes_only(libvirt_provider, libvirt_conn, vm_names):
    """gc proves ownership: a volume named like ours that no record names survives, whatever its name."""
    import libvirt

    orphan_vm, crashed, undone, kept = vm_names(), vm_names(), vm_names(), vm_names()
    lookalike = volume_name(orphan_vm, "root")
    _virsh_volume(lookalike)  # plain virsh, named exactly as vm-host would name it
    anything = f"{NAME_PREFIX}anything-{orphan_vm}"
    _virsh_volume(anything)
    _crashed_compose(libvirt_conn, crashed)
    _crashed_compose(libvirt_conn, undone, state=STATE_DECOMPOSING)
    libvirt_provider.compose(
        ComposePlan(Allocation(name=kept, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", M, "default"),)))
    )
    pool = libvirt_conn.storagePoolLookupByName("default")
    try:
        removed = libvirt_provider.gc()
        assert sorted(removed) == sorted(
            [crashed, f"default/{volume_name(crashed, 'root')}", undone, f"default/{volume_name(undone, 'root')}"]
        )
        assert crashed not in _domains(libvirt_conn) and undone not in _domains(libvirt_conn)
        assert _our_volumes(libvirt_conn, orphan_vm) == [lookalike]  # not provably ours: kept
        pool.storageVolLookupByName(anything)
        assert kept in _domains(libvirt_conn) and _our_volumes(libvirt_conn, kept) == [volume_name(kept, "root")]
        assert libvirt_provider.gc() == []
    finally:
        for vol in (anything,):
            with contextlib.suppress(libvirt.libvirtError):
                pool.storageVolLookupByName(vol).delete(0)


def test_a_clone_carrying_our_metadata_is_foreign_and_never_touches_the_original(
    libvirt_provider, libvirt_conn, vm_names
):
    """Defect 8 on libvirt: a domain defined from a dump of ours (new name, new uuid) keeps our metadata,
    but the record names the original's uuid, so the clone is listed as not ours and gc and decompose of it
    never remove the original's volumes."""
    orig, clone = vm_names(), vm_names()
    owner = "model-uuid/app/req-1"
    alloc = Allocation(name=orig, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", M, "default"),), owner=owner)
    libvirt_provider.compose(ComposePlan(alloc))
    xml = ET.fromstring(libvirt_conn.lookupByName(orig).XMLDesc(0))
    xml.find("name").text = clone
    xml.remove(xml.find("uuid"))
    # The clone is even marked unfinished, as a copy taken mid-compose would be.
    xml.find(f"metadata/{{{METADATA_NS}}}allocation").set("state", STATE_COMPOSING)
    libvirt_conn.defineXML(ET.tostring(xml, encoding="unicode"))
    vms = {v.name: v for v in libvirt_provider.list_vms()}
    assert vms[orig].managed and vms[orig].allocation.owner == owner
    assert not vms[clone].managed and vms[clone].allocation.owner is None
    assert libvirt_provider.gc() == []
    with pytest.raises(ProviderError, match="not made by vm-host"):
        libvirt_provider.decompose(clone)
    assert {orig, clone} <= _domains(libvirt_conn)
    assert _our_volumes(libvirt_conn, orig) == [volume_name(orig, "root")]


@pytest.mark.skipif(not shutil.which("isoinfo"), reason="isoinfo (genisoimage package) is not installed")
def test_cloud_init_seed_is_attached_with_the_static_address_and_removed_on_decompose(
    libvirt_provider, libvirt_conn, vm_names
):
    import xml.etree.ElementTree as ET

    name = vm_names()
    nic = NicAllocation("eth0", "bridge", TEST_BRIDGE, ip="10.99.0.7")
    alloc = Allocation(
        name=name, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", 8 * M, "default"),), nics=(nic,)
    )
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGXuzinACkSeBrlWwMqzXdLesbcyptFCAOXux58IMPQz test"
    vm = libvirt_provider.compose(ComposePlan(alloc, cloud_init=CloudInit(name, (key,))))
    seed = volume_name(name, "cidata")
    assert sorted(_our_volumes(libvirt_conn, name)) == sorted([seed, volume_name(name, "root")])
    text = libvirt_conn.lookupByName(name).XMLDesc(0)
    dom = ET.fromstring(text)
    cdrom = dom.find("devices/disk[serial='cidata']/source")  # the seed: a read-only virtio disk
    assert cdrom.get("volume") == seed
    path = libvirt_conn.storagePoolLookupByName("default").storageVolLookupByName(seed).path()
    assert os.stat(path).st_mode & 0o077 == 0  # it holds the VM's private host key: root (and QEMU) only
    net = subprocess.run(["isoinfo", "-J", "-i", path, "-x", "/network-config"], capture_output=True, text=True)
    meta = subprocess.run(["isoinfo", "-J", "-i", path, "-x", "/meta-data"], capture_output=True, text=True)
    user = subprocess.run(["isoinfo", "-J", "-i", path, "-x", "/user-data"], capture_output=True, text=True)
    assert "10.99.0.7/" in net.stdout and vm.macs[0] in net.stdout
    assert f"local-hostname: {name}" in meta.stdout
    assert key in user.stdout and "ed25519_private" in user.stdout and "name: ubuntu" in user.stdout
    # What vm-host reports: the static address at once, the login user, the public host key only.
    (listed,) = [v for v in libvirt_provider.list_vms() if v.name == name]
    assert vm.addresses == listed.addresses == ("10.99.0.7",)
    assert listed.login_user == "ubuntu" and listed.host_keys == vm.host_keys and len(vm.host_keys) == 1
    assert vm.host_keys[0].public_key in user.stdout
    assert "PRIVATE KEY" not in text and "PRIVATE KEY" not in json.dumps(listed.to_dict())
    libvirt_provider.decompose(name)
    assert _our_volumes(libvirt_conn, name) == []


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils package) is not installed")
def test_image_boot_uploads_the_named_image_from_the_image_dir_and_grows_it(
    libvirt_uri, libvirt_provider, libvirt_conn, vm_names, tmp_path
):
    import json
    import xml.etree.ElementTree as ET

    from vmhost.providers.libvirt import LibvirtProvider

    images = tmp_path / "images"
    images.mkdir()
    raw = images / "marker.raw"
    raw.write_bytes(b"VMHOST-IMAGE-MARKER" + b"\0" * (M - 19))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "tiny.qcow2"), "4M"], check=True)
    provider = LibvirtProvider(uri=libvirt_uri, image_dir=str(images))
    pool = libvirt_conn.storagePoolLookupByName("default")
    # By name (as the relation gives it), resolved in the image dir; and by absolute path (the operator).
    cases = ((provider, "marker", "raw"), (provider, "tiny", "qcow2"), (libvirt_provider, str(raw), "raw"))
    try:
        for p, image, fmt in cases:
            name = vm_names("img")
            alloc = Allocation(name=name, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", 16 * M, "default"),))
            p.compose(ComposePlan(alloc, boot="image", image=image))
            path = pool.storageVolLookupByName(volume_name(name, "root")).path()
            info = json.loads(
                subprocess.run(
                    ["qemu-img", "info", "--output=json", path], capture_output=True, text=True, check=True
                ).stdout
            )
            assert (info["format"], info["virtual-size"]) == (fmt, 16 * M)
            if fmt == "raw":
                assert Path(path).read_bytes()[:19] == b"VMHOST-IMAGE-MARKER"
            dom = ET.fromstring(libvirt_conn.lookupByName(name).XMLDesc(0))
            assert dom.find("devices/disk[@device='disk']/driver").get("type") == fmt
            assert [b.get("dev") for b in dom.findall("os/boot")] == ["hd", "network"]
            p.decompose(name)
            assert _our_volumes(libvirt_conn, name) == []
    finally:
        provider.close()


def test_image_name_outside_the_image_dir_is_refused_and_nothing_is_made(
    libvirt_uri, libvirt_conn, vm_names, tmp_path, monkeypatch
):
    from vmhost.providers.libvirt import LibvirtProvider

    images = tmp_path / "images"
    images.mkdir()
    monkeypatch.chdir(tmp_path)
    Path("metadata.yaml").write_text("name: vm-host\n")  # a file in the working directory, as in a hook
    provider = LibvirtProvider(uri=libvirt_uri, image_dir=str(images))
    name = vm_names("img")
    alloc = Allocation(name=name, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", 16 * M, "default"),))
    before = _domains(libvirt_conn)
    try:
        for image, why in (("metadata.yaml", "no image named"), ("./metadata.yaml", "neither an absolute path")):
            with pytest.raises(ProviderError, match=why):
                provider.compose(ComposePlan(alloc, boot="image", image=image))
    finally:
        provider.close()
    assert _domains(libvirt_conn) == before
    assert _our_volumes(libvirt_conn, name) == []
