"""The charm through ops.testing: every event path, every action, failures included.

The hypervisor is an in-memory fake Provider (placement is real); the machine is a temp-dir root
(sysfs/procfs/dev) with a recording command runner, so host preparation runs its real code.
"""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
from pathlib import Path

import pytest
from ops import testing

import charm
from charm import NO_KVM
from tests.unit.fakes import (
    CommandRecorder,
    FakeApt,
    FakeLxdTrust,
    FakeProvider,
    FakeSnap,
    apt_lock_error,
    apt_update_error,
    self_signed_pem,
    snap_store_error,
)
from tests.unit.juju_cli import charm_context, juju_run_params
from vmhost import lxd_setup as lxd_setup_mod
from vmhost.lxd_setup import LxdHostState
from vmhost.machine_setup import GRUB_DROPIN, Host, libvirt_packages
from vmhost.model import NicAllocation
from vmhost.providers.base import ProviderError

TOPOLOGY = {
    "nodes": [
        {
            "id": 0,
            "memory": 8 * 1024**3,
            "cores": [{"id": c, "threads": [c]} for c in range(4)],
            "hugepages": {"2M": 512},
        }
    ],
    "nics": [{"name": "br0", "kind": "bridge", "addresses": ["10.0.0.1/24"]}],
    "storage_pools": [{"name": "default", "driver": "dir", "total": 100 * 10**9, "used": 0}],
}


class Machine:
    """A temp-dir machine: /dev/kvm, sysfs hugepages for one node, /proc, package markers."""

    def __init__(self, root: Path, kvm=True, libvirt=True, lxd=True, cap_1g=None):
        self.root = root
        for kb in ("2048kB", "1048576kB"):
            (root / f"sys/kernel/mm/hugepages/hugepages-{kb}").mkdir(parents=True)
            d = root / f"sys/devices/system/node/node0/hugepages/hugepages-{kb}"
            d.mkdir(parents=True)
            (d / "nr_hugepages").write_text("0\n")
        (root / "proc").mkdir()
        (root / "proc/cmdline").write_text("root=/dev/sda1\n")
        (root / "proc/mounts").write_text("hugetlbfs /dev/hugepages hugetlbfs rw 0 0\n")
        (root / "proc/meminfo").write_text("Hugepagesize:       2048 kB\n")
        (root / "sys/devices/system/node/node0/meminfo").write_text("Node 0 MemTotal:       8388608 kB\n")  # 8G
        (root / "dev").mkdir()
        if kvm:
            (root / "dev/kvm").touch()
        if libvirt:
            (root / "usr/sbin").mkdir(parents=True)
            (root / "usr/sbin/libvirtd").touch()
        if lxd:
            (root / "snap/bin").mkdir(parents=True)
            (root / "snap/bin/lxc").touch()
        self.runner = CommandRecorder(installed=libvirt_packages() if libvirt else ())
        self.apt = FakeApt()
        self.snap = FakeSnap()
        self.waits: list[float] = []  # in-hook retry waits, recorded instead of slept
        self.cap_1g = cap_1g

    def host(self) -> Host:
        cap = self.cap_1g

        class _Host(Host):
            def _write_sysfs(self, path, value):
                if cap is not None and "1048576kB" in str(path):
                    value = min(value, cap)
                path.write_text(f"{value}\n")

        return _Host(root=self.root, run=self.runner, apt=self.apt, snap=self.snap, sleep=self.waits.append)

    def nr(self, kb: str) -> int:
        return int((self.root / f"sys/devices/system/node/node0/hugepages/hugepages-{kb}/nr_hugepages").read_text())


class FakeLxdDaemon:
    """The LXD daemon as vmhost.lxd_setup sees it: its state, and preseeds merged into it as LXD merges them.

    Only the daemon is faked: what to create is decided by the real vmhost.lxd_setup.ensure_host.
    """

    def __init__(self, state: LxdHostState | None = None):
        self.state = state or LxdHostState()  # a fresh daemon: no pool, no network, an empty default profile
        self.applied: list[dict] = []
        self.fail_preseed: Exception | None = None

    def read_state(self, client=None, timeout=None) -> LxdHostState:
        return self.state

    def apply_preseed(self, preseed: dict) -> None:
        if self.fail_preseed:
            raise self.fail_preseed
        self.applied.append(preseed)
        s = self.state
        devices = dict(s.profile_devices)
        for profile in preseed.get("profiles", []):
            devices.update(profile["devices"])
        self.state = LxdHostState(
            pools={**s.pools, **{p["name"]: p["driver"] for p in preseed.get("storage_pools", [])}},
            networks=s.networks | {n["name"] for n in preseed.get("networks", [])},
            profile_devices=devices,
            https_address=preseed.get("config", {}).get("core.https_address", s.https_address),
        )


