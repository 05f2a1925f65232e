"""libvirt domain XML from a ComposePlan, and the allocation metadata read back from it.

Pure functions (no libvirt connection, no sysfs) so golden tests can pin the exact XML: whatever the
provider has to look up on the host (a free SR-IOV VF's PCI address, the seed ISO volume) is passed in.
The allocation rides in the domain's own `<metadata>` under our namespace (docs/design.md §3).

Over ~400 lines on purpose: one idea, the domain XML both ways (what vm-host writes, and what it reads
back from its own and from foreign domains); splitting writer from reader would split each element's
rule in two.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from vmhost.model import DEFAULT_LOGIN_USER, Allocation, Cell, ComposePlan, HostKey, HugepageAllocation, even_split
from vmhost.parse import HUGEPAGE_SIZES, format_cpuset, parse_cpuset
from vmhost.providers.base import STATE_COMPOSING, STATE_READY, volume_name

__all__ = [
    "DOMAIN_TYPES",
    "GUEST_AGENT_CHANNEL",
    "METADATA_NS",
    "METADATA_PREFIX",
    "Record",
    "VolumeRef",
    "allocation_from_foreign_xml",
    "build_domain",
    "domain_xml",
    "metadata_element",
    "read_metadata",
    "read_record",
]

METADATA_NS = "https://vm-host.dev/xmlns/libvirt/allocation/1"
METADATA_PREFIX = "vmhost"
SEED_LABEL = "cidata"
DOMAIN_TYPES = ("kvm", "qemu")  # qemu: TCG, QEMU's emulator, where KVM is absent or cannot boot the guest
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"

ET.register_namespace(METADATA_PREFIX, METADATA_NS)


@dataclass(frozen=True)
class VolumeRef:
    """A libvirt storage volume a disk is backed by."""

    pool: str
    volume: str
    format: str = "qcow2"


def _kib(n_bytes: int) -> str:
    return str(n_bytes // 1024)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        el.text = text
    return el


@dataclass(frozen=True)
class Record:
    """What our metadata proves: the allocation, how far compose got, the domain it was written for, and
    the volumes vm-host made (or was about to make) for it, recorded before any of them was created."""

    allocation: Allocation
    state: str
    uuid: str | None = None
    volumes: tuple[tuple[str, str], ...] = ()
    # How to reach the VM (seeded VMs only): the login user and the public halves of its SSH host keys.
    login_user: str | None = None
    host_keys: tuple[HostKey, ...] = ()


def metadata_element(
    allocation: Allocation,
    state: str,
    *,
    uuid: str | None = None,
    volumes: Collection[tuple[str, str]] = (),
    login_user: str | None = None,
    host_keys: Collection[HostKey] = (),
) -> ET.Element:
    """`<vmhost:allocation state=... uuid=... volumes=...>` holding the Allocation as JSON.

    uuid binds the record to its own domain (a copy of the domain gets another uuid, so reads as foreign);
    volumes are the (pool, volume) pairs this VM owns: decompose and gc delete these and nothing else.
    login_user and host_keys (public halves only) are what list reports for reaching the VM.
    """
    attrs = {"state": state}
    if uuid:
        attrs["uuid"] = uuid
    if volumes:
        attrs["volumes"] = json.dumps([list(v) for v in volumes], separators=(",", ":"))
    if login_user:
        attrs["login-user"] = login_user
    if host_keys:
        attrs["host-keys"] = json.dumps([k.to_dict() for k in host_keys], separators=(",", ":"))
    el = ET.Element(f"{{{METADATA_NS}}}allocation", attrs)
    el.text = json.dumps(allocation.to_dict(), sort_keys=True, separators=(",", ":"))
    return el


def record_element(record: Record) -> ET.Element:
    return metadata_element(
        record.allocation,
        record.state,
        uuid=record.uuid,
        volumes=record.volumes,
        login_user=record.login_user,
        host_keys=record.host_keys,
    )


def _topology(a: Allocation) -> tuple[int, int, int]:
    """(sockets, cores, threads): one socket per guest cell when the cells split evenly, SMT as allocated."""
    threads = a.threads_per_core if a.threads_per_core > 0 and a.vcpus % a.threads_per_core == 0 else 1
    sockets = len(a.cells) or 1
    if sockets > 1 and (
        len({len(c.vcpus) for c in a.cells}) != 1 or a.vcpus % (sockets * threads) or len(a.cells[0].vcpus) % threads
    ):
        sockets = 1
    return sockets, a.vcpus // (sockets * threads), threads


def _shared_threads(plan: ComposePlan) -> str | None:
    """The cpuset a floating VM is confined to, or None (pinned VMs, or no set given)."""
    if plan.allocation.pinned or plan.shared_threads is None:
        return None
    if not plan.shared_threads:
        raise ValueError(
            f"VM {plan.allocation.name!r} floats but shared_threads is empty; give at least one host thread, "
            "or None to leave it unconfined"
        )
    return format_cpuset(plan.shared_threads)


def _pci_address(parent: ET.Element, address: str) -> None:
    """`0000:41:00.2` -> <address type='pci' domain bus slot function>."""
    dom, bus, rest = address.split(":")
    slot, func = rest.split(".")
    _sub(
        parent,
        "address",
        type_="pci",
        domain=f"0x{int(dom, 16):04x}",
        bus=f"0x{int(bus, 16):02x}",
        slot=f"0x{int(slot, 16):02x}",
        function=f"0x{int(func, 16):x}",
    )


def build_domain(
    plan: ComposePlan,
    *,
    volumes: Mapping[str, VolumeRef] | None = None,
    seed: VolumeRef | None = None,
    vf_addresses: Mapping[str, str] | None = None,
    state: str = STATE_COMPOSING,
    uuid: str | None = None,
    owned_volumes: Collection[tuple[str, str]] = (),
    machine: str | None = "q35",
    untagged: Collection[str] = (),
    disabled_cpu_features: Collection[str] = (),
    domain_type: str = "kvm",
    host_keys: Collection[HostKey] = (),
) -> ET.Element:
    """The <domain> for `plan`.

    volumes: disk label -> volume (default: the pool the allocation names, volume_name(), qcow2).
    vf_addresses: NIC label -> PCI address of the SR-IOV VF it gets (required for sriov NICs).
    untagged: NIC labels whose VLAN the host already provides (a bridge on a VLAN interface), so the
    guest port must not tag it again.
    disabled_cpu_features: host-passthrough features to hide (ones KVM emulates but cannot set, see the provider).
    uuid, owned_volumes: the domain's identity and the volumes made for it, both recorded in our metadata.
    domain_type: kvm, or qemu (TCG): the CPU is then QEMU's `maximum` model, as host-passthrough needs KVM;
    pinning, NUMA cells and hugepages are the same either way.
    host_keys: the public SSH host keys of a seeded VM, recorded with its login user.
    """
    if domain_type not in DOMAIN_TYPES:
        raise ValueError(f"domain type {domain_type!r} is not one of {', '.join(DOMAIN_TYPES)}")
    a = plan.allocation
    volumes = volumes or {}
    vf_addresses = vf_addresses or {}
    dom = ET.Element("domain", type=domain_type)
    _sub(dom, "name", a.name)
    if uuid:
        _sub(dom, "uuid", uuid)
    meta = _sub(dom, "metadata")
    login_user = DEFAULT_LOGIN_USER if plan.cloud_init else None
    meta.append(
        metadata_element(a, state, uuid=uuid, volumes=owned_volumes, login_user=login_user, host_keys=host_keys)
    )
    _sub(dom, "memory", _kib(a.memory), unit="KiB")
    _sub(dom, "currentMemory", _kib(a.memory), unit="KiB")

    if a.hugepages:
        backing = _sub(dom, "memoryBacking")
        pages = _sub(backing, "hugepages")
        attrs = {"size": _kib(HUGEPAGE_SIZES[a.hugepages.size]), "unit": "KiB"}
        if a.cells:
            attrs["nodeset"] = format_cpuset(range(len(a.cells)))
        _sub(pages, "page", **attrs)

    vcpu_attrs = {"placement": "static"}
    shared = _shared_threads(plan)
    if a.pinned:
        vcpu_attrs["cpuset"] = format_cpuset(a.pinned)
    elif shared:
        vcpu_attrs["cpuset"] = shared  # floating: every vCPU may run on any thread no VM pins, and only there
    _sub(dom, "vcpu", str(a.vcpus), **vcpu_attrs)
    if a.pinned:
        tune = _sub(dom, "cputune")
        for vcpu, thread in enumerate(a.pinned):
            _sub(tune, "vcpupin", vcpu=str(vcpu), cpuset=str(thread))
        _sub(tune, "emulatorpin", cpuset=format_cpuset(a.pinned))
    elif shared:
        _sub(_sub(dom, "cputune"), "emulatorpin", cpuset=shared)
    if a.numa_nodes:
        numatune = _sub(dom, "numatune")
        _sub(numatune, "memory", mode="strict", nodeset=format_cpuset(a.numa_nodes))
        for i, cell in enumerate(a.cells):
            _sub(numatune, "memnode", cellid=str(i), mode="strict", nodeset=str(cell.node))

    os_el = _sub(dom, "os")
    type_attrs = {"arch": "x86_64"}
    if machine:
        type_attrs["machine"] = machine
    _sub(os_el, "type", "hvm", **type_attrs)
    for dev in ("network", "hd") if plan.boot == "network" else ("hd", "network"):
        _sub(os_el, "boot", dev=dev)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")

    if domain_type == "kvm":
        cpu = _sub(dom, "cpu", mode="host-passthrough", check="none", migratable="off")
    else:
        cpu = _sub(dom, "cpu", mode="maximum", check="none")
        disabled_cpu_features = ()  # KVM's MSR quirks; TCG emulates its own model
    sockets, cores, threads = _topology(a)
    _sub(cpu, "topology", sockets=str(sockets), dies="1", cores=str(cores), threads=str(threads))
    for feature in sorted(disabled_cpu_features):
        _sub(cpu, "feature", policy="disable", name=feature)
    if a.cells:
        numa = _sub(cpu, "numa")
        for i, cell in enumerate(a.cells):
            _sub(numa, "cell", id=str(i), cpus=format_cpuset(cell.vcpus), memory=_kib(cell.memory), unit="KiB")

    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    for i, disk in enumerate(a.disks):
        ref = volumes.get(disk.label) or VolumeRef(disk.pool, volume_name(a.name, disk.label))
        d = _sub(devices, "disk", type_="volume", device="disk")
        _sub(d, "driver", name="qemu", type_=ref.format, cache="none", discard="unmap")
        _sub(d, "source", pool=ref.pool, volume=ref.volume)
        _sub(d, "target", dev=f"vd{chr(ord('a') + i)}", bus="virtio")
        _sub(d, "serial", disk.label)
    if seed:
        # A read-only virtio disk, not a SATA CD-ROM: minimal cloud kernels (Debian's linux-image-cloud) have no
        # AHCI driver, and cloud-init finds the seed by its `cidata` label on any block device. After the VM's
        # own disks, so the root disk stays the first (vda).
        d = _sub(devices, "disk", type_="volume", device="disk")
        _sub(d, "driver", name="qemu", type_="raw")
        _sub(d, "source", pool=seed.pool, volume=seed.volume)
        _sub(d, "target", dev="vdzz", bus="virtio")
        _sub(d, "readonly")
        _sub(d, "serial", SEED_LABEL)
    for nic in a.nics:
        _interface(devices, nic, vf_addresses, tag=nic.label not in untagged)
    serial = _sub(devices, "serial", type_="pty")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type_="pty")
    _sub(console, "target", type_="serial", port="0")
    if seed:  # a seeded guest may run qemu-guest-agent: vm-host then also asks it for the guest's addresses
        channel = _sub(devices, "channel", type_="unix")
        _sub(channel, "target", type_="virtio", name=GUEST_AGENT_CHANNEL)
    _sub(devices, "memballoon", model="none" if a.hugepages or a.pinned else "virtio")
    return dom


def _interface(devices: ET.Element, nic, vf_addresses: Mapping[str, str], tag: bool) -> None:
    if nic.type == "bridge":
        iface = _sub(devices, "interface", type_="bridge")
        _mac(iface, nic.mac)
        _sub(iface, "source", bridge=nic.parent)
    elif nic.type == "macvlan":
        iface = _sub(devices, "interface", type_="direct")
        _mac(iface, nic.mac)
        _sub(iface, "source", dev=nic.parent, mode="bridge")
    elif nic.type == "sriov":
        if nic.label not in vf_addresses:
            raise ValueError(f"NIC {nic.label!r} is SR-IOV on {nic.parent!r} but no free VF address was given")
        iface = _sub(devices, "interface", type_="hostdev", managed="yes")
        _mac(iface, nic.mac)
        _pci_address(_sub(iface, "source"), vf_addresses[nic.label])
    elif nic.type == "network":
        iface = _sub(devices, "interface", type_="network")
        _mac(iface, nic.mac)
        _sub(iface, "source", network=nic.parent)
    else:
        raise ValueError(f"NIC {nic.label!r} has type {nic.type!r}; allowed: bridge, macvlan, sriov, network")
    if nic.vlan is not None and tag:
        _sub(_sub(iface, "vlan"), "tag", id=str(nic.vlan))
    if nic.type != "sriov":
        _sub(iface, "model", type_="virtio")
    _sub(iface, "alias", name=f"ua-{nic.label}")


def _mac(iface: ET.Element, mac: str | None) -> None:
    if mac:
        _sub(iface, "mac", address=mac)


def domain_xml(plan: ComposePlan, **kwargs) -> str:
    """build_domain() as an indented string (what defineXML gets and the goldens pin)."""
    el = build_domain(plan, **kwargs)
    ET.indent(el)
    return ET.tostring(el, encoding="unicode") + "\n"


def read_record(xml: str | ET.Element) -> Record | None:
    """Our record in a domain's XML, or None when vm-host did not make this domain.

    A domain with a <uuid> (every defined one) is ours only when the record names that uuid: a clone that
    kept our metadata (virt-clone, an edited dumpxml) has another uuid and reads as foreign.
    """
    root = ET.fromstring(xml) if isinstance(xml, str) else xml
    el = root.find(f"metadata/{{{METADATA_NS}}}allocation")
    if el is None or not (el.text or "").strip():
        return None
    uuid = el.get("uuid")
    own = root.findtext("uuid")
    if own is not None and (uuid or "").strip().lower() != own.strip().lower():
        return None
    try:
        volumes = tuple((str(p), str(v)) for p, v in json.loads(el.get("volumes") or "[]"))
        allocation = Allocation.from_dict(json.loads(el.text))
    except (ValueError, TypeError, KeyError):
        return None  # not a record we wrote: nothing in it is proof
    return Record(allocation, el.get("state", STATE_READY), uuid, volumes, el.get("login-user"), _host_keys(el))


def _host_keys(el: ET.Element) -> tuple[HostKey, ...]:
    """The recorded public host keys; a damaged list reads as none (list reports what it knows)."""
    try:
        return tuple(
            HostKey(str(k["algorithm"]), str(k["public_key"]), str(k["fingerprint"]))
            for k in json.loads(el.get("host-keys") or "[]")
        )
    except (ValueError, TypeError, KeyError):
        return ()


def read_metadata(xml: str | ET.Element) -> tuple[Allocation, str] | None:
    """(Allocation, state) from a domain's XML, or None when vm-host did not make it (see read_record)."""
    rec = read_record(xml)
    return None if rec is None else (rec.allocation, rec.state)


