"""Images by name on the REAL test LXD daemon: LXD pulls a VM image (lxd.tar.xz + disk-kvm.img) from a local
simplestreams index served over https on 127.0.0.1 (LXD pulls over https only; the index's self-signed
certificate is handed to LXD in the pull source). VMs cannot start here, but they are created from it.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tarfile
import time

import pytest
import yaml

from tests.functional.simplestreams_index import ImageIndex, Product
from tests.functional.test_lxd import lxc, lxc_json, lxd_daemon, project  # noqa: F401 (fixtures)
from vmhost.model import Allocation, CloudInit, ComposePlan
from vmhost.providers import lxd_config as cfg
from vmhost.providers.base import ProviderError

pytestmark = [
    pytest.mark.lxd,
    pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils package) is not installed"),
]
M = 1024**2


@pytest.fixture
def vm_image(tmp_path):
    """An LXD VM image: metadata tarball and a small qcow2 disk."""
    meta = tmp_path / "metadata.yaml"
    meta.write_text(
        yaml.safe_dump(
            {
                "architecture": "x86_64",
                "creation_date": int(time.time()),
                "properties": {"os": "ubuntu", "release": "noble", "description": "vm-host test image"},
            }
        )
    )
    tarball = tmp_path / "lxd.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(meta, arcname="metadata.yaml")
    disk = tmp_path / "disk-kvm.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    return {"lxd.tar.xz": tarball, "disk-kvm.img": disk}


def _delete_image(fingerprint: str) -> None:
    for proj in ("default",):
        lxc("image", "delete", fingerprint, "--project", proj, check=False)


def test_lxd_pulls_a_stream_image_by_name_and_keeps_the_seed(project, vm_image, tmp_path):  # noqa: F811
    from vmhost.providers.lxd import LxdProvider

    noble = Product("ubuntu", "noble", "24.04", vm_image, aliases=("24.04", "noble"))
    with ImageIndex(tmp_path / "index", [noble], tls=True) as index:
        fingerprint = index.item(noble, "lxd.tar.xz")["combined_disk-kvm-img_sha256"]
        _delete_image(fingerprint)  # a cache left by an earlier run would hide the pull
        p = LxdProvider(project=project, image_server=index.url, image_server_cert=str(index.cert))
        names = [f"img-{i}-{time.monotonic_ns() % 10**8}" for i in range(2)]
        try:
            times = []
            for name, image in zip(names, ("ubuntu:noble", "ubuntu:24.04"), strict=True):
                alloc = Allocation(name=name, vcpus=1, memory=256 * M)
                t0 = time.monotonic()
                p.compose(ComposePlan(alloc, boot="image", image=image, cloud_init=CloudInit(hostname=name)))
                times.append(time.monotonic() - t0)
            print(f"\nLXD compose from a new image: {times[0]:.2f} s; from the same image again: {times[1]:.2f} s")
            assert index.downloads("disk-kvm.img") == 1 and index.downloads("lxd.tar.xz") == 1
            for name in names:
                inst = lxc_json(f"/1.0/instances/{name}?project={project}")
                config = inst["config"]
                assert config["volatile.base_image"] == fingerprint
                assert config["image.os"] == "ubuntu" and config["image.release"] == "noble"
                assert config[cfg.STATE_KEY] == "ready" and cfg.owned(config)
                seed = config.get("cloud-init.user-data") or config.get("user.user-data")
                meta = config.get("cloud-init.meta-data") or config.get("user.meta-data") or ""
                assert seed and (f"hostname: {name}" in seed or f"local-hostname: {name}" in meta)
            image = lxc_json(f"/1.0/images/{fingerprint}")
            assert image["type"] == "virtual-machine" and image["properties"]["os"] == "ubuntu"
        finally:
            for name in names:
                with contextlib.suppress(ProviderError):
                    p.decompose(name)
            p.close()
            _delete_image(fingerprint)


def test_lxd_refuses_unknown_names_and_plain_http_before_creating_anything(project, vm_image, tmp_path):  # noqa: F811
    from vmhost.providers.lxd import LxdProvider

    noble = Product("ubuntu", "noble", "24.04", vm_image)
    alloc = Allocation(name=f"img-x-{time.monotonic_ns() % 10**8}", vcpus=1, memory=256 * M)
    with ImageIndex(tmp_path / "tls", [noble], tls=True) as index:
        p = LxdProvider(project=project, image_server=index.url, image_server_cert=str(index.cert))
        with pytest.raises(ProviderError, match="has no LXD VM image named 'ubuntu:jammy'"):
            p.compose(ComposePlan(alloc, boot="image", image="ubuntu:jammy"))
        p.close()
    with ImageIndex(tmp_path / "plain", [noble]) as index:
        p = LxdProvider(project=project, image_server=index.url)
        with pytest.raises(ProviderError, match="LXD pulls images over https only"):
            p.compose(ComposePlan(alloc, boot="image", image="ubuntu:noble"))
        p.close()
    assert lxc("info", alloc.name, "--project", project, check=False).returncode != 0