@pytest.fixture
def fake(monkeypatch) -> FakeProvider:
    provider = FakeProvider(TOPOLOGY)
    provider.uris = []

    def make_provider(settings):
        provider.name = settings.backend
        provider.uris.append((settings.backend, settings.uri))
        provider.options = dict(settings.options)
        return provider

    monkeypatch.setattr(charm, "make_provider", make_provider)
    monkeypatch.setattr(charm.machine_setup, "lxd_supports_vms", lambda client=None, timeout=None: True)
    return provider


@pytest.fixture
def machine(monkeypatch, tmp_path) -> Machine:
    m = Machine(tmp_path)
    monkeypatch.setattr(charm, "make_host", m.host)
    return m


@pytest.fixture
def lxd_setup(monkeypatch) -> FakeLxdDaemon:
    daemon = FakeLxdDaemon()
    for name in ("read_state", "apply_preseed"):
        monkeypatch.setattr(lxd_setup_mod, name, getattr(daemon, name))
    daemon.trust = FakeLxdTrust()  # certificates and tokens go through the real lxd_setup to this
    monkeypatch.setattr(lxd_setup_mod, "_client", lambda client=None, timeout=None: daemon.trust)
    return daemon


LIBVIRT = {"backend": "libvirt"}


def ctx() -> testing.Context:
    return charm_context()


def run_action(name: str, params=None, config=None):
    c = ctx()
    state = c.run(c.on.action(name, params=params or {}), testing.State(config=LIBVIRT if config is None else config))
    return c.action_results, state


def fail_action(name: str, params=None, config=None) -> str:
    c = ctx()
    with pytest.raises(testing.ActionFailed) as exc:
        c.run(c.on.action(name, params=params or {}), testing.State(config=LIBVIRT if config is None else config))
    return exc.value.message


# --- events and status ----------------------------------------------------------------------------


def test_install_libvirt_installs_missing_packages_and_goes_active(fake, machine, monkeypatch):
    machine.runner.installed -= {"genisoimage"}
    c = ctx()
    out = c.run(c.on.install(), testing.State(config=LIBVIRT))
    assert machine.apt.added == [["genisoimage"]]
    assert out.unit_status.name == "active"
    assert out.unit_status.message.startswith("libvirt")
    assert fake.uris[0] == ("libvirt", "qemu:///system")
    assert fake.closed >= 1  # every session closes its connection


def test_install_shows_maintenance_while_installing(fake, machine):
    (machine.root / "usr/sbin/libvirtd").unlink()
    c = ctx()
    out = c.run(c.on.install(), testing.State(config=LIBVIRT))
    assert testing.MaintenanceStatus("installing libvirt and QEMU packages") in c.unit_status_history
    # The fake apt did not really put libvirtd there: still installing.
    assert out.unit_status == testing.MaintenanceStatus("installing libvirt")


def test_lxd_install_uses_snap_channel_and_preseed_from_config(fake, machine, lxd_setup):
    config = {
        "lxd-snap-channel": "6/stable",
        "lxd-storage-driver": "zfs",
        "bridge": "br0",
        "lxd-listen-address": "10.0.0.5:8443",
        "default-storage-pool": "fast",
    }
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config=config))
    assert machine.snap.ensured == [("lxd", "6/stable")]
    assert lxd_setup.applied == [
        {
            "storage_pools": [{"name": "fast", "driver": "zfs", "config": {}}],
            "profiles": [
                {
                    "name": "default",
                    "devices": {
                        "root": {"path": "/", "pool": "fast", "type": "disk"},
                        "eth0": {"name": "eth0", "type": "nic", "nictype": "bridged", "parent": "br0"},
                    },
                }
            ],
            "config": {"core.https_address": "10.0.0.5:8443"},
        }
    ]
    assert out.unit_status.name == "active"
    assert fake.uris[0] == ("lxd", None)


def test_lxd_preseed_failure_blocks_with_lxds_words(fake, machine, lxd_setup):
    lxd_setup.fail_preseed = RuntimeError("storage driver zfs is not available")
    c = ctx()
    out = c.run(c.on.install(), testing.State())
    assert out.unit_status == testing.BlockedStatus("LXD set-up failed: storage driver zfs is not available")


def test_lxd_set_up_happens_once_and_later_hooks_apply_nothing(fake, machine, lxd_setup):
    """update-status every 5 min must not re-apply the preseed: `ipv4.address: auto` would renumber lxdbr0."""
    c = ctx()
    state = c.run(c.on.install(), testing.State())
    assert [sorted(p) for p in lxd_setup.applied] == [["networks", "profiles", "storage_pools"]]
    made = lxd_setup.state
    for _ in range(2):
        state = c.run(c.on.update_status(), state)
    assert len(lxd_setup.applied) == 1
    assert lxd_setup.state == made
    assert state.unit_status.name == "active"


def test_lxd_set_up_adds_only_what_an_existing_host_lacks(fake, machine, lxd_setup):
    lxd_setup.state = LxdHostState(
        pools={"default": "dir"},
        networks=frozenset({"lxdbr0"}),
        profile_devices={"eth0": {"type": "nic", "network": "lxdbr0", "name": "eth0"}},
    )
    c = ctx()
    c.run(c.on.config_changed(), testing.State())
    assert lxd_setup.applied == [
        {"profiles": [{"name": "default", "devices": {"root": {"path": "/", "pool": "default", "type": "disk"}}}]}
    ]