def allocation_from_foreign_xml(
    xml: str | ET.Element, *, host_nodes: tuple[int, ...] = (0,), default_hugepage_size: str = "2M"
) -> Allocation:
    """Usage of a domain vm-host did not make, counted from its own config (marked other).

    Hugepages of a domain bound to no node are charged evenly to `host_nodes` (the kernel's spread).
    """
    root = ET.fromstring(xml) if isinstance(xml, str) else xml
    name = root.findtext("name") or "?"
    vcpu_el = root.find("vcpu")
    vcpus = int(vcpu_el.text) if vcpu_el is not None and vcpu_el.text else 1
    memory = _bytes(root.find("memory")) or _bytes(root.find("currentMemory"))

    pins = {int(p.get("vcpu")): parse_cpuset(p.get("cpuset")) for p in root.findall("cputune/vcpupin")}
    pinned = None
    if pins and len(pins) == vcpus and all(len(s) == 1 for s in pins.values()):
        pinned = tuple(pins[v][0] for v in range(vcpus))

    nodeset = root.find("numatune/memory")
    numa_nodes = parse_cpuset(nodeset.get("nodeset")) if nodeset is not None and nodeset.get("nodeset") else ()
    memnodes = {int(m.get("cellid")): parse_cpuset(m.get("nodeset")) for m in root.findall("numatune/memnode")}
    cells = []
    for c in root.findall("cpu/numa/cell"):
        cid = int(c.get("id", len(cells)))
        bound = memnodes.get(cid) or numa_nodes  # the host node(s) this guest cell's memory is tied to
        if len(bound) == 1:
            cells.append(Cell(bound[0], parse_cpuset(c.get("cpus")), _bytes(c)))
    if len(cells) != len(root.findall("cpu/numa/cell")):
        cells = []

    hugepages = None
    page = root.find("memoryBacking/hugepages")
    if page is not None:
        size = default_hugepage_size
        p = page.find("page")
        if p is not None and p.get("size"):
            size = _hugepage_label(int(p.get("size")), p.get("unit", "KiB"), default_hugepage_size)
        page_bytes = HUGEPAGE_SIZES[size]
        if cells:
            per_node: dict[int, int] = {}
            for c in cells:
                per_node[c.node] = per_node.get(c.node, 0) + c.memory // page_bytes
        else:
            nodes = numa_nodes or host_nodes or (0,)  # a domain without cells: pages split as vm-host splits
            per_node = dict(zip(nodes, even_split(memory // page_bytes, len(nodes)), strict=True))
        hugepages = HugepageAllocation(size, per_node)
    return Allocation(
        name=name,
        vcpus=vcpus,
        memory=memory,
        pinned=pinned,
        numa_nodes=numa_nodes,
        hugepages=hugepages,
        cells=tuple(cells),
        other=True,
    )


_UNIT = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2}
_UNIT.update({"g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4})


def _bytes(el: ET.Element | None) -> int:
    """libvirt scaled integer (text or memory= attribute) in bytes; KiB is libvirt's default unit."""
    if el is None:
        return 0
    value = el.get("memory") if el.tag == "cell" else el.text
    if not value:
        return 0
    return int(value) * _UNIT.get(el.get("unit", "KiB").lower(), 1024)


def _hugepage_label(size: int, unit: str, default: str) -> str:
    n = size * _UNIT.get(unit.lower(), 1024)
    for label, b in HUGEPAGE_SIZES.items():
        if b == n:
            return label
    return default
