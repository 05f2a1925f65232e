"""The exact LXD instance config, devices and volume bodies for each allocation shape, and the way back."""

from __future__ import annotations

import json

import pytest
import yaml

from vmhost.hostkeys import generate_host_keys
from vmhost.model import (
    DEFAULT_LOGIN_USER,
    Allocation,
    CloudInit,
    ComposePlan,
    DiskAllocation,
    HugepageAllocation,
    NicAllocation,
)
from vmhost.parse import ParseCache
from vmhost.providers import lxd_config as cfg

GIB = 1024**3


def alloc(**kw) -> Allocation:
    base = {"name": "vm-1", "vcpus": 2, "memory": 4 * GIB}
    base.update(kw)
    return Allocation(**base)


def test_pinned_vm_config_is_the_sorted_pin_list_with_memory_and_our_record():
    a = alloc(vcpus=4, pinned=(130, 2, 131, 3), numa_nodes=(0,))
    config = cfg.instance_config(ComposePlan(a))
    assert config == {
        "limits.cpu": "2,3,130,131",
        "limits.memory": "4GiB",
        "security.secureboot": "false",
        cfg.ALLOCATION_KEY: cfg.encode_allocation(a),
        cfg.STATE_KEY: "composing",
    }
    assert json.loads(config[cfg.ALLOCATION_KEY])["pinned"] == [130, 2, 131, 3]


def test_single_pinned_cpu_is_a_range_because_a_bare_number_is_a_count():
    a = alloc(vcpus=1, pinned=(7,))
    assert cfg.instance_config(ComposePlan(a))["limits.cpu"] == "7-7"


def test_unpinned_vm_gets_a_vcpu_count():
    assert cfg.instance_config(ComposePlan(alloc(vcpus=3)))["limits.cpu"] == "3"


def test_hugepage_backed_vm_sets_limits_memory_hugepages():
    a = alloc(pinned=(0, 1), numa_nodes=(0,), hugepages=HugepageAllocation("2M", {0: 2048}))
    config = cfg.instance_config(ComposePlan(a))
    assert config["limits.memory.hugepages"] == "true"
    assert "limits.memory.hugepages" not in cfg.instance_config(ComposePlan(alloc()))


def test_cpu_nodes_only_when_the_server_has_numa_cpu_placement():
    a = alloc(vcpus=4, pinned=(0, 1, 64, 65), numa_nodes=(1, 0), hugepages=HugepageAllocation("1G", {0: 2, 1: 2}))
    assert cfg.instance_config(ComposePlan(a), numa_placement=True)["limits.cpu.nodes"] == "0,1"
    assert "limits.cpu.nodes" not in cfg.instance_config(ComposePlan(a), numa_placement=False)
    assert "limits.cpu.nodes" not in cfg.instance_config(ComposePlan(alloc()), numa_placement=True)


def test_image_boot_keeps_secureboot_and_boots_the_root_disk():
    a = alloc(disks=(DiskAllocation("root", 20 * 10**9, "ssd"),), nics=(NicAllocation("eth0", "bridge", "br0"),))
    plan = ComposePlan(a, boot="image", image="ubuntu-24.04")
    body = cfg.instance_body(plan, profile="vmhost")
    assert "security.secureboot" not in body["config"]
    assert body["source"] == {"type": "image", "alias": "ubuntu-24.04"}
    assert body["devices"]["root"]["boot.priority"] == cfg.DISK_BOOT_PRIORITY
    assert "boot.priority" not in body["devices"]["eth0"]
    with pytest.raises(ValueError, match="needs an image"):
        cfg.instance_body(ComposePlan(a, boot="image"), profile="default")


def test_network_boot_body_is_an_empty_vm_with_pxe_first():
    a = alloc(
        disks=(DiskAllocation("root", 20 * 10**9, "ssd"), DiskAllocation("data", 100 * 10**9, "default")),
        nics=(NicAllocation("eth0", "bridge", "br0"), NicAllocation("eth1", "macvlan", "enp1s0")),
    )
    body = cfg.instance_body(ComposePlan(a), profile="default")
    assert body["name"] == "vm-1"
    assert body["type"] == "virtual-machine"
    assert body["profiles"] == ["default"]
    assert body["source"] == {"type": "none"}
    assert body["devices"] == {
        "root": {"type": "disk", "path": "/", "pool": "ssd", "size": "20GB"},
        "data": {"type": "disk", "pool": "default", "source": "vm-1-data"},
        "eth0": {"type": "nic", "nictype": "bridged", "parent": "br0", "boot.priority": "10"},
        "eth1": {"type": "nic", "nictype": "macvlan", "parent": "enp1s0"},
    }


