"""Bounds that only the real libvirtd shows: a root disk smaller than its image is refused up front, and
`vmhost stop` says when a guest is still running instead of returning 0.

The issue: `root:10M` with a 64 MiB image made a 64 MiB volume while the allocation recorded 10 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from vmhost.model import Allocation, ComposePlan, DiskAllocation
from vmhost.providers.base import ProviderError

M = 1024**2


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils package) is not installed")
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_root_smaller_than_its_image_is_refused_and_nothing_is_made(
    libvirt_provider, libvirt_conn, vm_names, tmp_path, fmt
):
    image = tmp_path / f"big.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "100M"], check=True)
    name = vm_names("root")
    alloc = Allocation(name=name, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", 64 * M, "default"),))
    domains = {d.name() for d in libvirt_conn.listAllDomains()}
    with pytest.raises(ProviderError) as e:
        libvirt_provider.compose(ComposePlan(alloc, boot="image", image=str(image)))
    assert str(e.value) == f"disk root is 64M but image {image} needs 100M; give root:100M or more"
    assert {d.name() for d in libvirt_conn.listAllDomains()} == domains
    pool = libvirt_conn.storagePoolLookupByName("default")
    pool.refresh(0)
    assert not [v for v in pool.listAllVolumes(0) if name in v.name()]
    # As large as the image: made, and the volume is the size the allocation records.
    ok = Allocation(name=name, vcpus=1, memory=64 * M, disks=(DiskAllocation("root", 100 * M, "default"),))
    vm = libvirt_provider.compose(ComposePlan(ok, boot="image", image=str(image)))
    assert vm.allocation.disks[0].size == 100 * M
    libvirt_provider.decompose(name)


def test_cli_stop_of_a_guest_that_ignores_shutdown_fails_saying_so(libvirt_uri, vm_names, libvirt_conn, tmp_path):
    """A network-boot VM with nothing to boot has no OS to act on the shutdown request."""
    name = vm_names("stop")
    env = {**os.environ, "VMHOST_LOCK_FILE": str(tmp_path / "lock")}

    def vmhost(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "vmhost.cli", *args, "--backend", "libvirt", "--uri", libvirt_uri]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    made = vmhost("compose", "--cores", "1", "--memory", "64M", "--hostname", name, "--start")
    assert made.returncode == 0, made.stderr
    stopped = vmhost("stop", name, "--wait", "2")
    assert stopped.returncode == 1
    assert stopped.stderr.strip() == (
        f"vmhost: error: VM '{name}' is still running 2s after it was asked to stop; "
        "wait longer, or stop it with force (power off)"
    )
    assert libvirt_conn.lookupByName(name).isActive()
    forced = vmhost("stop", name, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout) == {"name": name, "state": "stopped"}
