"""The libvirt provider's checks that run before it touches libvirt: where an image comes from, what a
VM may be called, and the volume XML. No daemon: every refusal here must happen before a connection."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest
from ops import testing

import charm
from tests.unit.fakes import FakeProvider
from tests.unit.juju_cli import charm_context
from vmhost.model import Allocation, ComposePlan, DiskAllocation
from vmhost.parse import ParseError, parse_vm_name
from vmhost.providers.base import ProviderError
from vmhost.providers.libvirt import DEFAULT_IMAGE_DIR, LibvirtProvider, _volume_xml, resolve_image
from vmhost.providers.lxd import LxdProvider
from vmhost.simplestreams import DEFAULT_IMAGE_SERVER

M = 1024**2


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for name in ("noble.qcow2", "jammy.img", "focal.raw", "exact", "both", "both.qcow2"):
        (d / name).write_bytes(b"image")
    (d / "adir.qcow2").mkdir()
    return d


@pytest.mark.parametrize(
    "name, file",
    [
        ("noble", "noble.qcow2"),
        ("jammy", "jammy.img"),
        ("focal", "focal.raw"),
        ("exact", "exact"),
        ("noble.qcow2", "noble.qcow2"),
        ("both", "both"),  # the name as given wins over a suffixed file
    ],
)
def test_a_bare_name_resolves_in_the_image_directory(images, name, file):
    assert resolve_image(name, images) == str(images / file)


def test_an_absolute_path_is_the_operators_file(images, tmp_path):
    img = tmp_path / "elsewhere.qcow2"
    img.write_bytes(b"image")
    assert resolve_image(str(img), images) == str(img)
    with pytest.raises(ProviderError, match="not a readable file"):
        resolve_image(str(tmp_path / "missing.qcow2"), images)


@pytest.mark.parametrize("image", ["metadata.yaml", "charm.py", "adir", "missing"])
def test_a_name_not_in_the_image_directory_is_refused_even_if_it_exists_elsewhere(images, image, tmp_path, monkeypatch):
    # The reviewer's case: a remote "alias" naming a file in the hook's working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / image).write_text("not an image")
    with pytest.raises(ProviderError, match=re.escape(f"no image named '{image}' in {images}")):
        resolve_image(image, images)


@pytest.mark.parametrize("image", ["../images/noble.qcow2", "images/noble.qcow2", "..", "noble..qcow2", ""])
def test_relative_paths_and_dot_dot_are_refused(images, image, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../images/noble.qcow2 and images/noble.qcow2 exist relative to here
    with pytest.raises(ProviderError, match="neither an absolute path nor the name of an image"):
        resolve_image(image, images)


class _Unconnectable(LibvirtProvider):
    """A provider that fails the moment it would talk to libvirt: a refusal must come before that."""

    @property
    def conn(self):
        raise ProviderError(WOULD_CONNECT)


WOULD_CONNECT = "test: the provider went on to libvirt"


def _unconnectable(**kw) -> LibvirtProvider:
    return _Unconnectable(**kw)


def test_compose_refuses_a_bad_image_before_connecting(images):
    p = _unconnectable(image_dir=str(images))
    alloc = Allocation(name="vm-1", vcpus=1, memory=64 * M, disks=(DiskAllocation("root", 16 * M, "default"),))
    with pytest.raises(ProviderError, match=re.escape("no image named 'metadata.yaml'")):
        p.compose(ComposePlan(alloc, boot="image", image="metadata.yaml"))
    # a name that is there gets past the image check, as far as libvirt
    with pytest.raises(ProviderError, match=WOULD_CONNECT):
        p.compose(ComposePlan(alloc, boot="image", image="noble"))


def test_the_image_directory_defaults_and_is_an_option(images):
    assert LibvirtProvider().image_dir == DEFAULT_IMAGE_DIR == "/var/lib/vmhost/images"
    assert LibvirtProvider(image_dir=str(images)).image_dir == str(images)


@pytest.mark.parametrize(
    "name", ["Web", "web_1", "-web", "web-", "web.example", "a" * 64, "web 1", "vm/../x", "", "vm-<x>", "vm-ünï"]
)
@pytest.mark.parametrize("provider", ["libvirt", "lxd"])
def test_compose_refuses_a_vm_name_outside_the_one_rule_before_connecting(name, provider):
    """Both providers apply parse_vm_name (a trailing '-' included, where libvirt once let it through)."""
    p = _unconnectable() if provider == "libvirt" else LxdProvider(uri="/nonexistent/unix.socket")
    with pytest.raises(
        ProviderError, match=r"is not allowed: .* use lower-case letters, digits and '-' \(at most 63\)"
    ):
        p.compose(ComposePlan(Allocation(name=name, vcpus=1, memory=64 * M)))
    with pytest.raises(ParseError):
        parse_vm_name(name)


@pytest.mark.parametrize("name", ["a", "vm-1a2b3c4d", "0web", "a" * 63])
def test_allowed_vm_names_pass_the_name_check(name):
    with pytest.raises(ProviderError, match=WOULD_CONNECT):
        _unconnectable().compose(ComposePlan(Allocation(name=name, vcpus=1, memory=64 * M)))


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_volume_xml_is_well_formed_and_carries_name_capacity_and_format(fmt):
    vol = ET.fromstring(_volume_xml("vmhost-vm-1-root", 16 * M, fmt))
    assert vol.tag == "volume"
    assert vol.findtext("name") == "vmhost-vm-1-root"
    assert vol.find("capacity").get("unit") == "bytes" and int(vol.findtext("capacity")) == 16 * M
    assert vol.find("target/format").get("type") == fmt


def test_volume_xml_escapes_what_a_name_carries():
    hostile = "x</name><target><path>/etc/shadow</path></target><name>y"
    vol = ET.fromstring(_volume_xml(hostile, M, "raw"))
    assert vol.findtext("name") == hostile
    assert vol.find("target/path") is None and len(vol.findall("name")) == 1


def test_charm_passes_its_image_directory_to_the_libvirt_provider(monkeypatch):
    made: list[tuple[str, str | None, dict]] = []

    def make_provider(settings):
        made.append((settings.backend, settings.uri, {**settings.options, "timeout": settings.timeout}))
        return FakeProvider()

    monkeypatch.setattr(charm, "make_provider", make_provider)
    ctx = charm_context()
    config = {"backend": "libvirt", "libvirt-image-dir": "/srv/images"}
    ctx.run(ctx.on.action("list-vms"), testing.State(config=config))
    assert made and all(
        m
        == (
            "libvirt",
            "qemu:///system",
            {"image_dir": "/srv/images", "image_server": DEFAULT_IMAGE_SERVER, "timeout": 30.0},
        )
        for m in made
    )
    made.clear()
    ctx.run(ctx.on.action("list-vms"), testing.State(config={"backend": "libvirt"}))
    assert made[0][2] == {"image_dir": DEFAULT_IMAGE_DIR, "image_server": DEFAULT_IMAGE_SERVER, "timeout": 30.0}


class _Dom:
    """A domain as listAllDomains hands it out: every read returns its XML as a fresh string."""

    def __init__(self, xml: str):
        self.xml = xml

    def XMLDesc(self, flags: int) -> str:
        return "".join(self.xml)

    def state(self):
        return (1, 0)

    def name(self) -> str:
        return "vm-1"


def test_an_unchanged_domain_is_not_parsed_again(monkeypatch):
    from vmhost.providers import libvirt as lv
    from vmhost.providers.libvirt_xml import domain_xml

    a = Allocation(name="vm-1", vcpus=2, memory=512 * M, disks=(DiskAllocation("root", 10**9, "default"),))
    dom = _Dom(domain_xml(ComposePlan(a)))
    p = LibvirtProvider("qemu:///system")
    parsed: list[str] = []
    real = lv.read_record
    monkeypatch.setattr(lv, "read_record", lambda xml: parsed.append("x") or real(xml))
    first = p._info(dom, (0,))
    again = p._info(dom, (0,))
    assert again.allocation is first.allocation and first.allocation == a and first.managed
    assert parsed == ["x"]
    dom.xml = domain_xml(ComposePlan(replace(a, vcpus=3)))
    assert p._info(dom, (0,)).allocation.vcpus == 3 and parsed == ["x", "x"]