def test_extra_disks_become_owned_custom_block_volumes_and_root_does_not():
    a = alloc(
        disks=(
            DiskAllocation("root", 20 * 10**9, "ssd"),
            DiskAllocation("data", 100 * 10**9, "default"),
            DiskAllocation("scratch", 8 * GIB, "ssd"),
        )
    )
    assert cfg.volume_bodies(a) == [
        (
            "default",
            {
                "name": "vm-1-data",
                "type": "custom",
                "content_type": "block",
                "config": {"size": "100GB", cfg.OWNER_KEY: "vm-1"},
            },
        ),
        (
            "ssd",
            {
                "name": "vm-1-scratch",
                "type": "custom",
                "content_type": "block",
                "config": {"size": "8GiB", cfg.OWNER_KEY: "vm-1"},
            },
        ),
    ]


PROFILE = {
    "root": {"type": "disk", "path": "/", "pool": "default"},
    "eth0": {"type": "nic", "network": "lxdbr0", "name": "eth0"},
    "mgmt": {"type": "nic", "nictype": "bridged", "parent": "br-mgmt"},
}
OWNER = "model-uuid/app/req-1"  # a relation VM's owner key


def test_profile_nics_the_allocation_does_not_name_are_masked():
    """A relation request for net0 gets net0 only, not also the profile's eth0 on lxdbr0 (unchecked, unreported)."""
    a = alloc(nics=(NicAllocation("net0", "bridge", "br-allowed"),), owner=OWNER)
    devices = cfg.instance_devices(ComposePlan(a), PROFILE)
    assert {k: v for k, v in devices.items() if v.get("type") != "disk"} == {
        "net0": {"type": "nic", "nictype": "bridged", "parent": "br-allowed", "boot.priority": "10"},
        "eth0": {"type": "none"},
        "mgmt": {"type": "none"},
    }


def test_an_allocation_nic_of_the_profiles_name_replaces_it_and_an_operator_vm_is_masked_too():
    a = alloc(nics=(NicAllocation("eth0", "macvlan", "enp1s0"),))
    devices = cfg.instance_devices(ComposePlan(a, boot="image", image="x"), PROFILE)
    assert devices["eth0"] == {"type": "nic", "nictype": "macvlan", "parent": "enp1s0"}
    assert devices["mgmt"] == {"type": "none"}
    assert "root" not in devices  # no disk in the allocation: the profile's root disk stays


def test_a_relation_vm_with_no_nics_gets_none_of_the_profiles():
    devices = cfg.instance_devices(ComposePlan(alloc(owner=OWNER)), PROFILE)
    assert devices == {"eth0": {"type": "none"}, "mgmt": {"type": "none"}}


def test_an_operator_vm_with_no_interfaces_keeps_the_profiles_nics():
    a = alloc()
    assert cfg.keeps_profile_nics(a)
    assert cfg.instance_devices(ComposePlan(a), PROFILE) == {}
    assert cfg.instance_body(ComposePlan(a), profile="default", profile_devices=PROFILE)["devices"] == {}


def test_root_is_the_first_disk_when_none_is_labelled_root():
    a = alloc(disks=(DiskAllocation("boot", 10 * 10**9, "default"), DiskAllocation("data", 10**9, "default")))
    devices = cfg.instance_devices(ComposePlan(a))
    assert devices["root"] == {"type": "disk", "path": "/", "pool": "default", "size": "10GB"}
    assert devices["data"]["source"] == "vm-1-data"
    assert "boot" not in devices


