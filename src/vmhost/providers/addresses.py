"""A VM's addresses as list reports them, whatever the backend: its static ip= ones at once, then what the
hypervisor learned (DHCP leases, guest agent, instance state), each once and bounded."""

from __future__ import annotations

from collections.abc import Iterable

from vmhost.model import Allocation

__all__ = ["MAX_ADDRESSES", "static_addresses", "vm_addresses"]

MAX_ADDRESSES = 64  # per VM: what a guest agent or instance state says is the guest's word, so it is bounded


def static_addresses(allocation: Allocation) -> tuple[str, ...]:
    """The ip= addresses the VM was made with (without a prefix), in NIC order."""
    out = []
    for nic in allocation.nics:
        for ip in ((nic.ip,) if nic.ip else ()) + tuple(nic.more_ips):
            out.append(ip.split("/", 1)[0])
    return tuple(out)


def vm_addresses(static: Iterable[str], dynamic: Iterable[str]) -> tuple[str, ...]:
    """Static first, then dynamic ones, each once, at most MAX_ADDRESSES."""
    return tuple(dict.fromkeys([*static, *dynamic]))[:MAX_ADDRESSES]
