"""What a REMOTE libvirt host has, read through libvirt alone (qemu+ssh://..., qemu+tls://...).

This machine's sysfs and `ip` describe this machine, not the host at the other end of the URI, so for
a remote URI every fact comes from the remote daemon: NUMA cells and per-node hugepages from its
capabilities, NICs (their NUMA node and SR-IOV VFs) from its node devices, bridges, bonds and VLANs
from its interface driver, pools from its storage driver.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from vmhost.model import Nic
from vmhost.parse import HUGEPAGE_SIZES

# Kinds from the interface driver's <interface type=...>; "ethernet" ones are NICs only when PCI-backed.
_IFACE_KINDS = {"bridge": "bridge", "bond": "bond", "vlan": "vlan"}


def is_remote(uri: str) -> bool:
    """True when `uri` names another host (a host name, or a transport such as +ssh/+tls), so sysfs is not its."""
    parts = urlsplit(uri)
    return not (parts.hostname in (None, "", "localhost") and "+" not in parts.scheme)


def cell_hugepages(cell: ET.Element) -> dict[str, int]:
    """Total pages per size of a capabilities <cell> (its <pages> elements; 4K pages left out)."""
    pages: dict[str, int] = {}
    for p in cell.findall("pages"):
        unit = (p.get("unit") or "KiB").lower()
        size = int(p.get("size", "0")) * {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "b": 1}.get(unit, 1024)
        for label, b in HUGEPAGE_SIZES.items():
            if b == size:
                pages[label] = int(p.text or 0)
    return pages


def remote_nics(conn: Any, call: Callable[..., Any], libvirt: Any) -> list[Nic]:
    """Host NICs from node devices (PCI NUMA node, enabled VFs; VFs themselves left out) and bridges,
    bonds and VLANs from the interface driver, with bridge ports marked."""
    nics: dict[str, Nic] = {}
    pci_cache: dict[str, ET.Element | None] = {}

    def pci(name: str) -> ET.Element | None:
        if name not in pci_cache:
            try:
                xml = ET.fromstring(call(conn.nodeDeviceLookupByName, name).XMLDesc(0))
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_NODE_DEVICE:
                    raise
                xml = None  # vanished meanwhile
            pci_cache[name] = xml if xml is not None and xml.find("capability[@type='pci']") is not None else None
        return pci_cache[name]

    for dev in call(conn.listAllDevices, libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET):
        xml = ET.fromstring(dev.XMLDesc(0))
        name = xml.findtext("capability/interface")
        parent = pci(xml.findtext("parent") or "")
        if not name or parent is None:
            continue  # loopback, taps, ifb, dummies: not NICs a VM can be given
        cap = parent.find("capability[@type='pci']")
        if cap.find("capability[@type='phys_function']") is not None:
            continue  # an SR-IOV VF: handed out as a VF of its parent, never as a NIC of its own
        node = cap.find("numa")
        node_id = int(node.get("node")) if node is not None and int(node.get("node", "-1")) >= 0 else None
        vfs = cap.findall("capability[@type='virt_functions']/address")
        nics[name] = Nic(name=name, numa_node=node_id, sriov_max_vfs=len(vfs))
    bridges, vlans = _interfaces(conn, call, libvirt)
    for name, (kind, vlan, ports) in bridges.items():
        nics[name] = Nic(name=name, kind=kind, vlan=vlan)
        for port in ports:
            if port in nics:
                nics[port] = replace(nics[port], bridge=name)
    for name, (vid, parent) in vlans.items():
        node = nics[parent].numa_node if parent in nics else None
        nics[name] = Nic(name=name, kind="vlan", vlan=vid, numa_node=node)
    # A bridge over a VLAN interface carries that VLAN (as the local reader says).
    for name, (kind, _vlan, ports) in bridges.items():
        vids = {vlans[p][0] for p in ports if p in vlans}
        if kind == "bridge" and len(vids) == 1:
            nics[name] = replace(nics[name], vlan=vids.pop())
    return [nics[n] for n in sorted(nics)]


def _interfaces(
    conn: Any, call: Callable[..., Any], libvirt: Any
) -> tuple[dict[str, tuple[str, int | None, list[str]]], dict[str, tuple[int, str]]]:
    """Bridges/bonds (name -> kind, VLAN, ports) and VLAN interfaces (name -> tag, parent) from the
    interface driver; a daemon built without one reports none."""
    try:
        ifaces = call(conn.listAllInterfaces, 0)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:  # a daemon without an interface driver
            return {}, {}
        raise
    groups: dict[str, tuple[str, int | None, list[str]]] = {}
    vlans: dict[str, tuple[int, str]] = {}
    for iface in ifaces:
        try:
            xml = ET.fromstring(iface.XMLDesc(0))
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_INTERFACE:
                raise
            continue  # removed between list and read
        name, kind = xml.get("name"), xml.get("type")
        if not name:
            continue
        if kind in ("bridge", "bond"):
            ports = [p.get("name") for p in xml.findall(f"{kind}/interface") if p.get("name")]
            groups[name] = (_IFACE_KINDS[kind], None, ports)
        elif kind == "vlan":
            tag, parent = xml.find("vlan"), xml.find("vlan/interface")
            if tag is not None and tag.get("tag", "").isdigit():
                vlans[name] = (int(tag.get("tag")), parent.get("name", "") if parent is not None else "")
    return groups, vlans