@pytest.mark.parametrize(
    ("nic", "device"),
    [
        (
            NicAllocation("eth0", "bridge", "br0", vlan=100),
            {"type": "nic", "nictype": "bridged", "parent": "br0", "vlan": "100"},
        ),
        (
            NicAllocation("eth0", "macvlan", "enp1s0", vlan=20),
            {"type": "nic", "nictype": "macvlan", "parent": "enp1s0", "vlan": "20"},
        ),
        (
            NicAllocation("eth0", "sriov", "enp65s0f0", vlan=7, mac="00:16:3e:00:00:01"),
            {"type": "nic", "nictype": "sriov", "parent": "enp65s0f0", "vlan": "7", "hwaddr": "00:16:3e:00:00:01"},
        ),
        (NicAllocation("eth0", "network", "lxdbr0"), {"type": "nic", "network": "lxdbr0"}),
    ],
)
def test_nic_types_with_vlan(nic, device):
    assert cfg.nic_device(nic) == device


def test_unknown_nic_type_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: bridge, macvlan, sriov, network"):
        cfg.nic_device(NicAllocation("eth0", "ovs", "br0"))


def test_sizes_are_exact_and_read_back():
    for n, text in ((4 * GIB, "4GiB"), (20 * 10**9, "20GB"), (512 * 1024**2, "512MiB"), (12345, "12345B")):
        assert cfg.lxd_size(n) == text
        assert cfg.parse_lxd_size(text) == n
    assert cfg.parse_lxd_size("100kB") == 100_000


def test_cloud_init_goes_into_cloud_init_keys_with_static_ip_matched_by_mac():
    nic = NicAllocation("eth0", "bridge", "br0", ip="10.20.0.50", mac="00:16:3e:aa:bb:cc")
    plan = ComposePlan(alloc(nics=(nic,)), cloud_init=CloudInit("web-1", (KEY,)))
    pairs = generate_host_keys()
    config = cfg.instance_config(plan, prefixes={"eth0": 24}, host_keys=pairs)
    user = yaml.safe_load(config["cloud-init.user-data"])
    assert config["cloud-init.user-data"].startswith("#cloud-config\n")
    assert user["hostname"] == "web-1"
    assert user["users"][0]["name"] == DEFAULT_LOGIN_USER and user["users"][0]["ssh_authorized_keys"] == [KEY]
    assert user["ssh_keys"]["ed25519_private"] == pairs[0].private and user["ssh_genkeytypes"] == ["ed25519"]
    # The record list reads back: login user and the PUBLIC halves only.
    assert cfg.access_from_config(config) == (DEFAULT_LOGIN_USER, (pairs[0].public,))
    assert pairs[0].private not in config[cfg.HOST_KEYS_KEY] and "user.meta-data" not in config
    net = yaml.safe_load(config["cloud-init.network-config"])
    assert net["ethernets"]["eth0"]["match"] == {"macaddress": "00:16:3e:aa:bb:cc"}
    assert net["ethernets"]["eth0"]["addresses"] == ["10.20.0.50/24"]
    old = cfg.instance_config(plan, cloud_init_keys=False)
    assert "user.user-data" in old and "cloud-init.user-data" not in old


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGXuzinACkSeBrlWwMqzXdLesbcyptFCAOXux58IMPQz alice@laptop"


def test_addresses_come_from_the_state_of_the_vms_own_nics_global_scope_only():
    state = {
        "network": {
            "enp5s0": {
                "hwaddr": "00:16:3E:AA:BB:CC",
                "addresses": [
                    {"family": "inet", "address": "10.5.0.7", "scope": "global"},
                    {"family": "inet6", "address": "fe80::1", "scope": "link"},
                    {"family": "inet6", "address": "fd42::7", "scope": "global"},
                ],
            },
            "lo": {"hwaddr": "", "addresses": [{"address": "127.0.0.1", "scope": "local"}]},
            "docker0": {"hwaddr": "02:42:00:00:00:01", "addresses": [{"address": "172.17.0.1", "scope": "global"}]},
        }
    }
    assert cfg.state_addresses(state, ["00:16:3e:aa:bb:cc"]) == ("10.5.0.7", "fd42::7")
    assert cfg.state_addresses(None, ["00:16:3e:aa:bb:cc"]) == ()
    assert cfg.state_addresses({"network": ["junk"]}, ["00:16:3e:aa:bb:cc"]) == ()