def test_changed_storage_driver_is_not_applied_and_status_says_why(fake, machine, lxd_setup):
    lxd_setup.state = LxdHostState(
        pools={"default": "dir"},
        networks=frozenset({"lxdbr0"}),
        profile_devices={"root": {"type": "disk", "path": "/", "pool": "default"}, "eth0": {"type": "nic"}},
    )
    fake.orphans = ["vmhost-x"]
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={"lxd-storage-driver": "zfs"}))
    assert lxd_setup.applied == []
    assert out.unit_status == testing.BlockedStatus(
        "storage pool default exists with driver dir; lxd-storage-driver=zfs only applies at first set-up"
    )
    assert fake.orphans == []  # the host still serves: gc and the relation ran
    out = c.run(c.on.config_changed(), testing.State(config={"lxd-storage-driver": "dir"}))
    assert out.unit_status.name == "active"


def test_lxd_without_vm_support_is_blocked(fake, machine, lxd_setup, monkeypatch):
    monkeypatch.setattr(charm.machine_setup, "lxd_supports_vms", lambda client=None, timeout=None: False)
    c = ctx()
    out = c.run(c.on.update_status(), testing.State())
    assert out.unit_status == testing.BlockedStatus("LXD cannot run VMs here: load the kvm and vhost_vsock modules")


def test_no_kvm_is_blocked_with_the_fix(fake, monkeypatch, tmp_path):
    m = Machine(tmp_path, kvm=False)
    monkeypatch.setattr(charm, "make_host", m.host)
    c = ctx()
    out = c.run(c.on.start(), testing.State(config=LIBVIRT))
    assert out.unit_status == testing.BlockedStatus(NO_KVM)


@pytest.mark.parametrize(
    ("config", "status"),
    [
        ({"backend": "xen"}, "config backend: 'xen' is not allowed: input should be 'lxd' or 'libvirt'"),
        ({"hugepages": "3M:8"}, "config hugepages: hugepage size '3M' is not supported; allowed: 2M, 1G"),
        (
            {"cpu-overcommit-ratio": 0.0},
            "config cpu-overcommit-ratio: 0 is not allowed; use a number from 0.1 to 64 (1.0 means no overcommit)",
        ),
        (
            {"cpu-overcommit-ratio": 1e308},
            "config cpu-overcommit-ratio: 1e+308 is not allowed; use a number from 0.1 to 64",
        ),
        ({"cpu-overcommit-ratio": float("inf")}, "config cpu-overcommit-ratio: inf is not allowed"),
        ({"cpu-overcommit-ratio": float("nan")}, "config cpu-overcommit-ratio: nan is not allowed"),
        (
            {"memory-overcommit-ratio": 4.5},
            "config memory-overcommit-ratio: 4.5 is not allowed; use a number from 0.1 to 4",
        ),
        ({"reserved-memory": "9" * 400}, "config reserved-memory: reserved memory is too large"),
        ({"relation-quota": "vms=" + "9" * 400}, "config relation-quota: vms '999"),
        ({"hugepages": "2M:" + "9" * 5000}, "config hugepages: count '999"),
        ({"reserved-memory": "lots"}, "config reserved-memory: size 'lots' is not a size"),
        ({"relation-quota": "vms=x"}, "config relation-quota: vms 'x' is not a whole number"),
    ],
)
def test_bad_config_blocks_naming_the_option_and_changes_nothing(fake, machine, config, status):
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={**LIBVIRT, **config}))
    assert out.unit_status.name == "blocked"
    assert out.unit_status.message.startswith(status)
    assert machine.runner.calls == []  # no host change with a bad config
    assert machine.apt.added == []


def test_hugepages_set_at_runtime_per_node(fake, machine):
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={**LIBVIRT, "hugepages": "0:2M:256"}))
    assert machine.nr("2048kB") == 256
    assert out.unit_status.name == "active"
    assert not (machine.root / GRUB_DROPIN).exists()


def test_1g_hugepages_the_kernel_cannot_give_wait_for_reboot(fake, monkeypatch, tmp_path):
    m = Machine(tmp_path, cap_1g=1)
    monkeypatch.setattr(charm, "make_host", m.host)
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={**LIBVIRT, "hugepages": "1G:4"}))
    assert out.unit_status == testing.WaitingStatus("reboot required for 1G hugepages")
    assert "hugepagesz=1G hugepages=4" in (m.root / GRUB_DROPIN).read_text()
    assert ["update-grub"] in m.runner.calls
    assert ["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "hugetlbfs", "/dev/hugepages-1G"] in m.runner.calls


@pytest.mark.parametrize(
    ("hugepages", "status"),
    [
        ("2M:99999999999", "hugepages 2M:99999999999 is more than this machine can hold; at most 2M:3072 "),
        ("1G:100000", "hugepages 1G:100000 is more than this machine can hold; at most 1G:6 "),
        ("0:1G:7", "hugepages 0:1G:7 is more than NUMA node 0 can hold; at most 0:1G:6 "),
    ],
)
def test_hugepages_past_the_machine_block_naming_the_largest_and_touch_nothing(fake, machine, hugepages, status):
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={**LIBVIRT, "hugepages": hugepages}))
    assert out.unit_status.name == "blocked"
    assert out.unit_status.message.startswith(status)
    assert machine.nr("2048kB") == 0 and machine.nr("1048576kB") == 0
    assert not (machine.root / GRUB_DROPIN).exists() and ["update-grub"] not in machine.runner.calls


