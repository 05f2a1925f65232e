"""A VM's addresses as list reports them, whatever the backend: its static ip= ones at once, then what the
hypervisor learned (DHCP leases, guest agent, instance state), each once and bounded."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from vmhost.model import Allocation

__all__ = ["MAX_ADDRESSES", "guest_address", "static_addresses", "vm_addresses"]

MAX_ADDRESSES = 64  # per VM: what a guest agent or instance state says is the guest's word, so it is bounded


def static_addresses(allocation: Allocation) -> tuple[str, ...]:
    """The ip= addresses the VM was made with (without a prefix), in NIC order."""
    out = []
    for nic in allocation.nics:
        for ip in ((nic.ip,) if nic.ip else ()) + tuple(nic.more_ips):
            out.append(ip.split("/", 1)[0])
    return tuple(out)


def guest_address(value: object) -> str | None:
    """An address a hypervisor learned from the guest (its word: any text), as an IP another machine may use;
    None for anything else (not an address, loopback, link-local, unspecified). A %zone suffix is dropped."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        ip = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    return None if ip.is_loopback or ip.is_link_local or ip.is_unspecified else str(ip)


def vm_addresses(static: Iterable[str], dynamic: Iterable[str]) -> tuple[str, ...]:
    """Static first, then dynamic ones, each once, at most MAX_ADDRESSES."""
    return tuple(dict.fromkeys([*static, *dynamic]))[:MAX_ADDRESSES]
