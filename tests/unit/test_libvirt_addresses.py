"""A libvirt VM's addresses: static at once, DHCP leases and the guest agent by MAC; a failed lookup never fails list.
And its domain type, from the hypervisor's capabilities."""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET

import pytest

from vmhost.model import Allocation, NicAllocation
from vmhost.providers.addresses import MAX_ADDRESSES, static_addresses, vm_addresses
from vmhost.providers.base import ProviderError
from vmhost.providers.libvirt import LibvirtProvider
from vmhost.providers.libvirt_addresses import SRC_AGENT, SRC_LEASE, dynamic_addresses

MAC = "52:54:00:aa:bb:01"
AGENT_XML = "<domain><devices><channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' state='{}'/></channel></devices></domain>"


class Dom:
    def __init__(self, replies, agent="connected", fail=()):
        self.replies, self.agent, self.fail, self.asked = replies, agent, fail, []

    def name(self):
        return "vm-1"

    def XMLDesc(self, flags):
        return AGENT_XML.format(self.agent)

    def interfaceAddresses(self, source, flags):
        self.asked.append(source)
        if source in self.fail:
            raise ProviderError("libvirt at qemu:///system did not answer interfaceAddresses within 30 s")
        return self.replies.get(source, {})


def lease(mac, *ips):
    return {"vnet0": {"hwaddr": mac, "addrs": [{"addr": ip, "prefix": 24, "type": 0} for ip in ips]}}


def test_leases_and_agent_are_matched_by_mac():
    dom = Dom(
        {
            SRC_LEASE: {
                **lease(MAC.upper(), "192.168.122.10"),
                **{"vnet9": lease("52:54:00:ff:ff:ff", "10.9.9.9")["vnet0"]},
            },
            SRC_AGENT: {
                "lo": {"hwaddr": "00:00:00:00:00:00", "addrs": [{"addr": "127.0.0.1"}]},
                "eth0": {
                    "hwaddr": MAC,
                    "addrs": [{"addr": "192.168.122.10"}, {"addr": "fe80::1"}, {"addr": "fd00::10"}],
                },
            },
        }
    )
    got = dynamic_addresses(dom, [MAC], (ProviderError,))
    assert got == ["192.168.122.10", "192.168.122.10", "fd00::10"]  # foreign MAC, loopback, link-local left out
    assert vm_addresses(["10.0.0.5"], got) == ("10.0.0.5", "192.168.122.10", "fd00::10")


def test_agent_is_not_asked_when_its_channel_is_not_connected():
    dom = Dom({SRC_LEASE: lease(MAC, "192.168.122.10")}, agent="disconnected")
    assert dynamic_addresses(dom, [MAC], (ProviderError,)) == ["192.168.122.10"]
    assert dom.asked == [SRC_LEASE]


def test_a_failed_lookup_logs_and_reports_what_is_known(caplog):
    dom = Dom({SRC_AGENT: lease(MAC, "10.1.1.1")}, fail=(SRC_LEASE,))
    with caplog.at_level(logging.WARNING):
        assert dynamic_addresses(dom, [MAC], (ProviderError,)) == ["10.1.1.1"]
    assert "could not read the addresses of VM vm-1 from its leases" in caplog.text


def test_garbage_from_the_guest_is_skipped():
    dom = Dom(
        {
            SRC_AGENT: {
                "eth0": {"hwaddr": MAC, "addrs": [{"addr": "not-an-ip"}, {}, None, {"addr": "10.2.2.2"}]},
                "x": [],
            }
        }
    )
    assert dynamic_addresses(dom, [MAC], (ProviderError, TypeError)) == ["10.2.2.2"]
    assert dynamic_addresses(Dom({SRC_LEASE: ["junk"]}), [MAC], (ProviderError,)) == []


def test_sources_are_libvirts_own_values():
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    assert SRC_LEASE == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE
    assert SRC_AGENT == libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT


def test_static_addresses_are_reported_without_asking_anyone():
    a = Allocation(
        name="vm",
        vcpus=1,
        memory=1024**3,
        nics=(
            NicAllocation("eth0", "bridge", "br0", ip="10.0.0.5/24", more_ips=("fd00::5",)),
            NicAllocation("eth1", "network", "default"),
        ),
    )
    assert static_addresses(a) == ("10.0.0.5", "fd00::5")


@pytest.mark.parametrize("n", [MAX_ADDRESSES + 10])
def test_addresses_are_bounded(n):
    assert len(vm_addresses([], [f"10.0.{i // 256}.{i % 256}" for i in range(n)])) == MAX_ADDRESSES


def _caps(*types: str) -> ET.Element:
    domains = "".join(f"<domain type='{t}'/>" for t in types)
    return ET.fromstring(f"<capabilities><guest><arch name='x86_64'>{domains}</arch></guest></capabilities>")


@pytest.mark.parametrize(
    ("setting", "offered", "chosen"),
    [("auto", ("qemu", "kvm"), "kvm"), ("auto", ("qemu",), "qemu"), ("qemu", ("qemu", "kvm"), "qemu")],
)
def test_domain_type_comes_from_the_hypervisors_capabilities(setting, offered, chosen):
    p = LibvirtProvider(uri="qemu:///system", domain_type=setting)
    p._caps = _caps(*offered)
    assert p.resolved_domain_type() == chosen


def test_a_forced_domain_type_the_hypervisor_lacks_is_refused_and_a_bad_one_never_built():
    p = LibvirtProvider(uri="qemu:///system", domain_type="kvm")
    p._caps = _caps("qemu")
    with pytest.raises(
        ProviderError,
        match=re.escape("domain type 'kvm' is not offered by libvirt at qemu:///system (it offers: qemu); use auto"),
    ):
        p.resolved_domain_type()
    with pytest.raises(ProviderError, match="domain type 'xen' is not one of auto, kvm, qemu"):
        LibvirtProvider(domain_type="xen")