def test_overcommit_ratio_1e308_never_raises_in_any_hook(fake, machine):
    for event in ("config_changed", "update_status", "leader_elected"):
        c = ctx()
        out = c.run(getattr(c.on, event)(), testing.State(config={**LIBVIRT, "cpu-overcommit-ratio": 1e308}))
        assert out.unit_status.name == "blocked"


def test_hugepages_on_a_node_the_host_lacks_blocks(fake, machine):
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={**LIBVIRT, "hugepages": "5:2M:8"}))
    assert out.unit_status == testing.BlockedStatus("hugepages names NUMA node 5 but this host has nodes 0")


def test_reconcile_removes_crash_orphans(fake, machine):
    fake.orphans = ["vmhost-vm-dead"]
    c = ctx()
    c.run(c.on.update_status(), testing.State(config=LIBVIRT))
    assert fake.orphans == []


@pytest.mark.parametrize(
    "event",
    ["install", "config_changed", "upgrade_charm", "start", "update_status", "leader_elected"],
)
def test_every_lifecycle_event_reconciles(fake, machine, event):
    fake.orphans = ["vmhost-x"]
    c = ctx()
    c.run(getattr(c.on, event)(), testing.State(config=LIBVIRT))
    assert fake.orphans == []


def test_relation_events_reconcile(fake, machine):
    rel = testing.Relation("vm-allocation", remote_app_name="consumer")
    peer = testing.PeerRelation("vm-host-peers", peers_data={1: {}})
    for make in (
        lambda c: c.on.relation_changed(rel),
        lambda c: c.on.relation_departed(rel, remote_unit=0),
        lambda c: c.on.relation_broken(rel),
        lambda c: c.on.relation_changed(peer, remote_unit=1),
        lambda c: c.on.relation_departed(peer, remote_unit=1),
    ):
        fake.orphans = ["vmhost-x"]
        c = ctx()
        c.run(make(c), testing.State(config=LIBVIRT, relations={rel, peer}))
        assert fake.orphans == []


def test_unreachable_hypervisor_waits(fake, machine):
    def boom():
        raise ProviderError("cannot connect to qemu:///system: Connection refused")

    fake.discover = boom
    c = ctx()
    out = c.run(c.on.update_status(), testing.State(config=LIBVIRT))
    assert out.unit_status.name == "waiting"
    assert "Connection refused" in out.unit_status.message


def test_no_allocation_in_stored_state(fake, machine):
    results, state = run_action("compose", {"cores": 1, "memory": "512M"})
    assert results["name"] not in repr(state.stored_states)


# --- actions --------------------------------------------------------------------------------------


def test_compose_pinned_hugepage_vm(fake, machine):
    params = {
        "cores": 2,
        "memory": "512M",
        "pinned_cores": "auto",
        "hugepages_backed": True,
        "hugepage_size": "2M",
        "storage": "root:10",
        "interfaces": "eth0:name=br0",
        "hostname": "web-1",
        "pool": "tenant-a",
        "start": True,
    }
    results, _ = run_action("compose", params)
    assert results["name"] == "web-1"
    assert results["state"] == "running"
    assert results["vcpus"] == "2"
    pinned = json.loads(results["pinned"])
    assert len(pinned) == 2 and len(set(pinned)) == 2
    assert json.loads(results["nodes"]) == [0]
    assert results["memory"] == str(512 * 1024**2)
    assert json.loads(results["hugepages"]) == {"size": "2M", "per_node": {"0": 256}}
    disks = json.loads(results["disks"])
    assert disks[0]["pool"] == "default" and disks[0]["size"] == 10 * 10**9
    nics = json.loads(results["nics"])
    assert nics[0]["parent"] == "br0" and nics[0]["mac"] == "52:54:00:00:01:00"
    assert json.loads(results["macs"]) == ["52:54:00:00:01:00"]
    plan = fake.composed[0]
    assert plan.start is True and plan.boot == "network"
    assert plan.cloud_init is None  # network (PXE) boot: the installer names the machine, no seed needed
    assert fake.vms["web-1"].allocation.resource_pool == "tenant-a"


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGXuzinACkSeBrlWwMqzXdLesbcyptFCAOXux58IMPQz alice@laptop"


