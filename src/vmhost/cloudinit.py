"""NoCloud seed for a VM: user-data, meta-data, network-config, and the `cidata` ISO holding them.

Provider-neutral: libvirt attaches the ISO as a read-only virtio disk, LXD can pass the same documents as
`cloud-init.*` config keys. Static addresses come from NicAllocation.ip; NICs are matched by MAC, so
the provider sets MACs before building the seed.

Access (docs/design.md §13): every seed creates the one login user DEFAULT_LOGIN_USER (passwordless sudo,
the caller's SSH keys, no password) and installs the VM's vm-host-made SSH host keys (cloud-init
`ssh_keys`, with key generation in the guest turned off). A caller's `#cloud-config` is merged with
vm-host's settings, vm-host's winning on the keys it sets (VM_HOST_KEYS) and on its login user's entry in
`users`; any other user-data (a script, a MIME archive, ...) travels beside vm-host's part in a MIME multipart.
"""

from __future__ import annotations

import ipaddress
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from email import message_from_string
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import yaml

from vmhost.guest_access import MAX_AUTHORIZED_KEYS, MAX_USER_DATA, check_authorized_keys
from vmhost.guest_access import check_user_data as check_bounded_user_data
from vmhost.hostkeys import HostKeyPair
from vmhost.model import DEFAULT_LOGIN_USER, CloudInit, NicAllocation

__all__ = [
    "MAX_SSH_KEYS",
    "MAX_USER_DATA",
    "check_ssh_keys",
    "check_user_data",
    "seed_documents",
    "static_prefixes",
    "user_data",
    "write_seed_iso",
]

MAX_SSH_KEYS = MAX_AUTHORIZED_KEYS  # one bound, guest_access's
# Keys of the merged cloud-config that are vm-host's alone: the caller's values for them are replaced.
VM_HOST_KEYS = ("hostname", "preserve_hostname", "ssh_keys", "ssh_genkeytypes", "ssh_deletekeys")
# vm-host's defaults a caller's cloud-config may override: no password logins; /etc/hosts names the host
# (so sudo resolves it).
CALLER_MAY_CHANGE = {"ssh_pwauth": False, "manage_etc_hosts": True}
SEED_TIMEOUT = 30.0  # s: genisoimage writing a seed of a few KiB (it takes milliseconds)
# A caller's cloud-config: nesting levels (cloud-init's own settings need under 10) and values, aliases expanded
# (a 64 KiB document without aliases holds fewer). Deeper documents exhaust Python's recursion in PyYAML.
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_VALUES = 100_000
# What cloud-init makes of a user-data part by its first line (its own table, the ones a caller may send).
_PART_TYPES = (
    ("#!", "x-shellscript"),
    ("#include", "x-include-url"),
    ("#cloud-boothook", "cloud-boothook"),
    ("#cloud-config-archive", "cloud-config-archive"),
    ("#part-handler", "part-handler"),
    ("## template: jinja", "jinja2"),
)


