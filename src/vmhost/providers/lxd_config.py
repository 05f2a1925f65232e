"""Pure mapping between vm-host allocations and LXD instance/volume bodies (no daemon, no I/O).

Kept apart from the provider so the exact `limits.*`, devices and volume bodies LXD receives can be
checked by unit tests, and so the reverse mapping (an instance's config -> Allocation) is one function
used both for our VMs (read from `user.vmhost.allocation`) and for VMs made by others (their limits).

Just over 400 lines: both directions of one mapping, which read best side by side (a key written one way
is read back the other a screen away).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from vmhost.cloudinit import seed_documents
from vmhost.hostkeys import HostKeyPair
from vmhost.model import (
    DEFAULT_LOGIN_USER,
    Allocation,
    ComposePlan,
    DiskAllocation,
    HostKey,
    HugepageAllocation,
    NicAllocation,
)
from vmhost.parse import HUGEPAGE_SIZES, ParseCache, ParseError, parse_cpuset, parse_size
from vmhost.providers.addresses import guest_address
from vmhost.providers.base import STATE_COMPOSING, volume_name

ALLOCATION_KEY = "user.vmhost.allocation"
STATE_KEY = "user.vmhost.state"  # "composing" until every compose step succeeded, then "ready"
OWNER_KEY = "user.vmhost.owner"  # on volumes: the VM that owns them (gc deletes a volume whose VM is gone)
# The instance's identity: compose gives the instance this volatile.uuid and records it here. A copy
# (lxc copy) gets a new volatile.uuid, so it reads as made by others however much of our config it carries.
UUID_KEY = "user.vmhost.uuid"
LOGIN_USER_KEY = "user.vmhost.login-user"  # seeded VMs: DEFAULT_LOGIN_USER
HOST_KEYS_KEY = "user.vmhost.host-keys"  # seeded VMs: the public SSH host keys, JSON [HostKey.to_dict()]
OUR_PREFIX = "user.vmhost."

# LXD's own defaults for a VM with no limits (counted for VMs made by others).
LXD_DEFAULT_VCPUS = 1
LXD_DEFAULT_VM_MEMORY = 1024**3

NIC_TYPES = {"bridge": "bridged", "macvlan": "macvlan", "sriov": "sriov"}
_NICTYPE_TO_KIND = {v: k for k, v in NIC_TYPES.items()}

NETWORK_BOOT_PRIORITY = "10"  # higher boots first: PXE on the first NIC, then the root disk (as MAAS did)
DISK_BOOT_PRIORITY = "5"


def lxd_size(n: int) -> str:
    """An exact LXD size string in the largest unit that divides it ("8GiB", "20GB"), else bytes."""
    for suffix, mult in _LXD_UNITS:
        if n and n % mult == 0:
            return f"{n // mult}{suffix}"
    return f"{n}B"


_LXD_UNITS = sorted(
    [
        ("TiB", 1024**4),
        ("TB", 1000**4),
        ("GiB", 1024**3),
        ("GB", 1000**3),
        ("MiB", 1024**2),
        ("MB", 1000**2),
        ("KiB", 1024),
        ("kB", 1000),
    ],
    key=lambda u: -u[1],
)


def parse_lxd_size(value: str) -> int:
    """Bytes from an LXD size string ("8GiB", "20GB", "512MB", "1024", "100kB")."""
    v = str(value).strip()
    if v.endswith("kB"):
        v = v[:-2] + "KB"
    return parse_size(v)


def cpu_limit(allocation: Allocation) -> str:
    """`limits.cpu`: the pin list ("2,3,130,131"), "N-N" for one pinned CPU (a bare "N" means N vCPUs), or the count."""
    if allocation.pinned is None:
        return str(allocation.vcpus)
    pins = sorted(set(allocation.pinned))
    if len(pins) == 1:
        return f"{pins[0]}-{pins[0]}"
    return ",".join(str(p) for p in pins)


def root_disk(allocation: Allocation) -> DiskAllocation | None:
    """The boot disk: the one labelled root, else the first."""
    for d in allocation.disks:
        if d.label == "root":
            return d
    return allocation.disks[0] if allocation.disks else None


def extra_disks(allocation: Allocation) -> tuple[DiskAllocation, ...]:
    root = root_disk(allocation)
    return tuple(d for d in allocation.disks if d is not root)


def volume_bodies(allocation: Allocation) -> list[tuple[str, dict[str, Any]]]:
    """(pool, POST body) for each extra disk: a custom block volume tagged with its owner VM."""
    return [
        (
            d.pool,
            {
                "name": volume_name(allocation.name, d.label, prefix=""),
                "type": "custom",
                "content_type": "block",
                "config": {"size": lxd_size(d.size), OWNER_KEY: allocation.name},
            },
        )
        for d in extra_disks(allocation)
    ]


def nic_device(nic: NicAllocation, boot_priority: str | None = None) -> dict[str, str]:
    if nic.type == "network":
        dev = {"type": "nic", "network": nic.parent}
    elif nic.type in NIC_TYPES:
        dev = {"type": "nic", "nictype": NIC_TYPES[nic.type], "parent": nic.parent}
    else:
        allowed = ", ".join([*NIC_TYPES, "network"])
        raise ValueError(f"NIC {nic.label!r} has type {nic.type!r}; allowed: {allowed}")
    if nic.vlan is not None:
        dev["vlan"] = str(nic.vlan)
    if nic.mac:
        dev["hwaddr"] = nic.mac
    if boot_priority:
        dev["boot.priority"] = boot_priority
    return dev


def keeps_profile_nics(a: Allocation) -> bool:
    """Whether the VM keeps its profile's NICs: only an operator's VM with no NICs asked for.

    That is what an LXD operator expects of `vmhost compose` with no `interfaces`. Every other VM gets
    exactly the NICs of its allocation, so none escapes allowed-networks or goes unreported; a relation
    VM (it carries its owner key) never inherits one, even when no network applied to it.
    """
    return not a.nics and a.owner is None


def instance_devices(
    plan: ComposePlan, profile_devices: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, str]]:
    """Root disk in its pool with its size, extra disks as attached volumes, NICs by label.

    profile_devices: the devices of the VM's profile; each NIC among them that the allocation does not
    replace is masked with `type: none` (see keeps_profile_nics).
    """
    a = plan.allocation
    devices: dict[str, dict[str, str]] = {}
    root = root_disk(a)
    network_boot = plan.boot == "network"
    if root is not None:
        devices["root"] = {"type": "disk", "path": "/", "pool": root.pool, "size": lxd_size(root.size)}
        if not network_boot:
            devices["root"]["boot.priority"] = DISK_BOOT_PRIORITY
    for d in extra_disks(a):
        devices[d.label] = {"type": "disk", "pool": d.pool, "source": volume_name(a.name, d.label, prefix="")}
    for i, nic in enumerate(a.nics):
        if nic.label in devices:
            raise ValueError(f"NIC label {nic.label!r} is also a disk label; give each device its own label")
        devices[nic.label] = nic_device(nic, NETWORK_BOOT_PRIORITY if network_boot and i == 0 else None)
    if not keeps_profile_nics(a):
        for label, dev in sorted((profile_devices or {}).items()):
            if dev.get("type") == "nic" and label not in devices:
                devices[label] = {"type": "none"}
    return devices


def instance_config(
    plan: ComposePlan,
    *,
    numa_placement: bool = False,
    cloud_init_keys: bool = True,
    prefixes: Mapping[str, int] | None = None,
    uuid: str | None = None,
    host_keys: Sequence[HostKeyPair] = (),
) -> dict[str, str]:
    """`limits.*`, boot and cloud-init keys, and our own `user.vmhost.*` record of the allocation.

    host_keys: the VM's SSH host key pairs; the pairs go into its user-data, the public halves and the
    login user into LOGIN_USER_KEY and HOST_KEYS_KEY, which list reads back.

    uuid: the instance's volatile.uuid, set here and recorded in UUID_KEY (see owned()).

    numa_placement: the server has the `numa_cpu_placement` extension (`limits.cpu.nodes`).
    cloud_init_keys: the server has `cloud_init` (`cloud-init.*` keys), else the older `user.*` ones.
    prefixes: NIC label -> prefix length for static addresses given without one.
    """
    a = plan.allocation
    config = {
        "limits.cpu": cpu_limit(a),
        "limits.memory": lxd_size(a.memory),
        ALLOCATION_KEY: encode_allocation(a),
        STATE_KEY: STATE_COMPOSING,
    }
    if uuid:
        config["volatile.uuid"] = config[UUID_KEY] = uuid
    if numa_placement and a.numa_nodes:
        config["limits.cpu.nodes"] = ",".join(str(n) for n in sorted(a.numa_nodes))
    if a.hugepages is not None:
        config["limits.memory.hugepages"] = "true"
    if plan.boot == "network":
        config["security.secureboot"] = "false"
    if plan.cloud_init is not None:
        # LXD writes meta-data itself (instance-id, hostname = VM name); the login user and its keys travel
        # in the user-data (beside a caller's script in a MIME multipart), so no meta-data keys are needed.
        docs = seed_documents(plan.cloud_init, a.nics, prefixes=prefixes, host_keys=host_keys)
        prefix = "cloud-init." if cloud_init_keys else "user."
        config[f"{prefix}user-data"] = docs["user-data"]
        if a.nics:
            config[f"{prefix}network-config"] = docs["network-config"]
        config[LOGIN_USER_KEY] = DEFAULT_LOGIN_USER
        if host_keys:
            config[HOST_KEYS_KEY] = json.dumps([k.public.to_dict() for k in host_keys], separators=(",", ":"))
    return config


def access_from_config(config: Mapping[str, Any]) -> tuple[str | None, tuple[HostKey, ...]]:
    """(login user, public host keys) recorded for one of our VMs; a damaged record reads as none."""
    try:
        keys = tuple(
            HostKey(str(k["algorithm"]), str(k["public_key"]), str(k["fingerprint"]))
            for k in json.loads(config.get(HOST_KEYS_KEY) or "[]")
        )
    except (ValueError, TypeError, KeyError):
        keys = ()
    return config.get(LOGIN_USER_KEY) or None, keys


def state_addresses(state: object, macs: Sequence[str]) -> tuple[str, ...]:
    """Global addresses in an instance's state (GET .../state) on the interfaces with one of `macs`."""
    wanted = {m.lower() for m in macs if m}
    out: list[str] = []
    network = state.get("network") if isinstance(state, dict) else None
    for iface in (network or {}).values() if isinstance(network, dict) else ():
        if not isinstance(iface, dict) or str(iface.get("hwaddr") or "").lower() not in wanted:
            continue
        for entry in iface.get("addresses") or ():
            if (
                isinstance(entry, dict)
                and entry.get("scope") == "global"
                and (ip := guest_address(entry.get("address")))
            ):
                out.append(ip)
    return tuple(out)


