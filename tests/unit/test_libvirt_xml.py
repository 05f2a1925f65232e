"""Golden domain XML for a synthetic 2-node host, plus checks that do not trust the goldens.

Regenerate the goldens after an intended change with `UPDATE_GOLDEN=1 pytest tests/unit/test_libvirt_xml.py`
and review the diff: the semantic tests below must still pass against the new XML.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from vmhost.model import Allocation, Cell, ComposePlan, DiskAllocation, HugepageAllocation, NicAllocation
from vmhost.parse import HUGEPAGE_SIZES, parse_cpuset
from vmhost.providers.base import STATE_COMPOSING, STATE_READY, volume_name
from vmhost.providers.libvirt_xml import (
    VolumeRef,
    allocation_from_foreign_xml,
    build_domain,
    domain_xml,
    metadata_element,
    read_metadata,
)

GOLDEN = Path(__file__).parent / "golden"
G = 1024**3

# Synthetic host: node 0 = cores {0,4},{1,5}; node 1 = cores {2,6},{3,7} (SMT siblings n and n+4).
ONE_NODE = Allocation(
    name="vm-one",
    vcpus=2,
    memory=1 * G,
    pinned=(2, 6),  # pinned_cores=auto took the whole core {2,6} on node 1
    numa_nodes=(1,),
    hugepages=HugepageAllocation("2M", {1: 512}),
    disks=(DiskAllocation("root", 20 * 10**9, "default"),),
    nics=(
        NicAllocation("eth0", "bridge", "br0", mac="52:54:00:00:00:01"),
        NicAllocation("eth1", "macvlan", "enp65s0f1", mac="52:54:00:00:00:02", numa_node=1),
    ),
    cells=(Cell(1, (0, 1), 1 * G),),
    threads_per_core=2,
)

TWO_NODES = Allocation(
    name="vm-two",
    vcpus=4,
    memory=4 * G,
    pinned=(0, 4, 2, 6),
    numa_nodes=(0, 1),
    hugepages=HugepageAllocation("1G", {0: 2, 1: 2}),
    disks=(DiskAllocation("root", 40 * 10**9, "ssd", ("ssd",)), DiskAllocation("data", 100 * 10**9, "default")),
    nics=(
        NicAllocation("eth0", "sriov", "enp65s0f0", vlan=120, mac="52:54:00:00:00:03", numa_node=0),
        NicAllocation("eth1", "network", "default", mac="52:54:00:00:00:04"),
        NicAllocation("eth2", "bridge", "br-ovs", vlan=30, ip="10.20.0.50", mac="52:54:00:00:00:05"),
    ),
    cells=(Cell(0, (0, 1), 2 * G), Cell(1, (2, 3), 2 * G)),
    threads_per_core=2,
    owner="model-uuid/app/req-1",
)

CASES = {
    "one_node_pinned_2m": (ComposePlan(ONE_NODE, start=True, boot="network"), {}),
    "two_nodes_cells_1g": (
        ComposePlan(TWO_NODES, boot="image", image="/srv/images/jammy.qcow2"),
        {
            "vf_addresses": {"eth0": "0000:41:02.3"},
            "seed": VolumeRef("default", volume_name("vm-two", "cidata"), "raw"),
            "volumes": {"data": VolumeRef("default", volume_name("vm-two", "data"), "raw")},
            "disabled_cpu_features": ("arch-capabilities",),
        },
    ),
}

# A floating VM on the same host while core {2,6} (node 1) and thread 4 are pinned by other VMs.
FLOATING = Allocation(
    name="vm-float",
    vcpus=2,
    memory=2 * G,
    disks=(DiskAllocation("root", 10 * 10**9, "default"),),
    nics=(NicAllocation("eth0", "bridge", "br0", mac="52:54:00:00:00:06"),),
)
FLOATING_CASES = {
    "floating_shared_cpuset": (ComposePlan(FLOATING, start=True, shared_threads=(0, 1, 3, 5, 7)), {}),
}
GOLDEN_CASES = {**CASES, **FLOATING_CASES}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_domain_xml_matches_golden(case):
    plan, kwargs = GOLDEN_CASES[case]
    got = domain_xml(plan, **kwargs)
    path = GOLDEN / f"{case}.xml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(got)
    assert path.exists(), f"no golden {path.name}; run with UPDATE_GOLDEN=1 and review it"
    assert got == path.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_domain_xml_expresses_the_allocation(case):
    """Independent of the goldens: pinning, NUMA, hugepages and topology all say what the Allocation says."""
    plan, kwargs = CASES[case]
    a = plan.allocation
    dom = ET.fromstring(domain_xml(plan, **kwargs))
    assert dom.findtext("name") == a.name
    assert int(dom.findtext("memory")) * 1024 == a.memory
    vcpu = dom.find("vcpu")
    assert int(vcpu.text) == a.vcpus and parse_cpuset(vcpu.get("cpuset")) == tuple(sorted(a.pinned))
    pins = {int(p.get("vcpu")): int(p.get("cpuset")) for p in dom.findall("cputune/vcpupin")}
    assert pins == dict(enumerate(a.pinned))
    assert parse_cpuset(dom.find("cputune/emulatorpin").get("cpuset")) == tuple(sorted(a.pinned))
    assert dom.find("numatune/memory").get("mode") == "strict"
    assert parse_cpuset(dom.find("numatune/memory").get("nodeset")) == a.numa_nodes
    memnodes = {int(m.get("cellid")): int(m.get("nodeset")) for m in dom.findall("numatune/memnode")}
    assert memnodes == {i: c.node for i, c in enumerate(a.cells)}
    cells = dom.findall("cpu/numa/cell")
    assert [parse_cpuset(c.get("cpus")) for c in cells] == [c.vcpus for c in a.cells]
    assert sum(int(c.get("memory")) * 1024 for c in cells) == a.memory
    topo = dom.find("cpu/topology")
    assert int(topo.get("sockets")) * int(topo.get("cores")) * int(topo.get("threads")) == a.vcpus
    assert int(topo.get("threads")) == a.threads_per_core
    page = dom.find("memoryBacking/hugepages/page")
    assert int(page.get("size")) * 1024 == HUGEPAGE_SIZES[a.hugepages.size]
    assert parse_cpuset(page.get("nodeset")) == tuple(range(len(a.cells)))
    disks = dom.findall("devices/disk[@device='disk']")
    seeds = [d for d in disks if d.findtext("serial") == "cidata"]
    assert [d.find("source").get("volume") for d in disks if d not in seeds] == [
        volume_name(a.name, d.label) for d in a.disks
    ]
    if kwargs.get("seed"):  # the seed: read-only, virtio (every cloud kernel has it; AHCI it may not), last
        (seed,) = seeds
        assert seed.find("readonly") is not None and seed.find("target").get("bus") == "virtio"
        assert disks[-1] is seed and disks[0].find("target").get("dev") == "vda"
    assert [i.find("mac").get("address") for i in dom.findall("devices/interface")] == [n.mac for n in a.nics]
    assert dom.find("devices/graphics") is None and dom.find("devices/console") is not None


def test_boot_order_follows_the_plan():
    net = ET.fromstring(domain_xml(ComposePlan(ONE_NODE, boot="network")))
    img = ET.fromstring(domain_xml(ComposePlan(ONE_NODE, boot="image", image="/x.qcow2")))
    assert [b.get("dev") for b in net.findall("os/boot")] == ["network", "hd"]
    assert [b.get("dev") for b in img.findall("os/boot")] == ["hd", "network"]


def test_nic_kinds_and_vlan_tags():
    plan, kwargs = CASES["two_nodes_cells_1g"]
    dom = ET.fromstring(domain_xml(plan, **kwargs))
    sriov, network, bridge = dom.findall("devices/interface")
    assert sriov.get("type") == "hostdev" and sriov.get("managed") == "yes"
    addr = sriov.find("source/address")
    assert (addr.get("bus"), addr.get("slot"), addr.get("function")) == ("0x41", "0x02", "0x3")
    assert sriov.find("vlan/tag").get("id") == "120"
    assert network.get("type") == "network" and network.find("source").get("network") == "default"
    assert bridge.find("source").get("bridge") == "br-ovs" and bridge.find("vlan/tag").get("id") == "30"
    untagged = ET.fromstring(domain_xml(plan, **kwargs, untagged={"eth2"}))
    assert untagged.findall("devices/interface")[2].find("vlan") is None
    macvlan = ET.fromstring(domain_xml(CASES["one_node_pinned_2m"][0])).findall("devices/interface")[1]
    assert macvlan.get("type") == "direct" and macvlan.find("source").attrib == {"dev": "enp65s0f1", "mode": "bridge"}


def test_no_nics_means_no_interfaces_and_floating_vm_has_no_pinning():
    a = Allocation(name="float", vcpus=3, memory=512 * 1024**2)
    dom = ET.fromstring(domain_xml(ComposePlan(a)))
    assert dom.findall("devices/interface") == []
    assert dom.find("cputune") is None and dom.find("numatune") is None and dom.find("memoryBacking") is None
    assert dom.find("vcpu").get("cpuset") is None and dom.findtext("vcpu") == "3"
    topo = dom.find("cpu/topology")
    assert (topo.get("sockets"), topo.get("cores"), topo.get("threads")) == ("1", "3", "1")


def test_sriov_without_a_vf_address_is_refused():
    with pytest.raises(ValueError, match="eth0"):
        build_domain(CASES["two_nodes_cells_1g"][0])


@pytest.mark.parametrize("alloc", [ONE_NODE, TWO_NODES], ids=["one", "two"])
def test_metadata_round_trips(alloc):
    xml = domain_xml(ComposePlan(alloc), vf_addresses={"eth0": "0000:41:02.3"})
    assert read_metadata(xml) == (alloc, STATE_COMPOSING)
    # As libvirt hands it back after setMetadata: our element re-serialised under the domain's <metadata>.
    dom = ET.fromstring(xml)
    meta = dom.find("metadata")
    meta.clear()
    meta.append(metadata_element(alloc, STATE_READY))
    assert read_metadata(ET.tostring(dom, encoding="unicode")) == (alloc, STATE_READY)


def test_foreign_domain_is_counted_from_its_own_config():
    xml = """<domain type='kvm'><name>theirs</name><memory unit='MiB'>2048</memory><vcpu>2</vcpu>
      <memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages></memoryBacking>
      <cputune><vcpupin vcpu='0' cpuset='3'/><vcpupin vcpu='1' cpuset='7'/></cputune>
      <numatune><memory mode='strict' nodeset='1'/></numatune></domain>"""
    assert read_metadata(xml) is None
    a = allocation_from_foreign_xml(xml, host_nodes=(0, 1))
    assert a.other and a.name == "theirs" and a.vcpus == 2 and a.memory == 2 * G
    assert a.pinned == (3, 7) and a.numa_nodes == (1,)
    assert a.hugepages == HugepageAllocation("2M", {1: 1024})


def test_foreign_unbound_hugepages_are_spread_over_host_nodes_and_ranges_are_not_pins():
    xml = """<domain><name>x</name><memory>1048576</memory><vcpu>2</vcpu>
      <memoryBacking><hugepages/></memoryBacking>
      <cputune><vcpupin vcpu='0' cpuset='0-3'/><vcpupin vcpu='1' cpuset='0-3'/></cputune></domain>"""
    a = allocation_from_foreign_xml(xml, host_nodes=(0, 1))
    assert a.pinned is None
    assert a.hugepages.per_node == {0: 256, 1: 256}


def test_foreign_unbound_hugepages_split_by_the_one_even_split_rule():
    # 11 pages (22 MiB of 2M pages) on 3 nodes: model.even_split's 4, 4, 3, as vm-host splits its own VMs.
    xml = """<domain><name>x</name><memory>22528</memory><vcpu>1</vcpu>
      <memoryBacking><hugepages/></memoryBacking></domain>"""
    a = allocation_from_foreign_xml(xml, host_nodes=(0, 1, 2))
    assert a.hugepages.per_node == {0: 4, 1: 4, 2: 3}


def test_foreign_guest_cells_without_numatune_spread_pages_over_host_nodes_not_node_0():
    """Guest NUMA cells tied to no host node say nothing about where the kernel took the pages."""
    xml = """<domain><name>cells</name><memory unit='GiB'>4</memory><vcpu>2</vcpu>
      <memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages></memoryBacking>
      <cpu><numa><cell id='0' cpus='0' memory='2' unit='GiB'/><cell id='1' cpus='1' memory='2' unit='GiB'/></numa></cpu>
      </domain>"""
    a = allocation_from_foreign_xml(xml, host_nodes=(0, 1))
    assert a.hugepages.per_node == {0: 1024, 1: 1024}


def test_floating_vm_is_confined_to_the_shared_threads():
    """vCPUs and emulator may run on the threads no VM pins, and nowhere else; nothing is pinned per vCPU."""
    plan, kwargs = FLOATING_CASES["floating_shared_cpuset"]
    dom = ET.fromstring(domain_xml(plan, **kwargs))
    vcpu = dom.find("vcpu")
    assert vcpu.text == "2" and vcpu.get("placement") == "static"
    assert parse_cpuset(vcpu.get("cpuset")) == plan.shared_threads
    assert parse_cpuset(dom.find("cputune/emulatorpin").get("cpuset")) == plan.shared_threads
    assert dom.findall("cputune/vcpupin") == []
    assert not {2, 4, 6} & set(parse_cpuset(vcpu.get("cpuset")))
    assert dom.find("numatune") is None and dom.find("cpu/numa") is None
    assert read_metadata(dom) == (FLOATING, STATE_COMPOSING)


def test_shared_threads_do_not_change_a_pinned_vm_and_empty_is_refused():
    pinned = ComposePlan(ONE_NODE, start=True, boot="network")
    assert domain_xml(replace(pinned, shared_threads=(0, 1, 3))) == domain_xml(pinned)
    with pytest.raises(ValueError, match="'vm-float' floats but shared_threads is empty"):
        build_domain(ComposePlan(FLOATING, shared_threads=()))


def test_record_is_bound_to_its_own_domain_uuid_and_names_its_volumes():
    """A clone that kept our metadata (other uuid) reads as foreign; so does a record without a uuid."""
    from vmhost.providers.libvirt_xml import METADATA_NS, read_record

    uid = "0b9d3d5e-2f5c-4b8e-9a55-6d1c1d2f0a11"
    owned = [("default", "vmhost-vm-one-root"), ("ssd", "vmhost-vm-one-cidata")]
    dom = ET.fromstring(domain_xml(ComposePlan(ONE_NODE), uuid=uid, owned_volumes=owned))
    assert dom.findtext("uuid") == uid
    rec = read_record(dom)
    assert (rec.allocation, rec.state, rec.uuid, rec.volumes) == (ONE_NODE, STATE_COMPOSING, uid, tuple(owned))
    dom.find("uuid").text = "5f0e7a43-0000-4000-8000-000000000001"  # the clone libvirt gave a new uuid
    assert read_record(dom) is None and read_metadata(dom) is None
    dom.find(f"metadata/{{{METADATA_NS}}}allocation").attrib.pop("uuid")
    assert read_record(dom) is None  # a defined domain always has a uuid; a record must name it


def test_a_record_that_does_not_decode_proves_nothing():
    from vmhost.providers.libvirt_xml import METADATA_NS, read_record

    dom = ET.fromstring(domain_xml(ComposePlan(ONE_NODE), uuid="u-1", owned_volumes=[("default", "v")]))
    el = dom.find(f"metadata/{{{METADATA_NS}}}allocation")
    el.set("volumes", "[[1]]")
    assert read_record(dom) is None
    el.set("volumes", "[]")
    el.text = "{not json"
    assert read_record(dom) is None


def test_qemu_domain_type_keeps_pinning_cells_and_hugepages():
    """TCG (type qemu) where KVM cannot boot the guest: the CPU model changes, the placement does not."""
    plan, kwargs = CASES["two_nodes_cells_1g"]
    kvm = ET.fromstring(domain_xml(plan, **kwargs))
    tcg = ET.fromstring(domain_xml(plan, **kwargs, domain_type="qemu"))
    assert (kvm.get("type"), tcg.get("type")) == ("kvm", "qemu")
    assert kvm.find("cpu").get("mode") == "host-passthrough"
    assert tcg.find("cpu").get("mode") == "maximum" and tcg.find("cpu/feature") is None
    for path in ("memoryBacking", "cputune", "numatune", "cpu/numa", "cpu/topology", "vcpu"):
        assert ET.tostring(tcg.find(path)) == ET.tostring(kvm.find(path)), path
    with pytest.raises(ValueError, match="not one of kvm, qemu"):
        domain_xml(plan, domain_type="xen")


def test_seeded_domain_records_login_user_and_public_host_keys_only():
    from vmhost.hostkeys import generate_host_keys
    from vmhost.model import DEFAULT_LOGIN_USER, CloudInit
    from vmhost.providers.libvirt_xml import read_record, record_element

    pairs = generate_host_keys()
    plan = ComposePlan(ONE_NODE, boot="image", image="/x.qcow2", cloud_init=CloudInit("vm-one"))
    seed = VolumeRef("default", volume_name("vm-one", "cidata"), "raw")
    text = domain_xml(plan, uuid="u-1", seed=seed, host_keys=[p.public for p in pairs])
    assert pairs[0].private.splitlines()[1] not in text and "PRIVATE" not in text
    rec = read_record(ET.fromstring(text))
    assert rec.login_user == DEFAULT_LOGIN_USER and rec.host_keys == (pairs[0].public,)
    again = ET.Element("domain")
    ET.SubElement(again, "uuid").text = "u-1"
    ET.SubElement(again, "metadata").append(record_element(replace(rec, state=STATE_READY)))
    assert read_record(again).host_keys == rec.host_keys  # a state change keeps them
    channel = ET.fromstring(text).find("devices/channel/target")
    assert channel.get("name") == "org.qemu.guest_agent.0"
    unseeded = read_record(ET.fromstring(domain_xml(ComposePlan(ONE_NODE), uuid="u-2")))
    assert (unseeded.login_user, unseeded.host_keys) == (None, ())
