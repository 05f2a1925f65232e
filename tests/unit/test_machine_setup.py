"""Host preparation against a temp-dir sysfs/procfs and a recording command runner."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from charm_config import parse_hugepages_setting
from tests.unit.fakes import (
    CommandRecorder,
    FakeApt,
    FakeSnap,
    apt_lock_error,
    apt_update_error,
    snap_store_error,
)
from vmhost import machine_setup
from vmhost.machine_setup import (
    GRUB_DROPIN,
    RETRY_WAITS,
    Host,
    HostSetupError,
    libvirt_packages,
    older_channel,
)
from vmhost.model import HugepageSetting

KB = {"2M": "2048kB", "1G": "1048576kB"}


GiB = 1024**3


def make_root(
    root: Path, nodes=(0,), cmdline="BOOT_IMAGE=/vmlinuz root=/dev/sda1", mounts="", node_memory=32 * GiB
) -> Path:
    for size in KB.values():
        (root / f"sys/kernel/mm/hugepages/hugepages-{size}").mkdir(parents=True)
    for n in nodes:
        (root / f"sys/devices/system/node/node{n}").mkdir(parents=True)
        (root / f"sys/devices/system/node/node{n}/meminfo").write_text(
            f"Node {n} MemTotal:       {node_memory // 1024} kB\nNode {n} MemFree:        1000 kB\n"
        )
        for size in KB.values():
            d = root / f"sys/devices/system/node/node{n}/hugepages/hugepages-{size}"
            d.mkdir(parents=True)
            (d / "nr_hugepages").write_text("0\n")
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text(cmdline + "\n")
    (root / "proc/mounts").write_text(mounts)
    (root / "proc/meminfo").write_text("MemTotal: 1000 kB\nHugepagesize:       2048 kB\n")
    return root


class CappedHost(Host):
    """A kernel that cannot give more than `cap[size]` pages per node at runtime (fragmented memory)."""

    cap: dict[str, int] = {}

    def _write_sysfs(self, path, value):
        size = "1G" if "1048576kB" in str(path) else "2M"
        path.write_text(f"{min(value, self.cap.get(size, value))}\n")


def nr(root: Path, node: int, size: str) -> int:
    return int((root / f"sys/devices/system/node/node{node}/hugepages/hugepages-{KB[size]}/nr_hugepages").read_text())


def test_runtime_hugepages_split_evenly_over_nodes(tmp_path):
    root = make_root(tmp_path, nodes=(0, 1))
    run = CommandRecorder()
    host = Host(root=root, run=run)
    report = host.apply_hugepages(parse_hugepages_setting("2M:1025"))
    assert (nr(root, 0, "2M"), nr(root, 1, "2M")) == (513, 512)
    assert not report.reboot_required
    assert report.actual[(0, "2M")] == 513
    assert not (root / GRUB_DROPIN).exists()
    assert ["update-grub"] not in run.calls


def test_per_node_hugepages_only_touch_named_nodes(tmp_path):
    root = make_root(tmp_path, nodes=(0, 1))
    Host(root=root, run=CommandRecorder()).apply_hugepages(parse_hugepages_setting("1:1G:4"))
    assert nr(root, 1, "1G") == 4
    assert nr(root, 0, "1G") == 0


def test_1g_short_at_runtime_writes_cmdline_dropin_and_needs_reboot(tmp_path):
    root = make_root(tmp_path, nodes=(0, 1))
    run = CommandRecorder()
    host = CappedHost(root=root, run=run)
    host.cap = {"1G": 2}
    report = host.apply_hugepages(parse_hugepages_setting("0:1G:8,1:1G:8,2M:64"))
    # What the kernel gave is what is reported, not what was asked.
    assert report.actual[(0, "1G")] == 2
    assert report.short == {(0, "1G"): (8, 2), (1, "1G"): (8, 2)}
    assert report.reboot_sizes == ("1G",)
    assert report.message() == "reboot required for 1G hugepages"
    text = (root / GRUB_DROPIN).read_text()
    # The default size stays the running kernel's (2M here), whatever size is short.
    assert "default_hugepagesz=2M hugepagesz=1G hugepages=0:8,1:8" in text
    assert " hugepagesz=2M" not in text  # 2M pages were given at runtime: no boot-time reservation for them
    assert ["update-grub"] in run.calls
    assert host.reboot_required()


def test_reboot_no_longer_required_once_booted_with_the_args(tmp_path):
    root = make_root(tmp_path)
    host = CappedHost(root=root, run=CommandRecorder())
    host.cap = {"1G": 0}
    host.apply_hugepages([HugepageSetting("1G", 4)])
    assert host.pending_reboot_sizes() == ["1G"]
    (root / "proc/cmdline").write_text("root=/dev/sda1 default_hugepagesz=2M hugepagesz=1G hugepages=4\n")
    assert host.pending_reboot_sizes() == []


def test_dropin_removed_when_runtime_suffices_again(tmp_path):
    root = make_root(tmp_path)
    run = CommandRecorder()
    host = CappedHost(root=root, run=run)
    host.cap = {"1G": 0}
    host.apply_hugepages([HugepageSetting("1G", 4)])
    assert (root / GRUB_DROPIN).exists()
    host.cap = {}
    report = host.apply_hugepages([HugepageSetting("1G", 4)])
    assert not (root / GRUB_DROPIN).exists()
    assert not report.reboot_required
    assert run.calls.count(["update-grub"]) == 2


def test_unknown_node_and_unsupported_size_are_refused(tmp_path):
    root = make_root(tmp_path, nodes=(0,))
    host = Host(root=root, run=CommandRecorder())
    with pytest.raises(HostSetupError, match="node 3 but this host has nodes 0"):
        host.apply_hugepages(parse_hugepages_setting("3:2M:8"))
    (root / "sys/kernel/mm/hugepages/hugepages-1048576kB").rmdir()
    with pytest.raises(HostSetupError, match="no 1G hugepages"):
        host.apply_hugepages(parse_hugepages_setting("1G:1"))
    assert nr(root, 0, "2M") == 0  # nothing half-applied by the refused settings


# --- hugepages are bounded by the machine --------------------------------------------------------


def test_absurd_hugepage_count_is_refused_naming_the_largest_and_never_reaches_sysfs(tmp_path):
    root = make_root(tmp_path, node_memory=32 * GiB)  # keeps 3.2G (10%): 28.8G of 2M pages = 14745
    run = CommandRecorder()
    host = Host(root=root, run=run)
    with pytest.raises(HostSetupError) as e:
        host.apply_hugepages(parse_hugepages_setting("2M:99999999999"))
    assert str(e.value) == (
        "hugepages 2M:99999999999 is more than this machine can hold; at most 2M:14745 "
        "(each NUMA node keeps max(2G, 10%) of its memory for the host)"
    )
    assert nr(root, 0, "2M") == 0
    host.apply_hugepages(parse_hugepages_setting("2M:14745"))  # the largest allowed is allowed
    assert nr(root, 0, "2M") == 14745
    with pytest.raises(HostSetupError, match="at most 2M:14745 "):
        host.apply_hugepages(parse_hugepages_setting("2M:14746"))


def test_1g_pages_past_the_machine_never_reach_the_grub_dropin(tmp_path):
    root = make_root(tmp_path, nodes=(0, 1), node_memory=16 * GiB)  # each node keeps 2G: 14 1G pages each
    run = CommandRecorder()
    host = CappedHost(root=root, run=run)
    host.cap = {"1G": 0}  # the kernel gives none at runtime: everything would go to GRUB
    with pytest.raises(HostSetupError, match=r"1G:100000 is more than this machine can hold; at most 1G:28 "):
        host.apply_hugepages(parse_hugepages_setting("1G:100000"))
    assert not (root / GRUB_DROPIN).exists() and ["update-grub"] not in run.calls
    with pytest.raises(HostSetupError, match=r"1:1G:15 is more than NUMA node 1 can hold; at most 1:1G:14 "):
        host.apply_hugepages(parse_hugepages_setting("1:1G:15"))
    host.apply_hugepages(parse_hugepages_setting("1G:28"))
    assert "hugepagesz=1G hugepages=0:14,1:14" in (root / GRUB_DROPIN).read_text()


def test_hugepage_bound_counts_every_size_a_node_holds(tmp_path):
    root = make_root(tmp_path, node_memory=32 * GiB)
    (root / f"sys/devices/system/node/node0/hugepages/hugepages-{KB['1G']}/nr_hugepages").write_text("20\n")
    host = Host(root=root, run=CommandRecorder())
    # 1G pages not configured keep their 20G: 8.8G is left for 2M pages (4505 of them).
    with pytest.raises(HostSetupError, match=r"at most 2M:4505 "):
        host.apply_hugepages(parse_hugepages_setting("2M:4506"))
    # Both sizes configured: the later one gets what the earlier one leaves.
    with pytest.raises(HostSetupError, match=r"at most 2M:9625 "):
        host.apply_hugepages(parse_hugepages_setting("1G:10,2M:9626"))
    assert nr(root, 0, "2M") == 0 and nr(root, 0, "1G") == 20


def test_uneven_split_largest_value_gives_the_extra_pages_to_the_roomier_lowest_nodes(tmp_path):
    root = make_root(tmp_path, nodes=(0, 1), node_memory=16 * GiB)
    (root / f"sys/devices/system/node/node1/hugepages/hugepages-{KB['1G']}/nr_hugepages").write_text("1\n")
    host = Host(root=root, run=CommandRecorder())
    # node 0 can take 7168 2M pages, node 1 7168 - 512: an even split of 2 * 6656 + 1 still fits.
    with pytest.raises(HostSetupError, match=r"at most 2M:13313 "):
        host.apply_hugepages(parse_hugepages_setting("2M:13314"))
    host.apply_hugepages(parse_hugepages_setting("2M:13313"))
    assert (nr(root, 0, "2M"), nr(root, 1, "2M")) == (6657, 6656)


def test_hugetlbfs_mounted_once_and_per_extra_size(tmp_path):
    root = make_root(tmp_path, mounts="hugetlbfs /dev/hugepages hugetlbfs rw,pagesize=2M 0 0\n")
    run = CommandRecorder()
    host = Host(root=root, run=run)
    made = host.ensure_hugetlbfs({"2M", "1G"})
    assert made == ["/dev/hugepages-1G"]
    assert run.calls == [["mount", "-t", "hugetlbfs", "-o", "pagesize=1G", "hugetlbfs", "/dev/hugepages-1G"]]
    assert (root / "dev/hugepages-1G").is_dir()

    run2 = CommandRecorder()
    bare = Host(root=make_root(tmp_path / "other"), run=run2)
    assert bare.ensure_hugetlbfs() == ["/dev/hugepages"]
    assert run2.calls == [["mount", "-t", "hugetlbfs", "hugetlbfs", "/dev/hugepages"]]


def test_kvm_detection(tmp_path):
    host = Host(root=tmp_path, run=CommandRecorder())
    assert not host.kvm_available()
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev/kvm").touch()
    assert host.kvm_available()


def test_libvirt_packages_only_missing_ones_installed(tmp_path):
    x86 = libvirt_packages("x86_64")
    assert {"qemu-system-x86", "libvirt-daemon-system", "genisoimage", "ovmf"} <= set(x86)
    assert "qemu-system-arm" in libvirt_packages("aarch64")
    apt = FakeApt()
    host = Host(root=tmp_path, run=CommandRecorder(installed=set(libvirt_packages()) - {"genisoimage"}), apt=apt)
    assert host.ensure_libvirt() == ["genisoimage"]
    assert (apt.updates, apt.added) == (1, [["genisoimage"]])

    everything = Host(root=tmp_path, run=CommandRecorder(installed=set(libvirt_packages())), apt=FakeApt())
    assert everything.ensure_libvirt() == []
    assert (everything.apt.updates, everything.apt.added) == (0, [])


def test_package_failure_is_one_clear_error_for_the_operator(tmp_path):
    from charmlibs.apt import PackageError

    apt = FakeApt()
    apt.add_failures = [PackageError("Failed to install packages: qemu-system-x86")]
    waits = []
    host = Host(root=tmp_path, run=CommandRecorder(), apt=apt, sleep=waits.append)
    with pytest.raises(HostSetupError, match=r"installing .*libvirt-daemon-system.* failed: Failed to install") as e:
        host.ensure_libvirt()
    assert not e.value.transient and waits == []  # not tried again: the operator must act
    assert str(e.value).endswith("fix apt on the machine, then run the refresh action")


@pytest.mark.parametrize("step", ["update", "install"])
def test_held_dpkg_lock_is_transient_and_tried_again_with_bounded_waits(tmp_path, step):
    apt = FakeApt()
    failures = [apt_lock_error(step)] * 5
    if step == "update":
        apt.update_failures = failures
    else:
        apt.add_failures = failures
    waits = []
    host = Host(root=tmp_path, run=CommandRecorder(), apt=apt, sleep=waits.append)
    with pytest.raises(HostSetupError, match=r"^the dpkg lock is held by process 4242 \(unattended-upgr\)") as e:
        host.ensure_libvirt()
    assert e.value.transient
    assert waits == list(RETRY_WAITS)  # three attempts, then the next hook
    assert apt.added == []


def test_a_held_dpkg_lock_that_clears_before_the_last_attempt_is_waited_out(tmp_path, caplog):
    """The retry really retries: the lock is held for every attempt but the last, and the install succeeds."""
    apt = FakeApt()
    apt.add_failures = [apt_lock_error("install")] * len(RETRY_WAITS)
    waits = []
    host = Host(root=tmp_path, run=CommandRecorder(), apt=apt, sleep=waits.append)
    with caplog.at_level("WARNING", logger="vmhost.machine_setup"):
        assert host.ensure_libvirt() == libvirt_packages()
    assert apt.added == [libvirt_packages()] and waits == list(RETRY_WAITS)
    assert [r.getMessage() for r in caplog.records] == [
        f"the dpkg lock is held by process 4242 (unattended-upgr); vm-host tries again on the next hook (wait for "
        f"that apt run, e.g. unattended-upgrades, to finish); trying again in {wait:g} s"
        for wait in RETRY_WAITS
    ]


def test_apt_update_failure_is_transient_and_names_the_cause(tmp_path):
    apt = FakeApt()
    apt.update_failures = [apt_update_error()] * 3
    host = Host(root=tmp_path, run=CommandRecorder(), apt=apt, sleep=lambda s: None)
    with pytest.raises(HostSetupError, match=r"^apt update failed \(E: Some index files failed to download") as e:
        host.ensure_libvirt()
    assert e.value.transient and "apt-http-proxy" in str(e.value)


def test_lxd_snap_installed_from_the_configured_channel_without_refreshing(tmp_path):
    snap = FakeSnap()
    assert Host(root=tmp_path, snap=snap).ensure_lxd("6/stable") is True
    assert snap.ensured == [("lxd", "6/stable")] and snap.update_flags == [False]
    assert Host(root=tmp_path, snap=snap).ensure_lxd("6/stable") is False  # already there


def test_lxd_snap_never_moves_to_an_older_channel(tmp_path):
    snap = FakeSnap(tracking="6/stable")
    assert Host(root=tmp_path, snap=snap).ensure_lxd("5.21/stable") is False
    assert snap.ensured == [] and snap.tracking == "6/stable"
    assert Host(root=tmp_path, snap=snap).ensure_lxd("latest/stable") is True
    assert snap.tracking == "latest/stable"


def test_distribution_lxd_is_used_as_it_is(tmp_path):
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/lxd").touch()
    snap = FakeSnap()
    assert Host(root=tmp_path, snap=snap).ensure_lxd("5.21/stable") is False
    assert snap.ensured == []


@pytest.mark.parametrize(
    ("wanted", "installed", "older"),
    [
        ("5.21/stable", "6/stable", True),
        ("5.0/stable", "5.21/stable", True),
        ("5.21/stable", "latest/stable", True),
        ("5.21/stable", "5.21/edge", True),  # the edge revision may be newer than stable's
        ("stable", "5.21/edge", True),  # a risk alone stays on the installed track
        ("5.21/edge", "5.21/stable", False),
        ("6/stable", "5.21/stable", False),
        ("latest/edge", "6/stable", False),
        ("5.21/stable", "5.21/stable/hotfix", False),
        ("6/stable", "custom/stable", True),  # cannot tell: never risk going back
    ],
)
def test_channel_order(wanted, installed, older):
    assert older_channel(wanted, installed) is older


def test_unreachable_snap_store_is_transient(tmp_path):
    snap = FakeSnap()
    snap.failures = [snap_store_error()] * 3
    waits = []
    with pytest.raises(HostSetupError, match=r"^the snap store is unreachable") as e:
        Host(root=tmp_path, snap=snap, sleep=waits.append).ensure_lxd("5.21/stable")
    assert e.value.transient and waits == list(RETRY_WAITS)


def test_unavailable_channel_blocks_with_the_fix(tmp_path):
    from charmlibs.snap import ChannelNotAvailableError

    snap = FakeSnap()
    snap.failures = [ChannelNotAvailableError("no snap revision on specified channel", kind="", value="lxd")]
    with pytest.raises(HostSetupError, match=r"^the LXD snap has no channel 9/stable .*set lxd-snap-channel") as e:
        Host(root=tmp_path, snap=snap, sleep=lambda s: None).ensure_lxd("9/stable")
    assert not e.value.transient


def test_hugetlbfs_mount_refused_says_why_and_what_to_do(tmp_path):
    root = make_root(tmp_path)
    run = CommandRecorder()
    run.failures["mount"] = subprocess.CalledProcessError(
        32, ["mount"], "", "mount: /dev/hugepages: permission denied."
    )
    with pytest.raises(HostSetupError) as e:
        Host(root=root, run=run).ensure_hugetlbfs()
    assert str(e.value) == (
        "cannot mount hugetlbfs at /dev/hugepages (mount: /dev/hugepages: permission denied.); in a container, "
        "mount it on the host and pass it in, or make the container privileged; elsewhere run: "
        "mount -t hugetlbfs hugetlbfs /dev/hugepages"
    )


def test_a_hung_host_command_is_a_failed_one(monkeypatch):
    monkeypatch.setattr(machine_setup, "RUN_TIMEOUT", 0.2)
    with pytest.raises(subprocess.CalledProcessError) as e:
        machine_setup._run(["sleep", "5"])
    assert "timed out" in e.value.stderr