def check_ssh_keys(keys: Sequence[object]) -> tuple[str, ...]:
    """The keys as OpenSSH public key lines, each trimmed and single-spaced, then checked by the one key
    rule (vmhost.guest_access, which the relation uses too); ValueError in one sentence."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Sequence):
        raise ValueError("ssh_authorized_keys must be a list of OpenSSH public keys")
    return check_authorized_keys([" ".join(k.strip().split(None, 2)) if isinstance(k, str) else k for k in keys])


def check_user_data(text: object) -> str:
    """user_data as given when it is text within MAX_USER_DATA that cloud-init can read, else ValueError."""
    if not isinstance(text, str) or not text:
        raise ValueError("user_data must be text (a #cloud-config document, a script or a MIME archive)")
    check_bounded_user_data(text)  # size, UTF-8, no NUL: the relation's rule too (vmhost.guest_access)
    if text.startswith("#cloud-config\n") or text.rstrip() == "#cloud-config":
        _cloud_config(text)
    elif not _is_mime(text) and _part_type(text) is None:
        raise ValueError(
            "user_data starts with neither #cloud-config, #! (a script), another cloud-init part header "
            "nor a MIME Content-Type; cloud-init would ignore it"
        )
    return text


def _cloud_config(text: str) -> dict:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"user_data's #cloud-config is not valid YAML{where}") from None
    except RecursionError:
        raise ValueError(_too_deep()) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError("user_data's #cloud-config must be a mapping of cloud-init settings")
    _check_shape(doc)
    return doc


def _too_deep() -> str:
    return f"user_data's #cloud-config is nested more than {MAX_CONFIG_DEPTH} levels deep; at most {MAX_CONFIG_DEPTH} are allowed"


def _check_shape(doc: dict) -> None:
    """Depth and size within bounds, walked without recursion (an alias may make the document refer to itself)."""
    stack: list[tuple[object, int]] = [(doc, 1)]
    values = 1
    while stack:
        node, depth = stack.pop()
        children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
        if children and depth >= MAX_CONFIG_DEPTH:
            raise ValueError(_too_deep())
        values += len(children)
        if values > MAX_CONFIG_VALUES:
            raise ValueError(
                f"user_data's #cloud-config holds more than {MAX_CONFIG_VALUES} values (aliases expanded); "
                f"at most {MAX_CONFIG_VALUES} are allowed"
            )
        stack.extend((child, depth + 1) for child in children)


def _is_mime(text: str) -> bool:
    return text.lower().startswith(("content-type:", "mime-version:"))


def _part_type(text: str) -> str | None:
    for prefix, subtype in _PART_TYPES:
        if text.startswith(prefix):
            return subtype
    return None


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


def _vm_host_config(ci: CloudInit, host_keys: Sequence[HostKeyPair]) -> dict:
    """vm-host's own cloud-config: the hostname, the login user with the caller's keys, the VM's host keys."""
    user = {
        "name": DEFAULT_LOGIN_USER,
        "groups": ["sudo"],
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": True,
        "ssh_authorized_keys": list(check_ssh_keys(ci.ssh_authorized_keys)),
    }
    cfg: dict = {**CALLER_MAY_CHANGE, "hostname": ci.hostname, "preserve_hostname": False, "users": [user]}
    if host_keys:
        keys: dict[str, str] = {}
        for pair in host_keys:
            keys[f"{pair.cloud_init_type}_private"] = pair.private
            keys[f"{pair.cloud_init_type}_public"] = pair.public.public_key
        # Only the types given (each present, so none is made): the guest has exactly the keys vm-host reports.
        genkeytypes = [pair.cloud_init_type for pair in host_keys]
        cfg.update(ssh_keys=keys, ssh_genkeytypes=genkeytypes, ssh_deletekeys=True)
    return cfg


def _merge(theirs: dict, ours: dict) -> dict:
    """The caller's cloud-config with vm-host's: ours wins on VM_HOST_KEYS and on our user's `users` entry;
    theirs wins on everything else (CALLER_MAY_CHANGE included)."""
    if not isinstance(theirs.get("users") or [], list):
        raise ValueError("user_data's cloud-config `users` must be a list")
    users = [
        u for u in (theirs.get("users") or []) if not (isinstance(u, dict) and u.get("name") == DEFAULT_LOGIN_USER)
    ]
    merged = {**ours, **{k: v for k, v in theirs.items() if k not in VM_HOST_KEYS}}
    merged["users"] = [*users, *ours["users"]]
    return merged


def _cloud_config_text(cfg: dict) -> str:
    """A #cloud-config document; long lines (SSH keys) stay whole, so they read (and grep) as given."""
    return "#cloud-config\n" + yaml.safe_dump(cfg, sort_keys=True, width=1 << 20)


def user_data(ci: CloudInit, host_keys: Sequence[HostKeyPair] = ()) -> str:
    """The user-data document: vm-host's cloud-config, merged with or beside the caller's (module docstring)."""
    ours = _vm_host_config(ci, host_keys)
    if ci.user_data is None:
        return _cloud_config_text(ours)
    text = check_user_data(ci.user_data)
    if not _is_mime(text) and _part_type(text) is None:
        return _cloud_config_text(_merge(_cloud_config(text), ours))
    archive = MIMEMultipart()
    if _is_mime(text):
        given = message_from_string(text)
        for part in given.walk() if given.is_multipart() else [given]:
            if not part.is_multipart():
                archive.attach(part)
    else:
        archive.attach(MIMEText(text, _part_type(text), "utf-8"))
    archive.attach(MIMEText(_cloud_config_text(ours), "cloud-config", "utf-8"))
    return archive.as_string()


def seed_documents(
    ci: CloudInit,
    nics: Sequence[NicAllocation] = (),
    *,
    instance_id: str | None = None,
    prefixes: Mapping[str, int] | None = None,
    host_keys: Sequence[HostKeyPair] = (),
) -> dict[str, str]:
    """{"user-data", "meta-data", "network-config"} as the strings NoCloud reads.

    host_keys: the SSH host key pairs the VM is to have (vmhost.hostkeys).
    The caller's SSH keys go to the login user only (not meta-data's public-keys, which would give them
    to the image's own default user too).
    """
    meta = {"instance-id": instance_id or ci.hostname, "local-hostname": ci.hostname}
    return {
        "user-data": user_data(ci, host_keys),
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
                timeout=SEED_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise RuntimeError("genisoimage is not installed; install the genisoimage package") from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"genisoimage did not finish within {SEED_TIMEOUT:g} s") from None
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"genisoimage failed: {e.stderr.strip() or e}") from None
    return path
