"""NoCloud seed for a VM: user-data, meta-data, network-config, and the `cidata` ISO holding them.

Provider-neutral: libvirt attaches the ISO as a CD-ROM volume, LXD can pass the same documents as
`cloud-init.*` config keys. Static addresses come from NicAllocation.ip; NICs are matched by MAC, so
the provider sets MACs before building the seed.
"""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from vmhost.model import CloudInit, NicAllocation

__all__ = ["seed_documents", "static_prefixes", "write_seed_iso"]


def _address(ip: str, prefix: int | None) -> str:
    """ip/prefix; without a known prefix, the usual LAN one (/24, /64) so the guest can reach its neighbours."""
    if "/" in ip:
        return ip
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{prefix if prefix is not None else (24 if addr.version == 4 else 64)}"


def static_prefixes(nics: Sequence[NicAllocation], host_addresses: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """NIC label -> prefix length of its first bare static ip (further ips: the address -> its prefix),
    from the first host address on the NIC's parent containing it."""
    out: dict[str, int] = {}
    for nic in nics:
        for i, text in enumerate(_ips(nic)):
            if "/" in text:
                continue  # it carries its own prefix
            ip = ipaddress.ip_address(text)
            for addr in host_addresses.get(nic.parent, ()):
                iface = ipaddress.ip_interface(addr)
                if iface.version == ip.version and ip in iface.network:
                    out[nic.label if i == 0 else str(ip)] = iface.network.prefixlen
                    break
    return out


def _ips(nic: NicAllocation) -> tuple[str, ...]:
    return ((nic.ip,) if nic.ip else ()) + tuple(nic.more_ips)


def network_config(nics: Sequence[NicAllocation], prefixes: Mapping[str, int] | None = None) -> dict:
    """Netplan v2: each NIC matched by MAC and named by its label, addressed by its mode.

    mode (MAAS's link modes): static (the default with ip=) gives every ip= address; dhcp (the default
    without) asks DHCP for IPv4 and IPv6; link_up brings the link up with no address; unconfigured leaves
    the interface out of the config, so cloud-init does not touch it.
    """
    prefixes = prefixes or {}
    ethernets: dict[str, dict] = {}
    for nic in nics:
        ips = _ips(nic)
        mode = nic.mode or ("static" if ips else "dhcp")
        if mode == "unconfigured":
            continue
        eth: dict = {"set-name": nic.label}
        if nic.mac:
            eth["match"] = {"macaddress": nic.mac}
        else:
            eth = {"match": {"name": nic.label}}
        if mode == "static":
            eth["addresses"] = [_address(ip, prefixes.get(nic.label if i == 0 else ip)) for i, ip in enumerate(ips)]
        elif mode == "dhcp":
            eth["dhcp4"] = True
            if nic.mode == "dhcp":
                eth["dhcp6"] = True
        else:  # link_up
            eth["dhcp4"] = False
            eth["dhcp6"] = False
        ethernets[nic.label] = eth
    return {"version": 2, "ethernets": ethernets}


def seed_documents(
    ci: CloudInit,
    nics: Sequence[NicAllocation] = (),
    *,
    instance_id: str | None = None,
    prefixes: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """{"user-data", "meta-data", "network-config"} as the strings NoCloud reads.

    A caller's user_data passes through untouched (it may be a script or a MIME archive); the hostname
    and SSH keys then travel in meta-data, which cloud-init honours either way.
    """
    meta = {"instance-id": instance_id or ci.hostname, "local-hostname": ci.hostname}
    if ci.ssh_authorized_keys:
        meta["public-keys"] = list(ci.ssh_authorized_keys)
    if ci.user_data is not None:
        user = ci.user_data
    else:
        cfg: dict = {"hostname": ci.hostname, "preserve_hostname": False}
        if ci.ssh_authorized_keys:
            cfg["ssh_authorized_keys"] = list(ci.ssh_authorized_keys)
        user = "#cloud-config\n" + yaml.safe_dump(cfg, sort_keys=True)
    return {
        "user-data": user,
        "meta-data": yaml.safe_dump(meta, sort_keys=True),
        "network-config": yaml.safe_dump(network_config(nics, prefixes), sort_keys=False),
    }


def write_seed_iso(documents: Mapping[str, str], path: str | Path) -> Path:
    """Write the documents as a NoCloud ISO (volume id `cidata`) with genisoimage; returns the path."""
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="vmhost-seed-") as tmp:
        names = []
        for name, text in documents.items():
            (Path(tmp) / name).write_text(text)
            names.append(name)
        try:
            subprocess.run(
                ["genisoimage", "-quiet", "-output", str(path), "-volid", "cidata", "-joliet", "-rock", *names],
                cwd=tmp,
                check=True,
                capture_output=True,
                text=True,
            )
        except FileNotFoundError:
            raise RuntimeError("genisoimage is not installed; install the genisoimage package") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"genisoimage failed: {e.stderr.strip() or e}") from None
    return path