def instance_body(
    plan: ComposePlan,
    *,
    profile: str,
    numa_placement: bool = False,
    cloud_init_keys: bool = True,
    prefixes: Mapping[str, int] | None = None,
    profile_devices: Mapping[str, Mapping[str, Any]] | None = None,
    uuid: str | None = None,
    host_keys: Sequence[HostKeyPair] = (),
) -> dict[str, Any]:
    """The POST /1.0/instances body: an empty VM for network boot, else one from the image alias."""
    if plan.boot == "network":
        source: dict[str, str] = {"type": "none"}
    elif plan.image:
        source = {"type": "image", "alias": plan.image}
    else:
        raise ValueError("boot=image needs an image alias; give image=<alias> or use boot=network")
    return {
        "name": plan.allocation.name,
        "type": "virtual-machine",
        "profiles": [profile],
        "config": instance_config(
            plan,
            numa_placement=numa_placement,
            cloud_init_keys=cloud_init_keys,
            prefixes=prefixes,
            uuid=uuid,
            host_keys=host_keys,
        ),
        "devices": instance_devices(plan, profile_devices),
        "source": source,
    }


def pull_source(server: str, fingerprint: str, certificate: str | None = None) -> dict[str, str]:
    """The instance source that has LXD pull a stream image itself (simplestreams, by the fingerprint vm-host
    resolved the name to, so LXD makes exactly the image vm-host's name rule chose). LXD pulls over https
    only; `certificate` pins a private server's own (self-signed) certificate."""
    if not server.startswith("https://"):
        raise ValueError(f"LXD pulls images over https only; image server {server} is not https")
    source = {"type": "image", "mode": "pull", "server": server, "protocol": "simplestreams"}
    source["fingerprint"] = fingerprint
    if certificate:
        source["certificate"] = certificate
    return source


