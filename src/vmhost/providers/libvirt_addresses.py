"""A running libvirt VM's DHCP addresses: what its networks' leases and its guest agent say.

Static ip= addresses come from the record (providers.addresses). DHCP addresses come from the VM's
libvirt networks' leases (`interfaceAddresses`, LEASE source) and, when the VM's guest-agent channel is
connected, from qemu-guest-agent (AGENT source); both are matched to the VM by its MACs, so a foreign
interface never lends an address. Every call goes through the provider's bounded connection (its time
limit applies); a failure is logged and the addresses known so far are reported: listing never fails on it.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any

from vmhost.providers.addresses import guest_address
from vmhost.providers.libvirt_xml import GUEST_AGENT_CHANNEL

__all__ = ["dynamic_addresses"]

log = logging.getLogger(__name__)

# libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE / _AGENT (stable values; unit tests run without the binding)
SRC_LEASE = 0
SRC_AGENT = 1


def _agent_connected(dom: Any) -> bool:
    live = ET.fromstring(dom.XMLDesc(0))
    for target in live.findall("devices/channel/target"):
        if target.get("name") == GUEST_AGENT_CHANNEL and target.get("state") == "connected":
            return True
    return False


def _from_reply(reply: object, macs: set[str]) -> list[str]:
    """Addresses in an interfaceAddresses() reply whose interface has one of `macs`; loopback and
    link-local left out, anything malformed skipped (the agent's reply is the guest's word)."""
    out: list[str] = []
    if not isinstance(reply, dict):
        return out
    for iface in reply.values():
        if not isinstance(iface, dict) or str(iface.get("hwaddr") or "").lower() not in macs:
            continue
        for entry in iface.get("addrs") or ():
            if isinstance(entry, dict) and (ip := guest_address(entry.get("addr"))):
                out.append(ip)
    return out


def dynamic_addresses(dom: Any, macs: Iterable[str], errors: tuple[type[BaseException], ...]) -> list[str]:
    """The running domain's addresses from its leases, then its guest agent where one is connected.

    errors: what a failed call raises (libvirt's error and the provider's own); those are logged, not raised.
    """
    wanted = {m.lower() for m in macs}
    if not wanted:
        return []
    found: list[str] = []
    for what, source in (("leases", SRC_LEASE), ("guest agent", SRC_AGENT)):
        try:
            if source == SRC_AGENT and not _agent_connected(dom):
                continue  # no agent is answering: asking would only wait for libvirt's agent timeout
            found.extend(_from_reply(dom.interfaceAddresses(source, 0), wanted))
        except errors as e:
            log.warning("could not read the addresses of VM %s from its %s: %s", dom.name(), what, e)
    return found
