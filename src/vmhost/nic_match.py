"""Which host interfaces satisfy one MAAS interface constraint (`InterfaceSpec`), with MAAS's meaning.

Kept apart from placement so the constraint semantics live in one small module: different keys must
all hold; repeated values of a key are ORs; `not_` values each exclude. `type` is the host interface's
kind, `vlan`/`vid` its VLAN id (0 untagged), `link_speed` a floor in Mbit/s, `space=undefined` an
interface with no space (MAAS's Space.UNDEFINED).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import replace

from vmhost.model import Nic
from vmhost.parse import InterfaceSpec

__all__ = ["matches", "unknown_speeds"]

UNDEFINED_SPACE = "undefined"


def _in_any(addresses: Iterable[str], networks: Sequence[str]) -> bool:
    for a in addresses:
        try:
            ip = ipaddress.ip_interface(a).ip
        except ValueError:
            continue
        for net in networks:
            n = ipaddress.ip_network(net)
            if ip.version == n.version and ip in n:
                return True
    return False


def _has_ip(addresses: Iterable[str], ips: Sequence[str]) -> bool:
    wanted = {ipaddress.ip_address(x) for x in ips}
    for a in addresses:
        try:
            if ipaddress.ip_interface(a).ip in wanted:
                return True
        except ValueError:
            continue
    return False


def _space_ok(space: str | None, wanted: Sequence[str]) -> bool:
    return space in wanted or (space is None and UNDEFINED_SPACE in wanted)


def matches(nic: Nic, s: InterfaceSpec, *, as_bridge_of_port: bool = False) -> bool:
    """Whether host interface `nic` satisfies `s`.

    as_bridge_of_port: `nic` is the bridge a matching port attaches through, so the keys that were
    about the port (its name and link speed) are not asked of the bridge again.
    """
    vid = nic.vlan or 0
    if not as_bridge_of_port:
        if s.name is not None and nic.name != s.name:
            return False
        if s.name_in and nic.name not in s.name_in:
            return False
        if s.not_name and nic.name in s.not_name:
            return False
        if s.link_speed is not None and (nic.link_speed is None or nic.link_speed < s.link_speed):
            return False
    subnets = s.subnet, s.subnet_cidr
    not_subnets = s.not_subnet, s.not_subnet_cidr
    return (
        (not s.type or nic.kind in s.type)
        and (not s.space or _space_ok(nic.space, s.space))
        and (not s.not_space or not _space_ok(nic.space, s.not_space))
        and all(not want or _in_any(nic.addresses, want) for want in subnets)
        and all(not avoid or not _in_any(nic.addresses, avoid) for avoid in not_subnets)
        and (not s.vlan or vid in s.vlan)
        and (not s.not_vlan or vid not in s.not_vlan)
        and (not s.vid or vid in s.vid)
        and (not s.not_vid or vid not in s.not_vid)
        and (not s.not_ip or not _has_ip(nic.addresses, s.not_ip))
    )


def unknown_speeds(nics: Iterable[Nic], s: InterfaceSpec) -> list[str]:
    """Interfaces that would match `s` but for a link speed the host does not report (for the refusal)."""
    if s.link_speed is None:
        return []
    free = replace(s, link_speed=None)
    return sorted(n.name for n in nics if n.link_speed is None and matches(n, free))