def test_compose_takes_ssh_keys_and_user_data_for_the_login_user(fake, machine):
    params = {"memory": "256M", "hostname": "web-2", "ssh_authorized_keys": [KEY], "user_data": "#!/bin/sh\ntrue\n"}
    results, _ = run_action("compose", params)
    ci = fake.composed[0].cloud_init
    assert (ci.hostname, ci.ssh_authorized_keys, ci.user_data) == ("web-2", (KEY,), "#!/bin/sh\ntrue\n")
    assert "login-user" not in results  # the fake provider records none; keys are in the results' own names
    assert all(k == k.lower() and "_" not in k for k in results)


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"ssh_authorized_keys": ["ssh-rsa nope"]}, "entry 0 is not one OpenSSH public key line"),
        (
            {"ssh_authorized_keys": [KEY] * 33},
            "parameter ssh-authorized-keys: ssh_authorized_keys lists 33 keys; at most 32",
        ),
        ({"user_data": "echo hi"}, "cloud-init would ignore it"),
        ({"user_data": "#!/bin/sh\n" + "#" * 65536}, "parameter user-data: user_data is 65546 bytes; at most 65536"),
    ],
)
def test_compose_bad_access_fails_in_one_sentence_and_makes_nothing(fake, machine, params, says):
    message = fail_action("compose", {"memory": "256M", **params})
    assert says in message and "\n" not in message and KEY[20:60] not in message and "####" not in message
    assert fake.composed == []


@pytest.mark.parametrize(("value", "option"), [("qemu", {"domain_type": "qemu"}), ("auto", {})])
def test_libvirt_domain_type_reaches_the_provider(fake, machine, value, option):
    run_action("list-vms", config={**LIBVIRT, "libvirt-domain-type": value})
    assert {k: v for k, v in fake.options.items() if k == "domain_type"} == option


def test_compose_policy_from_config_reserved_cores_never_pinned(fake, machine):
    config = {**LIBVIRT, "reserved-cores": "0-1"}
    results, _ = run_action("compose", {"cores": 2, "memory": "256M", "pinned_cores": "auto"}, config)
    assert set(json.loads(results["pinned"])) == {2, 3}
    msg = fail_action("compose", {"cores": 1, "memory": "256M", "pinned_cores": "auto"}, config)
    assert msg.startswith("pinned cpus: need 1")
    assert len(fake.vms) == 1


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"memory": "lots"}, "size 'lots' is not a size"),
        ({"cores": 2, "pinned_cores": "1"}, "lists 1 CPUs but cores is 2"),
        ({"storage": "root:-1"}, "storage size '-1' in 'root:-1' is not a size"),
        ({"storage": "root:1000"}, "disk root: need"),  # more than the pool holds
        ({"interfaces": "eth0:colour=red"}, "interface constraint key 'colour'"),
        ({"hostname": "Bad_Name"}, "parameter hostname: 'Bad_Name' is not a valid host name"),
        ({"boot": "image"}, "boot=image needs an image"),
        ({"hugepage_size": "1G", "memory": "1G"}, "hugepages 1G: need 1, node 0 has 0 free"),
        ({"cores": 64}, "shared vCPUs: need 64, the host has 4 free"),
    ],
)
def test_compose_bad_params_fail_with_one_sentence_and_create_nothing(fake, machine, params, says):
    message = fail_action("compose", params)
    assert says in message
    assert "\n" not in message
    assert fake.vms == {} and fake.composed == []


def test_compose_provider_failure_is_reported(fake, machine):
    fake.fail_compose = ProviderError("compose failed at step 'define domain': boom")
    message = fail_action("compose", {"memory": "256M"})
    assert message == "compose failed at step 'define domain': boom"
    assert fake.vms == {}


def test_compose_duplicate_hostname_refused(fake, machine):
    run_action("compose", {"memory": "256M", "hostname": "db"})
    assert "already exists" in fail_action("compose", {"memory": "256M", "hostname": "db"})
    assert list(fake.vms) == ["db"]


def test_decompose_and_unknown_name(fake, machine):
    run_action("compose", {"memory": "256M", "hostname": "gone"})
    results, _ = run_action("decompose", {"name": "gone"})
    assert results == {"name": "gone", "decomposed": "true"}
    assert fake.vms == {}
    assert fail_action("decompose", {"name": "gone"}) == "no VM named 'gone' on this host"


def test_list_vms_filters_by_pool(fake, machine):
    run_action("compose", {"memory": "256M", "hostname": "a", "pool": "red"})
    run_action("compose", {"memory": "256M", "hostname": "b", "pool": "blue"})
    results, _ = run_action("list-vms", {"pool": "red"})
    assert results["count"] == "1"
    assert [v["name"] for v in json.loads(results["json"])] == ["a"]
    assert "a" in results["view"] and "b" not in results["view"].split()
    results, _ = run_action("list-vms")
    assert results["count"] == "2"


