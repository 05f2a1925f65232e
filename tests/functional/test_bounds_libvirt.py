"""Bounds that only the real libvirtd shows: a root disk smaller than its image is refused up front.

The issue: `root:10M` with a 64 MiB image made a 64 MiB volume while the allocation recorded 10 MiB.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmhost.model import Allocation, DiskAllocation
from vmhost.providers.base import ComposePlan, ProviderError

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