def owned(config: Mapping[str, Any]) -> bool:
    """Whether an instance's own (unexpanded) config proves vm-host made it: our record, bound to the
    instance's own volatile.uuid."""
    uuid = config.get(UUID_KEY)
    return bool(config.get(ALLOCATION_KEY)) and bool(uuid) and uuid == config.get("volatile.uuid")


def foreign_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config of a VM made by others without any `user.vmhost.*` key: a copied record proves nothing."""
    return {k: v for k, v in config.items() if not str(k).startswith(OUR_PREFIX)}


def encode_allocation(a: Allocation) -> str:
    return json.dumps(a.to_dict(), sort_keys=True, separators=(",", ":"))


def allocation_from_config(
    name: str,
    config: dict[str, str],
    devices: dict[str, dict[str, str]] | None = None,
    *,
    host_memory: int = 0,
    thread_node: dict[int, int] | None = None,
    hugepage_size: str = "2M",
    cache: ParseCache[Allocation] | None = None,
) -> Allocation:
    """The allocation of an instance: ours from `user.vmhost.allocation`, anyone else's from its own limits.

    Pass the EXPANDED config/devices (profiles applied) for VMs made by others. `host_memory` resolves a
    percentage `limits.memory`; `thread_node` puts a pinned VM's hugepages on its threads' nodes;
    `hugepage_size` is the host's default page size (what `limits.memory.hugepages` uses). `cache`
    (the caller's) keeps our allocations by their raw text, so an unchanged one is not parsed again.
    """
    raw = config.get(ALLOCATION_KEY)
    if raw:
        return cache.get(raw, _allocation) if cache is not None else _allocation(raw)
    pinned: tuple[int, ...] | None = None
    limit = str(config.get("limits.cpu") or "").strip()
    if not limit:
        vcpus = LXD_DEFAULT_VCPUS
    elif limit.isdigit():
        vcpus = int(limit)
    else:
        pinned = parse_cpuset(limit)
        vcpus = len(pinned)
    mem_s = str(config.get("limits.memory") or "").strip()
    if not mem_s:
        memory = LXD_DEFAULT_VM_MEMORY
    elif mem_s.endswith("%"):
        memory = int(host_memory * float(mem_s[:-1]) / 100)
    else:
        try:
            memory = parse_lxd_size(mem_s)
        except ParseError:
            memory = LXD_DEFAULT_VM_MEMORY
    nodes: tuple[int, ...] = ()
    if config.get("limits.cpu.nodes"):
        nodes = parse_cpuset(config["limits.cpu.nodes"])
    elif pinned and thread_node:
        nodes = tuple(sorted({thread_node[t] for t in pinned if t in thread_node}))
    hugepages = None
    if str(config.get("limits.memory.hugepages", "")).lower() == "true":
        pages = -(-memory // HUGEPAGE_SIZES[hugepage_size])
        spread = nodes or (0,)
        per_node = {n: pages // len(spread) for n in spread}
        per_node[spread[0]] += pages - sum(per_node.values())
        hugepages = HugepageAllocation(size=hugepage_size, per_node=per_node)
    nics = []
    for label, dev in sorted((devices or {}).items()):
        if dev.get("type") != "nic":
            continue
        if dev.get("network"):
            kind, parent = "network", dev["network"]
        else:
            kind, parent = _NICTYPE_TO_KIND.get(dev.get("nictype", ""), dev.get("nictype", "")), dev.get("parent", "")
        vlan = dev.get("vlan")
        nics.append(
            NicAllocation(
                label=label,
                type=kind,
                parent=parent,
                vlan=int(vlan) if vlan and str(vlan).isdigit() else None,
                mac=dev.get("hwaddr") or config.get(f"volatile.{label}.hwaddr"),
            )
        )
    return Allocation(
        name=name,
        vcpus=vcpus,
        memory=memory,
        pinned=pinned,
        numa_nodes=nodes,
        hugepages=hugepages,
        nics=tuple(nics),
        other=True,
    )


def _allocation(raw: str) -> Allocation:
    return Allocation.from_dict(json.loads(raw))


def with_macs(a: Allocation, macs: dict[str, str]) -> Allocation:
    """The allocation with the MACs the hypervisor (or we) gave its NICs filled in (`a` itself when none is new)."""
    nics = tuple(replace(n, mac=macs.get(n.label) or n.mac) for n in a.nics)
    return a if nics == a.nics else replace(a, nics=nics)
