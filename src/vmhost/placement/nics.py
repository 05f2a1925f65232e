"""NIC resolution (docs/design.md §4 "Interfaces"): which host interface each MAAS interface constraint
matches, how the guest NIC attaches, which static addresses are free, and which NIC gives each SR-IOV VF.

Matching keeps MAAS's meaning: different keys must all hold; repeated values of a key are ORs; `not_`
values each exclude. `type` is the host interface's kind, `vlan`/`vid` its VLAN id (0 untagged),
`link_speed` a floor in Mbit/s, `space=undefined` an interface with no space (MAAS's Space.UNDEFINED).
Attachment: a bridge (or a hypervisor-managed network) first, then an SR-IOV VF, then macvlan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from vmhost.model import Allocation, HostTopology, Nic, NicAllocation
from vmhost.parse import InterfaceSpec
from vmhost.placement.errors import PlacementError

__all__ = [
    "ResolvedInterface",
    "assign_vfs",
    "check_static_addresses",
    "matches",
    "nic_allocations",
    "resolve_interfaces",
    "unknown_speeds",
    "vf_shortage",
    "without_soft_sriov",
]

UNDEFINED_SPACE = "undefined"
MACVLAN_KINDS = ("physical", "vlan", "bond")

IpInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


# ---------------------------------------------------------------------------------------------
# Matching one constraint


def _in_any(addresses: Iterable[str], networks: Sequence[str]) -> bool:
    for address in addresses:
        try:
            ip = ipaddress.ip_interface(address).ip
        except ValueError:
            continue
        for text in networks:
            network = ipaddress.ip_network(text)
            if ip.version == network.version and ip in network:
                return True
    return False


def _has_ip(addresses: Iterable[str], ips: Sequence[str]) -> bool:
    wanted = {ipaddress.ip_address(ip) for ip in ips}
    for address in addresses:
        try:
            if ipaddress.ip_interface(address).ip in wanted:
                return True
        except ValueError:
            continue
    return False


def _space_ok(space: str | None, wanted: Sequence[str]) -> bool:
    return space in wanted or (space is None and UNDEFINED_SPACE in wanted)


def matches(nic: Nic, spec: InterfaceSpec, *, as_bridge_of_port: bool = False) -> bool:
    """Whether host interface `nic` satisfies `spec`.

    as_bridge_of_port: `nic` is the bridge a matching port attaches through, so the keys that were
    about the port (its name and link speed) are not asked of the bridge again.
    """
    vlan_id = nic.vlan or 0
    if not as_bridge_of_port:
        if spec.name is not None and nic.name != spec.name:
            return False
        if spec.name_in and nic.name not in spec.name_in:
            return False
        if spec.not_name and nic.name in spec.not_name:
            return False
        if spec.link_speed is not None and (nic.link_speed is None or nic.link_speed < spec.link_speed):
            return False
    subnets = spec.subnet, spec.subnet_cidr
    not_subnets = spec.not_subnet, spec.not_subnet_cidr
    return (
        (not spec.type or nic.kind in spec.type)
        and (not spec.space or _space_ok(nic.space, spec.space))
        and (not spec.not_space or not _space_ok(nic.space, spec.not_space))
        and all(not want or _in_any(nic.addresses, want) for want in subnets)
        and all(not avoid or not _in_any(nic.addresses, avoid) for avoid in not_subnets)
        and (not spec.vlan or vlan_id in spec.vlan)
        and (not spec.not_vlan or vlan_id not in spec.not_vlan)
        and (not spec.vid or vlan_id in spec.vid)
        and (not spec.not_vid or vlan_id not in spec.not_vid)
        and (not spec.not_ip or not _has_ip(nic.addresses, spec.not_ip))
    )


def unknown_speeds(nics: Iterable[Nic], spec: InterfaceSpec) -> list[str]:
    """Interfaces that would match `spec` but for a link speed the host does not report (for the refusal)."""
    if spec.link_speed is None:
        return []
    without_speed = replace(spec, link_speed=None)
    return sorted(nic.name for nic in nics if nic.link_speed is None and matches(nic, without_speed))


# ---------------------------------------------------------------------------------------------
# Resolving every constraint of a request


@dataclass(frozen=True)
class ResolvedInterface:
    """One requested interface and how it attaches."""

    spec: InterfaceSpec
    attach: str  # bridge | network | macvlan | sriov
    nics: tuple[Nic, ...]  # candidates, best first (bridge/network/macvlan use the first)
    fallback: tuple[Nic, ...]  # macvlan candidates when SR-IOV was only preferred, not forced


def _ip_interface(text: str) -> IpInterface | None:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        return None


def _ip(text: str) -> Any:
    """The address of "10.0.0.5" or "10.0.0.5/24" (allocations may carry a prefix); None when malformed."""
    interface = _ip_interface(text)
    return interface.ip if interface is not None else None


def _contains_ip(nic: Nic, ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return any(
        interface is not None and interface.version == address.version and address in interface.network
        for interface in map(_ip_interface, nic.addresses)
    )


def _bridge_contains(by_name: dict[str, Nic], nic: Nic, ip: str) -> bool:
    parent = by_name.get(nic.bridge) if nic.bridge else None
    return parent is not None and _contains_ip(parent, ip)


def _describe(spec: InterfaceSpec) -> str:
    body = spec.to_str().split(":", 1)[1]
    return body or "no constraints"


def resolve_interfaces(
    host: HostTopology, specs: Sequence[InterfaceSpec], vfs_used: Mapping[str, int]
) -> list[ResolvedInterface]:
    """Each requested interface, matched against the host's own NICs, bridges and VLANs (rule 7 when none)."""
    by_name = {nic.name: nic for nic in host.nics}
    out = []
    for spec in specs:
        matched = [nic for nic in host.nics if matches(nic, spec)]
        if (
            spec.ips
        ):  # every address on the interface's subnets (MAAS ORed them and moved the NIC to the last one's VLAN)
            matched = [
                nic
                for nic in matched
                if all(_contains_ip(nic, ip) or _bridge_contains(by_name, nic, ip) for ip in spec.ips)
            ]
        if not matched:
            why = f" with subnets containing ip {' and '.join(spec.ips)}" if spec.ips else ""
            known = ", ".join(sorted(by_name)) or "none"
            unknown = unknown_speeds(host.nics, spec)
            speed = f" (link speed unknown on {', '.join(unknown)})" if unknown else ""
            raise PlacementError(
                f"interface {spec.label}: no host interface matches {_describe(spec)}{why}{speed}; "
                f"host interfaces: {known}"
            )
        bridges: dict[str, Nic] = {}
        for nic in matched:
            if nic.kind == "bridge":
                bridges[nic.name] = nic
            elif nic.bridge:  # a port attaches through its bridge, which must pass the filters too
                parent = by_name.get(nic.bridge) or Nic(name=nic.bridge, kind="bridge")
                if matches(parent, spec, as_bridge_of_port=True):
                    bridges.setdefault(nic.bridge, parent)
        bridge = sorted(bridges.values(), key=lambda nic: nic.name)
        # Hypervisor-managed networks (libvirt's "default" NAT network, say) attach like a bridge.
        networks = sorted((nic for nic in matched if nic.kind == "network"), key=lambda nic: nic.name)
        sriov = sorted(
            (nic for nic in matched if nic.sriov_max_vfs > 0),
            key=lambda nic: (vfs_used.get(nic.name, 0) - nic.sriov_max_vfs, nic.name),
        )
        macvlan = sorted(
            (nic for nic in matched if nic.kind in MACVLAN_KINDS and not nic.bridge), key=lambda nic: nic.name
        )
        if spec.ips:
            bridge = [nic for nic in bridge if all(_contains_ip(nic, ip) for ip in spec.ips)] or bridge
        free_sriov = [nic for nic in sriov if vfs_used.get(nic.name, 0) < nic.sriov_max_vfs]
        names = ", ".join(sorted(nic.name for nic in matched))
        if spec.attach == "bridge" or (spec.attach is None and (bridge or networks)):
            if bridge:
                out.append(ResolvedInterface(spec, "bridge", tuple(bridge), ()))
            elif networks:
                out.append(ResolvedInterface(spec, "network", tuple(networks), ()))
            else:
                raise PlacementError(f"interface {spec.label}: no bridge matches {_describe(spec)}; matching: {names}")
        elif spec.attach == "sriov" or (spec.attach is None and free_sriov):
            if not free_sriov:
                full = ", ".join(f"{nic.name} {vfs_used.get(nic.name, 0)}/{nic.sriov_max_vfs}" for nic in sriov)
                raise PlacementError(
                    f"interface {spec.label}: sriov needs a free VF on a NIC matching {_describe(spec)}; "
                    + (f"all VFs are in use ({full})" if sriov else f"none of {names} has SR-IOV VFs")
                )
            fallback = tuple(macvlan) if spec.attach is None else ()
            out.append(ResolvedInterface(spec, "sriov", tuple(free_sriov), fallback))
        else:
            if not macvlan:
                ports = sorted(f"{nic.name} is a port of bridge {nic.bridge}" for nic in matched if nic.bridge)
                why = (
                    f" ({'; '.join(ports)}: macvlan cannot use a bridge port, attach through the bridge)"
                    if ports
                    else ""
                )
                raise PlacementError(
                    f"interface {spec.label}: no physical or VLAN interface for macvlan matches {_describe(spec)}; "
                    f"matching: {names}{why}"
                )
            out.append(ResolvedInterface(spec, "macvlan", tuple(macvlan), ()))
    return out