def test_resources_view_and_json(fake, machine):
    run_action("compose", {"cores": 1, "memory": "256M", "pinned_cores": "auto", "hostname": "p"})
    results, _ = run_action("resources")
    data = json.loads(results["json"])
    assert isinstance(data, dict) and data
    assert results["view"].strip()
    assert "p" in json.dumps(data)


def test_start_and_stop(fake, machine):
    run_action("compose", {"memory": "256M", "hostname": "s"})
    results, _ = run_action("start-vm", {"name": "s"})
    assert results == {"name": "s", "state": "running"}
    results, _ = run_action("stop-vm", {"name": "s", "force": True})
    assert results == {"name": "s", "state": "stopped"}
    assert fail_action("start-vm", {"name": "nope"}) == "no VM named 'nope' on this host"


def test_refresh_reports_removed_orphans(fake, machine):
    fake.orphans = ["vmhost-vm-1234"]
    results, _ = run_action("refresh")
    assert json.loads(results["removed"]) == ["vmhost-vm-1234"]
    assert results["summary"].startswith("libvirt")


def test_actions_refuse_while_config_is_bad(fake, machine):
    message = fail_action("compose", {"memory": "256M"}, {"backend": "xen"})
    assert message.startswith("fix the charm config first: config backend:")
    assert fake.composed == []


def test_add_trusted_client_restricts_to_the_vmhost_project_by_default(fake, machine, lxd_setup):
    pem = self_signed_pem()
    results, _ = run_action("add-trusted-client", {"cert": pem, "name": "maas"}, config={})
    fp = results["fingerprint"]
    assert results == {"name": "maas", "fingerprint": fp, "access": "access to project vmhost only"}
    assert lxd_setup.trust.certs[fp] == {"name": "maas", "fingerprint": fp, "restricted": True, "projects": ["vmhost"]}
    assert fake.projects_made == 1  # LXD refuses a restriction to a project that does not exist yet


def test_add_trusted_client_gives_full_access_only_with_admin(fake, machine, lxd_setup):
    results, _ = run_action("add-trusted-client", {"cert": self_signed_pem(), "name": "ops", "admin": True}, config={})
    assert results["access"] == "full access"
    assert lxd_setup.trust.certs[results["fingerprint"]]["restricted"] is False
    assert fake.projects_made == 0


def test_re_adding_a_certificate_under_another_name_is_reported(fake, machine, lxd_setup):
    pem = self_signed_pem()
    results, _ = run_action("add-trusted-client", {"cert": pem, "name": "maas"}, config={})
    fp = results["fingerprint"]
    message = fail_action("add-trusted-client", {"cert": pem, "name": "maas-2"}, config={})
    assert message == (
        f"LXD did not trust the certificate: this certificate ({fp[:12]}) is already trusted as 'maas' with "
        f"access to project vmhost only; nothing changed: to trust it as 'maas-2' with access to project vmhost "
        f"only, remove it first (lxc config trust remove {fp[:12]})"
    )
    assert [c["name"] for c in lxd_setup.trust.certs.values()] == ["maas"]
    again, _ = run_action("add-trusted-client", {"cert": pem, "name": "maas"}, config={})  # same name: idempotent
    assert again["fingerprint"] == fp


def test_client_token_reaches_the_operator_as_a_unit_secret_that_expires(fake, machine, lxd_setup):
    c = ctx()
    out = c.run(c.on.action("get-client-token", params={"name": "laptop", "expiry": "30m"}), testing.State(config={}))
    results = c.action_results
    assert set(results) == {"name", "secret-id", "expires", "access"}
    assert results["access"] == "access to project vmhost only"
    assert results["expires"] == "2027-01-15T08:30:00Z"
    made = lxd_setup.trust.tokens[0]
    assert made["request"]["projects"] == ["vmhost"] and made["expiresAt"] == results["expires"]
    assert made["secret"] not in json.dumps(results)  # the token is not in the action output
    (secret,) = out.secrets
    assert secret.id == results["secret-id"] and secret.owner == "unit"
    token = json.loads(base64.b64decode(secret.tracked_content["token"]))
    assert token["secret"] == made["secret"] and token["expires_at"] == "2027-01-15T08:30:00Z"
    assert secret.expire is not None
    assert "laptop" in secret.description and "2027-01-15T08:30:00Z" in secret.description


def test_client_token_default_expiry_is_one_hour_and_admin_is_unrestricted(fake, machine, lxd_setup):
    results, _ = run_action("get-client-token", {"name": "laptop", "admin": True}, config={})
    assert results["expires"] == "2027-01-15T09:00:00Z"
    assert results["access"] == "full access"
    assert lxd_setup.trust.tokens[0]["request"]["restricted"] is False


@pytest.mark.parametrize("expiry", ["0m", "8d", "soon"])
def test_client_token_expiry_is_bounded(fake, machine, lxd_setup, expiry):
    message = fail_action("get-client-token", {"name": "laptop", "expiry": expiry}, config={})
    assert message == (
        f"parameter expiry: {expiry!r} is not an expiry from 1m to 7d; give minutes, hours or days, e.g. 30m, 1h or 2d"
    )
    assert lxd_setup.trust.tokens == []


