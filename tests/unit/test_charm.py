"""The charm through ops.testing: every event path, every action, failures included.

The hypervisor is an in-memory fake Provider (placement is real); the machine is a temp-dir root
(sysfs/procfs/dev) with a recording command runner, so host preparation runs its real code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ops import testing

import charm
from charm import NO_KVM, VmHostCharm
from tests.unit.fakes import CommandRecorder, FakeProvider
from vmhost import lxd_setup as lxd_setup_mod
from vmhost.host import GRUB_DROPIN, Host, libvirt_packages
from vmhost.lxd_setup import LxdHostState
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


class FakeApt:
    def __init__(self):
        self.added: list[list[str]] = []

    def add_package(self, names, update_cache=False):
        self.added.append(list(names))


class FakeSnap:
    def __init__(self):
        self.ensured: list[tuple] = []

    def ensure_installed(self, name, channel=None, update=True):
        self.ensured.append((name, channel))
        return True


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
        self.cap_1g = cap_1g

    def host(self) -> Host:
        cap = self.cap_1g

        class _Host(Host):
            def _write_sysfs(self, path, value):
                if cap is not None and "1048576kB" in str(path):
                    value = min(value, cap)
                path.write_text(f"{value}\n")

        return _Host(root=self.root, run=self.runner, apt=self.apt, snap=self.snap)

    def nr(self, kb: str) -> int:
        return int((self.root / f"sys/devices/system/node/node0/hugepages/hugepages-{kb}/nr_hugepages").read_text())


class FakeLxdDaemon:
    """The LXD daemon as vmhost.lxd_setup sees it: its state, and preseeds merged into it as LXD merges them.

    Only the daemon is faked: what to create is decided by the real vmhost.lxd_setup.ensure_host.
    """

    def __init__(self, state: LxdHostState | None = None):
        self.state = state or LxdHostState()  # a fresh daemon: no pool, no network, an empty default profile
        self.applied: list[dict] = []
        self.trusted: list[tuple[str, str]] = []
        self.fail_preseed: Exception | None = None

    def read_state(self, client=None) -> LxdHostState:
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

    def add_trusted_client(self, cert_pem, name, client=None) -> str:
        self.trusted.append((cert_pem, name))
        return "f00dfeed"

    def create_join_token(self, name, client=None) -> str:
        return f"token-for-{name}"


@pytest.fixture
def fake(monkeypatch) -> FakeProvider:
    provider = FakeProvider(TOPOLOGY)
    provider.uris = []

    def get_provider(name, uri=None, **options):
        provider.name = name
        provider.uris.append((name, uri))
        return provider

    monkeypatch.setattr(charm, "get_provider", get_provider)
    monkeypatch.setattr(charm.hostmod, "lxd_supports_vms", lambda client=None: True)
    return provider


@pytest.fixture
def machine(monkeypatch, tmp_path) -> Machine:
    m = Machine(tmp_path)
    monkeypatch.setattr(charm, "make_host", m.host)
    return m


@pytest.fixture
def lxd_setup(monkeypatch) -> FakeLxdDaemon:
    daemon = FakeLxdDaemon()
    for name in ("read_state", "apply_preseed", "add_trusted_client", "create_join_token"):
        monkeypatch.setattr(lxd_setup_mod, name, getattr(daemon, name))
    return daemon


LIBVIRT = {"backend": "libvirt"}


def ctx() -> testing.Context:
    return testing.Context(VmHostCharm)


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
    monkeypatch.setattr(charm.hostmod, "lxd_supports_vms", lambda client=None: False)
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
    assert fake.vms["web-1"].allocation.pool == "tenant-a"


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


def test_trust_actions_for_lxd(fake, machine, lxd_setup):
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    results, _ = run_action("add-trusted-client", {"cert": pem, "name": "maas"}, config={})
    assert results == {"name": "maas", "fingerprint": "f00dfeed"}
    assert lxd_setup.trusted == [(pem, "maas")]
    results, _ = run_action("get-client-token", {"name": "laptop"}, config={})
    assert results == {"name": "laptop", "token": "token-for-laptop"}


def test_trust_actions_refused_on_libvirt_and_for_bad_cert(fake, machine, lxd_setup):
    assert (
        fail_action("get-client-token", {"name": "x"}) == "get-client-token needs backend=lxd; this unit runs libvirt"
    )
    message = fail_action("add-trusted-client", {"cert": "not a cert"}, config={})
    assert message.startswith("parameter cert:") and "PEM" in message
    assert lxd_setup.trusted == []


def test_space_bridges_reach_placement(fake, machine):
    results, _ = run_action(
        "compose", {"memory": "256M", "interfaces": "eth0:space=public"}, {**LIBVIRT, "space-bridges": "public=br0"}
    )
    assert json.loads(results["nics"])[0]["parent"] == "br0"
    assert isinstance(fake.vms[results["name"]].allocation.nics[0], NicAllocation)
