"""A real SR-IOV NIC (QEMU's igb, 7 VFs, behind a PCIe expander on node 1) in a nested 2-node host.

VFs are enabled inside the guest as an operator would (sriov_numvfs); vm-host only hands them out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from tests.numa.inside import SMALL_ROOT, probe, vmhost

MAX_VFS = 7
# Seven floating 1-vCPU VMs on 4 threads: overcommit, so the VFs, not the CPUs, are what runs out.
FLOATING = ("--cpu-overcommit-ratio", "4")
SRIOV = "eth0:type=sriov"


@pytest.fixture
def pf(guest_igb) -> str:
    """The igb PF's interface name, with all its VFs enabled."""
    (pci,) = guest_igb.ssh("ls /sys/bus/pci/drivers/igb | grep '^0000:'").split()
    (name,) = guest_igb.ssh(f"ls /sys/bus/pci/devices/{pci}/net").split()
    dev = f"/sys/class/net/{name}/device"
    assert guest_igb.ssh(f"cat {dev}/sriov_totalvfs").strip() == str(MAX_VFS)
    assert guest_igb.ssh(f"cat {dev}/numa_node").strip() == "1"
    if guest_igb.ssh(f"cat {dev}/sriov_numvfs").strip() != str(MAX_VFS):
        # As an operator would: the PF up (libvirt will not configure a VF of a PF that is down), VFs on.
        guest_igb.ssh(f"ip link set {name} up && echo {MAX_VFS} > {dev}/sriov_numvfs")
        guest_igb.ssh(
            f"for i in $(seq 60); do [ $(ls -d {dev}/virtfn*/net/* | wc -l) = {MAX_VFS} ] && break; sleep 1; done"
        )
    return name


def _vfs(guest, pf: str) -> dict:
    rc, res, err = vmhost(guest, "resources")
    assert rc == 0, err
    (nic,) = [n for n in res["nics"] if n["name"] == pf]
    return nic


def test_remote_discovery_sees_the_pf_on_node_1_and_its_vfs(guest_igb, pf):
    rc, res, err = vmhost(guest_igb, "resources")
    assert rc == 0, err
    nic = _vfs(guest_igb, pf)
    assert (nic["numa_node"], nic["sriov_max_vfs"], nic["vfs_used"]) == (1, MAX_VFS, 0)
    vf_names = set(guest_igb.ssh(f"ls /sys/class/net/{pf}/device/virtfn*/net").split())
    assert vf_names and not vf_names & {n["name"] for n in res["nics"]}  # VFs are capacity, not NICs


def test_sriov_vm_pinned_on_node_1_gets_a_node_1_vf_and_gives_it_back(guest_igb, pf, vm_names):
    before = probe(guest_igb).free
    name = vm_names()
    rc, vm, err = vmhost(
        guest_igb,
        "compose",
        "--hostname",
        name,
        "--start",
        "--cores",
        "1",
        "--memory",
        "64M",
        "--pinned-cores",
        "auto",
        "--hugepages-backed",
        "--interfaces",
        "eth0:type=sriov",
        "--storage",
        SMALL_ROOT,
    )
    assert rc == 0, err
    assert vm["numa_nodes"] == [1]  # the NIC's node: rule 4 counts the SR-IOV NIC
    inside = probe(guest_igb, name)
    assert inside.huge == {1: 32} and inside.thread_mems() == {1}
    addr = ET.fromstring(inside.xml).find("devices/interface[@type='hostdev']/source/address")
    pci = f"{int(addr.get('domain'), 16):04x}:{int(addr.get('bus'), 16):02x}:{int(addr.get('slot'), 16):02x}.{int(addr.get('function'), 16)}"
    dev = f"/sys/bus/pci/devices/{pci}"
    assert guest_igb.ssh(f"cat {dev}/numa_node").strip() == "1"
    assert (
        guest_igb.ssh(f"readlink -f {dev}/physfn")
        .strip()
        .endswith(guest_igb.ssh(f"readlink -f /sys/class/net/{pf}/device").strip().rsplit("/", 1)[1])
    )
    assert guest_igb.ssh(f"basename $(readlink {dev}/driver)").strip() == "vfio-pci"  # really handed to QEMU
    assert _vfs(guest_igb, pf)["vfs_used"] == 1
    rc, _, err = vmhost(guest_igb, "decompose", name)
    assert rc == 0, err
    assert _vfs(guest_igb, pf)["vfs_used"] == 0
    assert probe(guest_igb).free == before


def test_vfs_are_never_handed_out_past_the_nics_maximum(guest_igb, pf, vm_names):
    from vmhost.model import Policy, VmRequest
    from vmhost.providers.libvirt import LibvirtProvider
    from vmhost.service import VmHost

    names = [vm_names() for _ in range(MAX_VFS)]
    # The first six through one connection (the same service the CLI runs, without six ssh set-ups),
    # the last VF and the refusal through the CLI.
    host = VmHost(LibvirtProvider(uri=guest_igb.uri), Policy(cpu_overcommit_ratio=4))
    try:
        for name in names[:-1]:
            host.compose(
                VmRequest.from_dict(
                    {"cores": 1, "memory": "64M", "interfaces": SRIOV, "name": name, "storage": SMALL_ROOT}
                )
            )
        args = ("--cores", "1", "--memory", "64M", "--interfaces", SRIOV, "--storage", SMALL_ROOT, *FLOATING)
        rc, _, err = vmhost(guest_igb, "compose", "--hostname", names[-1], *args)
        assert rc == 0, f"VF {MAX_VFS} of {MAX_VFS}: {err}"
        assert _vfs(guest_igb, pf)["vfs_used"] == MAX_VFS
        addresses = set(
            guest_igb.ssh(
                "for d in " + " ".join(names) + "; do virsh dumpxml $d | grep -A1 '<source>' | grep address; done"
            ).splitlines()
        )
        assert len(addresses) == MAX_VFS  # seven distinct VFs, none given twice

        domains = guest_igb.ssh("virsh list --all --name").split()
        volumes = guest_igb.ssh("virsh vol-list default --details").strip()
        rc, _, err = vmhost(guest_igb, "compose", "--hostname", vm_names(), *args)
        assert rc == 1
        assert f"all VFs are in use ({pf} {MAX_VFS}/{MAX_VFS})" in err, err
        assert guest_igb.ssh("virsh list --all --name").split() == domains  # nothing was created
        assert guest_igb.ssh("virsh vol-list default --details").strip() == volumes
        for name in names:
            host.decompose(name)
        assert _vfs(guest_igb, pf)["vfs_used"] == 0
    finally:
        host.provider.close()