def test_addresses_in_the_state_are_the_guests_word_and_read_as_libvirts_are():
    """A VM's state comes from lxd-agent inside the guest: only real addresses, by the libvirt rule (no
    loopback, link-local or unspecified, whatever scope the guest claims), reach list and its terminal."""
    claimed = ["10.5.0.7", "\x1b]0;owned\x07", "x" * 100_000, "127.0.0.1", "169.254.1.1", "fe80::2", "0.0.0.0"]
    claimed += ["fd42::7%enp5s0", 7, None]
    entries = [{"family": "inet", "address": a, "scope": "global"} for a in claimed]
    state = {"network": {"enp5s0": {"hwaddr": "00:16:3e:aa:bb:cc", "addresses": entries}}}
    assert cfg.state_addresses(state, ["00:16:3e:aa:bb:cc"]) == ("10.5.0.7", "fd42::7")


def test_a_damaged_access_record_reads_as_none():
    assert cfg.access_from_config({cfg.LOGIN_USER_KEY: "ubuntu", cfg.HOST_KEYS_KEY: "[{"}) == ("ubuntu", ())
    assert cfg.access_from_config({}) == (None, ())


def test_our_allocation_round_trips_through_the_config():
    a = alloc(
        vcpus=4,
        pinned=(2, 3, 130, 131),
        numa_nodes=(0, 1),
        hugepages=HugepageAllocation("1G", {0: 2, 1: 2}),
        disks=(DiskAllocation("root", 20 * 10**9, "ssd", ("ssd",)), DiskAllocation("data", 10**11, "default")),
        nics=(NicAllocation("eth0", "sriov", "enp65s0f0", vlan=5, numa_node=1),),
        threads_per_core=2,
        owner="model/app/1",
    )
    body = cfg.instance_body(ComposePlan(a), profile="default")
    back = cfg.allocation_from_config("vm-1", body["config"], body["devices"])
    assert back == a
    assert back.other is False


def test_an_unchanged_allocation_is_not_parsed_again_and_keeps_its_object():
    a = alloc(vcpus=2, nics=(NicAllocation("eth0", "bridge", "br0", mac="52:54:00:00:00:01"),))
    config = cfg.instance_body(ComposePlan(a), profile="default")["config"]
    cache = ParseCache()
    first = cfg.allocation_from_config("vm-1", config, cache=cache)
    again = cfg.allocation_from_config("vm-1", {k: "".join(v) for k, v in config.items()}, cache=cache)
    assert again is first and first == a
    assert cfg.with_macs(first, {"eth0": "52:54:00:00:00:01"}) is first  # nothing new: the same object
    assert cfg.with_macs(first, {"eth0": "52:54:00:00:00:02"}).nics[0].mac == "52:54:00:00:00:02"


def test_a_vm_made_by_others_is_counted_from_its_own_limits():
    config = {"limits.cpu": "4-5", "limits.memory": "2GiB", "limits.memory.hugepages": "true"}
    devices = {
        "eth0": {"type": "nic", "nictype": "bridged", "parent": "br0", "vlan": "9"},
        "root": {"type": "disk", "path": "/", "pool": "default"},
    }
    got = cfg.allocation_from_config("theirs", config, devices, thread_node={4: 1, 5: 1})
    assert got.other is True
    assert (got.vcpus, got.pinned, got.memory, got.numa_nodes) == (2, (4, 5), 2 * GIB, (1,))
    assert got.hugepages == HugepageAllocation("2M", {1: 1024})
    assert got.nics == (NicAllocation("eth0", "bridge", "br0", vlan=9),)


def test_others_without_limits_get_lxd_defaults_and_percentages_resolve():
    bare = cfg.allocation_from_config("bare", {})
    assert (bare.vcpus, bare.memory, bare.pinned) == (1, GIB, None)
    half = cfg.allocation_from_config("half", {"limits.cpu": "3", "limits.memory": "50%"}, host_memory=16 * GIB)
    assert (half.vcpus, half.memory, half.pinned) == (3, 8 * GIB, None)


