"""Remote discovery reads libvirt only: node devices and interfaces of a fake remote daemon."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from vmhost.model import Nic
from vmhost.providers import libvirt_discovery as disc

PF = """<device><name>pci_0000_81_00_0</name><parent>pci_0000_80_00_0</parent>
<capability type='pci'><domain>0</domain><bus>129</bus><slot>0</slot><function>0</function>
<capability type='virt_functions' maxCount='7'>
<address domain='0x0000' bus='0x81' slot='0x10' function='0x0'/>
<address domain='0x0000' bus='0x81' slot='0x10' function='0x2'/></capability>
<numa node='1'/></capability></device>"""
VF = """<device><name>pci_0000_81_10_0</name><parent>pci_0000_80_00_0</parent>
<capability type='pci'><capability type='phys_function'>
<address domain='0x0000' bus='0x81' slot='0x00' function='0x0'/></capability><numa node='1'/></capability></device>"""
VIRTIO = """<device><name>pci_0000_00_02_0</name><parent>computer</parent>
<capability type='pci'><domain>0</domain><bus>0</bus><slot>2</slot><function>0</function></capability></device>"""
COMPUTER = "<device><name>computer</name><capability type='system'/></device>"


def _net(name: str, parent: str) -> str:
    return f"<device><name>net_{name}</name><parent>{parent}</parent><capability type='net'><interface>{name}</interface></capability></device>"


class _Err(Exception):
    def __init__(self, code):
        self.code = code

    def get_error_code(self):
        return self.code


FAKE_LIBVIRT = SimpleNamespace(
    libvirtError=_Err,
    VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET=1,
    VIR_ERR_NO_SUPPORT=3,
    VIR_ERR_NO_INTERFACE=11,
    VIR_ERR_NO_NODE_DEVICE=9,
)


def _obj(xml: str):
    return SimpleNamespace(XMLDesc=lambda _flags=0: xml)


class FakeConn:
    def __init__(self, devices: dict[str, str], nets: list[str], ifaces: list[str] | None):
        self.devices, self.nets, self.ifaces = devices, nets, ifaces

    def listAllDevices(self, flags):
        assert flags == FAKE_LIBVIRT.VIR_CONNECT_LIST_NODE_DEVICES_CAP_NET
        return [_obj(x) for x in self.nets]

    def nodeDeviceLookupByName(self, name):
        if name not in self.devices:
            raise _Err(FAKE_LIBVIRT.VIR_ERR_NO_NODE_DEVICE)
        return _obj(self.devices[name])

    def listAllInterfaces(self, flags):
        if self.ifaces is None:
            raise _Err(FAKE_LIBVIRT.VIR_ERR_NO_SUPPORT)
        return [_obj(x) for x in self.ifaces]


def _call(fn, *args):
    return fn(*args)


DEVICES = {"pci_0000_81_00_0": PF, "pci_0000_81_10_0": VF, "pci_0000_00_02_0": VIRTIO, "computer": COMPUTER}
NETS = [
    _net("enp129s0", "pci_0000_81_00_0"),
    _net("enp129s0v0", "pci_0000_81_10_0"),
    _net("enp0s2", "pci_0000_00_02_0"),
    _net("lo", "computer"),
    _net("vnet3", "computer"),
]
IFACES = [
    "<interface type='bridge' name='br0'><bridge stp='off'><interface type='ethernet' name='enp0s2'/></bridge></interface>",
    "<interface type='vlan' name='enp129s0.20'><vlan tag='20'><interface name='enp129s0'/></vlan></interface>",
    "<interface type='bridge' name='br20'><bridge><interface type='vlan' name='enp129s0.20'/></bridge></interface>",
    "<interface type='ethernet' name='vnet3'/>",
]


def test_remote_nics_come_from_node_devices_and_interfaces_only():
    nics = disc.remote_nics(FakeConn(DEVICES, NETS, IFACES), _call, FAKE_LIBVIRT)
    assert nics == [
        Nic(name="br0", kind="bridge"),
        Nic(name="br20", kind="bridge", vlan=20),
        Nic(name="enp0s2", bridge="br0"),
        Nic(name="enp129s0", numa_node=1, sriov_max_vfs=2),  # the two VFs that exist, on the PF's node
        Nic(name="enp129s0.20", kind="vlan", vlan=20, numa_node=1),
    ]


def test_remote_nics_without_an_interface_driver_still_list_pci_nics():
    nics = disc.remote_nics(FakeConn(DEVICES, NETS, None), _call, FAKE_LIBVIRT)
    assert [n.name for n in nics] == ["enp0s2", "enp129s0"]


def test_other_interface_errors_are_not_hidden():
    conn = FakeConn(DEVICES, NETS, [])
    conn.listAllInterfaces = lambda flags: (_ for _ in ()).throw(_Err(38))
    with pytest.raises(_Err):
        disc.remote_nics(conn, _call, FAKE_LIBVIRT)


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu://localhost/system", False),
        ("qemu+ssh://root@127.0.0.1:2222/system", True),
        ("qemu+ssh://virsh@host/system", True),
        ("qemu+unix:///system", True),  # a transport we cannot prove is this machine's sysfs: ask libvirt
        ("qemu://host/system", True),
    ],
)
def test_is_remote(uri, remote):
    assert disc.is_remote(uri) is remote


def test_cell_hugepages_reads_every_size_and_unit():
    cell = ET.fromstring(
        "<cell><pages unit='KiB' size='4'>100</pages><pages unit='KiB' size='2048'>128</pages>"
        "<pages unit='KiB' size='1048576'>2</pages></cell>"
    )
    assert disc.cell_hugepages(cell) == {"2M": 128, "1G": 2}


def test_a_node_device_gone_between_list_and_lookup_is_left_out_but_a_broken_connection_is_not():
    gone = FakeConn({k: v for k, v in DEVICES.items() if k != "pci_0000_00_02_0"}, NETS, [])
    assert [n.name for n in disc.remote_nics(gone, _call, FAKE_LIBVIRT)] == ["enp129s0"]
    broken = FakeConn(DEVICES, NETS, [])
    broken.nodeDeviceLookupByName = lambda name: (_ for _ in ()).throw(_Err(38))
    with pytest.raises(_Err):
        disc.remote_nics(broken, _call, FAKE_LIBVIRT)