# ---------------------------------------------------------------------------------------------
# Static addresses


def check_static_addresses(
    host: HostTopology, allocations: Iterable[Allocation], specs: Sequence[InterfaceSpec]
) -> None:
    """A static ip is one no one else has: not a subnet's network or broadcast address, not the host's own
    or a gateway's, not another VM's (whoever made it) nor another NIC's of this VM."""
    wanted = [(spec.label, _ip(ip)) for spec in specs for ip in spec.ips]
    if not wanted:
        return
    given: dict[Any, str] = {}
    for allocation in allocations:
        for nic in allocation.nics:
            if nic.ip and (ip := _ip(nic.ip)) is not None:
                given.setdefault(ip, allocation.name)
    for position, (label, ip) in enumerate(wanted):
        why = next(filter(None, (_host_conflict(nic, ip) for nic in host.nics)), None)
        if why is None and ip in given:
            why = f"is already given to VM {given[ip]}"
        if why is None and (
            twice := next((other_label for other_label, other in wanted[:position] if other == ip), None)
        ):
            why = f"is already given to interface {twice} of this VM"
        if why:
            raise PlacementError(f"interface {label}: ip {ip} {why}; choose another address")


def _host_conflict(nic: Nic, ip: Any) -> str | None:
    """Why `ip` is not free on the subnets of host interface `nic` (None when it is)."""
    for address in nic.addresses:
        interface = _ip_interface(address)
        if interface is None or interface.version != ip.version:
            continue
        network = interface.network
        if ip == interface.ip:
            return f"is an address of this host ({nic.name})"
        if ip in network and network.num_addresses > 2:
            if ip == network.network_address:
                return f"is the network address of {network}"
            if network.version == 4 and ip == network.broadcast_address:
                return f"is the broadcast address of {network}"
    if any(_ip(gateway) == ip for gateway in nic.gateways):
        return f"is the gateway on {nic.name}"
    return None