def test_expired_token_secret_is_removed(fake, machine, lxd_setup):
    secret = testing.Secret({"token": "t"}, owner="unit", expire=datetime.datetime(2027, 1, 1))
    c = ctx()
    out = c.run(c.on.secret_expired(secret, revision=1), testing.State(secrets={secret}))
    assert not out.secrets


def test_trust_actions_refused_on_libvirt_and_for_bad_cert(fake, machine, lxd_setup):
    assert (
        fail_action("get-client-token", {"name": "x"}) == "get-client-token needs backend=lxd; this unit runs libvirt"
    )
    message = fail_action("add-trusted-client", {"cert": "not a cert"}, config={})
    assert message.startswith("parameter cert:") and "PEM" in message
    assert lxd_setup.trust.certs == {}


def test_space_bridges_reach_placement(fake, machine):
    results, _ = run_action(
        "compose", {"memory": "256M", "interfaces": "eth0:space=public"}, {**LIBVIRT, "space-bridges": "public=br0"}
    )
    assert json.loads(results["nics"])[0]["parent"] == "br0"
    assert isinstance(fake.vms[results["name"]].allocation.nics[0], NicAllocation)


def test_numbers_typed_on_juju_run_reach_compose_as_strings(fake, machine, monkeypatch):
    """`juju run vm-host/0 compose memory=2048 pinned_cores=3 hostname=123` without --string-args."""
    params = juju_run_params("compose", "memory=2048", "pinned_cores=3", "hostname=123", "storage=10")
    monkeypatch.setenv("SCENARIO_SKIP_CONSISTENCY_CHECKS", "1")  # ops.testing cannot express [string, integer]
    results, _ = run_action("compose", params)
    assert results["name"] == "123"
    assert results["memory"] == str(2048 * 1024**2)
    assert json.loads(results["pinned"]) == [3]
    assert json.loads(results["disks"])[0]["size"] == 10 * 10**9
    results, _ = run_action("decompose", juju_run_params("decompose", "name=123"))
    assert results == {"name": "123", "decomposed": "true"}


# --- install and set-up never raise out of a hook ------------------------------------------------


def mount_denied() -> subprocess.CalledProcessError:
    """`mount` in an unprivileged container."""
    return subprocess.CalledProcessError(32, ["mount"], "", "mount: /dev/hugepages: permission denied.\n")


@pytest.mark.parametrize("config", [LIBVIRT, {}])
def test_no_kvm_is_checked_before_anything_is_installed(fake, lxd_setup, monkeypatch, tmp_path, config):
    m = Machine(tmp_path, kvm=False, libvirt=False, lxd=False)
    m.runner.installed.clear()
    monkeypatch.setattr(charm, "make_host", m.host)
    c = ctx()
    out = c.run(c.on.install(), testing.State(config={**config, "hugepages": "2M:16"}))
    assert out.unit_status == testing.BlockedStatus(NO_KVM)
    assert (m.apt.updates, m.apt.added, m.snap.ensured, lxd_setup.applied) == (0, [], [], [])
    assert m.runner.calls == [] and m.nr("2048kB") == 0  # no package query, mount or hugepage either
    assert fail_action("refresh", config=config) == NO_KVM


def test_failed_hugetlbfs_mount_blocks_with_the_cause_and_the_fix(fake, machine):
    (machine.root / "proc/mounts").write_text("")
    machine.runner.failures["mount"] = mount_denied()
    c = ctx()
    out = c.run(c.on.install(), testing.State(config={**LIBVIRT, "hugepages": "2M:16"}))
    assert out.unit_status.name == "blocked"
    assert out.unit_status.message.startswith(
        "cannot mount hugetlbfs at /dev/hugepages (mount: /dev/hugepages: permission denied.); in a container, "
        "mount it on the host and pass it in, or make the container privileged"
    )


def test_failed_hugetlbfs_mount_without_hugepages_configured_still_serves(fake, machine):
    (machine.root / "proc/mounts").write_text("")
    machine.runner.failures["mount"] = mount_denied()
    c = ctx()
    out = c.run(c.on.install(), testing.State(config=LIBVIRT))
    assert out.unit_status.name == "active"


def install_libvirt(machine, **apt_failures) -> tuple[testing.Context, testing.State]:
    """The install hook on a machine that lacks genisoimage, with FakeApt's failure queues set as given."""
    machine.runner.installed -= {"genisoimage"}
    for queue, errors in apt_failures.items():
        setattr(machine.apt, queue, errors)
    c = ctx()
    return c, c.run(c.on.install(), testing.State(config=LIBVIRT))