def test_reverse_limits_agree_with_forward_limits_for_our_own_shapes():
    """Even without our JSON record, the limits we write read back as the same CPUs and memory."""
    for a in (alloc(vcpus=1, pinned=(9,)), alloc(vcpus=3, pinned=(1, 2, 5)), alloc(vcpus=6)):
        config = cfg.instance_config(ComposePlan(a))
        del config[cfg.ALLOCATION_KEY]
        back = cfg.allocation_from_config(a.name, config)
        assert (back.vcpus, back.pinned, back.memory) == (a.vcpus, a.pinned, a.memory)


class _Response:
    def __init__(self, status: int, body: dict):
        self.status_code, self._body, self.text = status, body, json.dumps(body)

    def json(self) -> dict:
        return self._body


class _FlakySession:
    """LXD answering 503 (daemon busy) `fail` times, then the real answer."""

    def __init__(self, fail: int):
        self.fail, self.calls = fail, 0

    def request(self, method, url, **kw):
        self.calls += 1
        if self.calls <= self.fail:
            return _Response(503, {"type": "error", "error": "daemon is busy", "error_code": 503})
        return _Response(200, {"type": "sync", "metadata": {"ok": True}})


def _provider_with(session):
    from vmhost.providers.lxd import LxdProvider, _Connection

    p = LxdProvider()
    p._conn = _Connection(session, "http://lxd/1.0", {"auth": "trusted", "api_extensions": []})
    return p


def test_provider_retries_a_busy_daemon_then_succeeds():
    session = _FlakySession(fail=2)
    assert _provider_with(session)._get("/resources") == {"ok": True}
    assert session.calls == 3


def test_provider_retries_are_bounded_and_end_in_one_clear_error():
    from vmhost.providers.base import ProviderError

    session = _FlakySession(fail=100)
    with pytest.raises(ProviderError, match="daemon is busy"):
        _provider_with(session)._get("/resources")
    assert session.calls == 5


def test_provider_does_not_retry_a_refusal():
    from vmhost.providers.lxd import LxdApiError

    class Refusing(_FlakySession):
        def request(self, method, url, **kw):
            self.calls += 1
            return _Response(400, {"type": "error", "error": "Invalid devices", "error_code": 400})

    session = Refusing(0)
    with pytest.raises(LxdApiError, match="Invalid devices"):
        _provider_with(session)._call("POST", "/instances", json={})
    assert session.calls == 1


def test_remote_uri_without_client_certificate_is_refused(monkeypatch, tmp_path):
    import pylxd.client

    from vmhost.providers.base import ProviderError
    from vmhost.providers.lxd import LxdProvider

    # No `lxc remote add` client certificate to fall back on.
    monkeypatch.setattr(
        pylxd.client, "DEFAULT_CERTS", pylxd.client.Cert(str(tmp_path / "c.crt"), str(tmp_path / "c.key"))
    )

    with pytest.raises(ProviderError, match="needs a client certificate"):
        LxdProvider(uri="https://10.0.0.5:8443")
    with pytest.raises(ProviderError, match="not usable"):
        LxdProvider(uri="qemu:///system")


def test_instance_is_ours_only_when_our_record_names_its_own_volatile_uuid():
    """lxc copy keeps user.* keys but gives the copy a new volatile.uuid: the copy reads as foreign."""
    body = cfg.instance_body(ComposePlan(Allocation(name="vm-a", vcpus=1, memory=2**30)), profile="default", uuid="u-1")
    config = body["config"]
    assert config["volatile.uuid"] == config[cfg.UUID_KEY] == "u-1"
    assert cfg.owned(config)
    copy = {**config, "volatile.uuid": "u-2"}
    assert not cfg.owned(copy)
    assert not cfg.owned({k: v for k, v in config.items() if k != cfg.UUID_KEY})  # written by hand
    stripped = cfg.foreign_config({**copy, "user.other": "x"})
    assert not any(k.startswith("user.vmhost.") for k in stripped) and stripped["user.other"] == "x"
    # A foreign VM's allocation never carries a copied relation owner key.
    owner = Allocation(name="vm-a", vcpus=1, memory=2**30, owner="model-uuid/app/req-1")
    copied = {**copy, cfg.ALLOCATION_KEY: cfg.encode_allocation(owner)}
    assert cfg.allocation_from_config("vm-b", cfg.foreign_config(copied)).owner is None