# ---------------------------------------------------------------------------------------------
# SR-IOV VFs


def assign_vfs(
    interfaces: Sequence[ResolvedInterface], nodes: set[int] | None, vfs_used: Mapping[str, int]
) -> dict[str, Nic] | None:
    """A VF per SR-IOV interface (label -> NIC), local to `nodes` (None: anywhere); None when impossible."""
    left: dict[str, int] = {}
    out: dict[str, Nic] = {}

    def free(nic: Nic) -> int:
        return left.get(nic.name, nic.sriov_max_vfs - vfs_used.get(nic.name, 0))

    for interface in interfaces:
        if interface.attach != "sriov":
            continue
        best = None
        for nic in interface.nics:
            if nodes is not None and nic.numa_node is not None and nic.numa_node not in nodes:
                continue
            if free(nic) > 0 and (best is None or free(nic) > free(best)):
                best = nic
        if best is None:
            return None
        left[best.name] = free(best) - 1
        out[interface.spec.label] = best
    return out


def without_soft_sriov(interfaces: list[ResolvedInterface]) -> list[ResolvedInterface]:
    """SR-IOV that was only preferred (no `attach=sriov`) becomes macvlan on its fallback NICs."""
    return [
        ResolvedInterface(interface.spec, "macvlan", interface.fallback, ())
        if interface.attach == "sriov" and interface.fallback
        else interface
        for interface in interfaces
    ]


def vf_shortage(interfaces: Sequence[ResolvedInterface], vfs_used: Mapping[str, int]) -> str:
    """Rule 7 for VFs: how many are needed and what each candidate NIC has free."""
    need = [interface for interface in interfaces if interface.attach == "sriov"]
    nics = sorted({nic.name: nic for interface in need for nic in interface.nics}.values(), key=lambda nic: nic.name)
    have = ", ".join(f"{nic.name} has {max(0, nic.sriov_max_vfs - vfs_used.get(nic.name, 0))} free" for nic in nics)
    return f"sriov: need {len(need)} VFs at once, {have}"


def nic_allocations(interfaces: Sequence[ResolvedInterface], vfs: Mapping[str, Nic]) -> tuple[NicAllocation, ...]:
    """The guest NICs: SR-IOV ones on the NIC chosen for their VF, the others on their first candidate."""
    out = []
    for interface in interfaces:
        nic = vfs[interface.spec.label] if interface.attach == "sriov" else interface.nics[0]
        out.append(
            NicAllocation(
                label=interface.spec.label,
                type=interface.attach,
                parent=nic.name,
                vlan=nic.vlan,
                ip=interface.spec.ip,
                numa_node=nic.numa_node,
                more_ips=interface.spec.more_ips,
                mode=interface.spec.mode,
            )
        )
    return tuple(out)