def test_held_dpkg_lock_is_tried_again_in_the_hook_then_waits_for_the_next_hook(fake, machine):
    c, state = install_libvirt(machine, add_failures=[apt_lock_error()] * 3)
    assert state.unit_status == testing.WaitingStatus(
        "the dpkg lock is held by process 4242 (unattended-upgr); vm-host tries again on the next hook "
        "(wait for that apt run, e.g. unattended-upgrades, to finish)"
    )
    assert machine.waits == [5.0, 15.0]  # bounded: three attempts in all
    assert machine.apt.added == []
    state = c.run(c.on.update_status(), state)  # the lock is free now: the next hook installs
    assert machine.apt.added == [["genisoimage"]]
    assert state.unit_status.name == "active"


def test_dpkg_lock_freed_during_the_hook_installs_in_the_same_hook(fake, machine):
    _, out = install_libvirt(machine, add_failures=[apt_lock_error()])
    assert machine.waits == [5.0]
    assert machine.apt.added == [["genisoimage"]]
    assert out.unit_status.name == "active"


def test_failed_apt_update_waits_with_the_cause_and_installs_nothing(fake, machine):
    _, out = install_libvirt(machine, update_failures=[apt_update_error()] * 3)
    assert out.unit_status == testing.WaitingStatus(
        "apt update failed (E: Some index files failed to download. They have been ignored, or old ones used "
        "instead.); check the machine's network and apt proxy (juju model-config apt-http-proxy); "
        "vm-host tries again on the next hook"
    )
    assert machine.apt.added == []


def test_unreachable_snap_store_waits_and_sets_nothing_up(fake, machine, lxd_setup):
    (machine.root / "snap/bin/lxc").unlink()
    machine.snap.failures = [snap_store_error()] * 3
    c = ctx()
    out = c.run(c.on.install(), testing.State())
    assert out.unit_status.name == "waiting"
    assert out.unit_status.message.startswith(
        'the snap store is unreachable (cannot install "lxd": Post "https://api.snapcraft.io/v2/snaps/refresh"'
    )
    assert "snap-https-proxy" in out.unit_status.message
    assert lxd_setup.applied == []


def test_lxd_snap_on_a_newer_channel_is_never_moved_back(fake, machine, lxd_setup, caplog):
    machine.snap.tracking = "6/stable"
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={"lxd-snap-channel": "5.21/stable"}))
    assert machine.snap.ensured == []
    assert machine.snap.tracking == "6/stable"
    assert "the LXD snap tracks 6/stable, newer than lxd-snap-channel=5.21/stable" in caplog.text
    assert out.unit_status.name == "active"


def test_lxd_snap_on_an_older_channel_is_moved_forward(fake, machine, lxd_setup):
    machine.snap.tracking = "5.0/stable"
    c = ctx()
    c.run(c.on.config_changed(), testing.State(config={"lxd-snap-channel": "5.21/stable"}))
    assert machine.snap.ensured == [("lxd", "5.21/stable")]
    assert machine.snap.update_flags == [False]  # never a refresh on every hook


def test_an_unexpected_set_up_failure_never_escapes_the_hook(fake, machine, monkeypatch):
    def broken(self, settings):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Host, "wanted_hugepages", broken)
    c = ctx()
    out = c.run(c.on.config_changed(), testing.State(config={**LIBVIRT, "hugepages": "2M:16"}))
    assert out.unit_status == testing.BlockedStatus(
        "host set-up failed: division by zero; see juju debug-log, then run refresh"
    )


def test_hugepages_for_a_remote_libvirt_host_are_refused_not_set_here(fake, machine):
    c = ctx()
    config = {**LIBVIRT, "libvirt-uri": "qemu+ssh://virsh@far/system", "hugepages": "0:2M:256"}
    out = c.run(c.on.config_changed(), testing.State(config=config))
    assert machine.nr("2048kB") == 0  # this machine's pages are not the remote host's
    assert out.unit_status == testing.BlockedStatus(
        "hugepages cannot be set on the remote libvirt host qemu+ssh://virsh@far/system from here; "
        "reserve them on that host (sysfs or its kernel command line) and clear the hugepages option"
    )
    assert not any(call[:1] == ["mount"] for call in machine.runner.calls)


def test_every_action_runs_through_the_one_helper():
    """Issue 11 item 6: parameters, config and failures are handled in _run_action alone (no copied try/except)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(charm.__file__).read_text())
    failing = {
        fn.name
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for call in ast.walk(fn)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "fail"
    }
    assert failing == {"_run_action"}
    actions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name.startswith("_on_")]
    through = {f.name for f in actions if "_run_action" in ast.unparse(f)}
    assert len(through) == 10  # compose, decompose, list-vms, resources, start/stop-vm, refresh, prune, trust, token


def test_an_unforeseen_error_in_an_action_is_one_sentence_and_never_escapes_the_hook(fake, machine, monkeypatch):
    from vmhost.service import VmHost

    def broken(self, *args, **kwargs):
        raise RuntimeError("the unexpected\nsecond line")

    monkeypatch.setattr(VmHost, "compose", broken)
    message = fail_action("compose", {"cores": 1, "memory": "128M"})
    assert message == "compose failed: RuntimeError: the unexpected; the unit's log has the details (juju debug-log)"
    assert fake.composed == []
