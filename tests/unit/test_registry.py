"""The provider registry: one source (entry points), the built-in table only when vm-host is unpackaged,
and one factory that refuses options a provider does not take."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint, PackageNotFoundError
from pathlib import Path

import pytest
import tenacity

from tests.unit.fakes import FakeProvider
from vmhost.providers import registry
from vmhost.providers.base import ProviderError
from vmhost.providers.libvirt import LibvirtProvider
from vmhost.providers.lxd import LxdProvider
from vmhost.providers.registry import BUILTIN_PROVIDERS, ProviderSettings, make_provider, own_providers

ROOT = Path(__file__).resolve().parents[2]


def test_the_builtin_table_is_pyprojects_entry_points():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][registry.ENTRY_POINT_GROUP] == BUILTIN_PROVIDERS


def test_installed_the_builtins_come_from_the_distributions_entry_points(monkeypatch):
    class Dist:
        entry_points = (
            EntryPoint("libvirt", "tests.unit.fakes:FakeProvider", registry.ENTRY_POINT_GROUP),
            EntryPoint("console", "vmhost.cli:main", "console_scripts"),
        )

    monkeypatch.setattr(registry, "distribution", lambda name: Dist())
    assert own_providers() == {"libvirt": "tests.unit.fakes:FakeProvider"}  # not the table
    assert isinstance(make_provider(ProviderSettings("libvirt")), FakeProvider)


def test_unpackaged_the_table_stands_in(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(registry, "distribution", missing)
    assert own_providers() == BUILTIN_PROVIDERS
    assert isinstance(make_provider(ProviderSettings("libvirt")), LibvirtProvider)


def test_unpackaged_for_real_in_a_python_without_vm_host(tmp_path):
    """As in the packed charm's venv (uv --no-install-project): vmhost on sys.path, its dependencies
    installed, no vm-host dist-info. The venv's site-packages is mirrored without vm-host's own entries."""
    site = tmp_path / "site-packages"
    site.mkdir()
    real = Path(tenacity.__file__).resolve().parents[1]
    for entry in real.iterdir():
        if not entry.name.lower().startswith(("vm_host", "vm-host", "__editable__")) and entry.suffix != ".pth":
            (site / entry.name).symlink_to(entry)
    code = (
        "import sys; sys.path[:0] = sys.argv[1:];"
        "from vmhost.providers.registry import own_providers;"
        "print(sorted(own_providers().items()))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code, str(ROOT / "src"), str(site)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sorted(BUILTIN_PROVIDERS.items()))


def test_a_third_party_plugin_is_found_through_its_entry_point(monkeypatch):
    ep = EntryPoint("incus", "tests.unit.fakes:FakeProvider", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda group: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    assert registry.available_providers()["incus"] == ep.value
    made = make_provider(ProviderSettings("incus", uri="x://y", options={"topology": None}))
    assert isinstance(made, FakeProvider) and made.uri == "x://y"


def test_an_unknown_backend_names_what_is_installed():
    with pytest.raises(ProviderError, match=r"backend 'xen' is not available; installed: .*libvirt, lxd"):
        make_provider(ProviderSettings("xen"))


@pytest.mark.parametrize(
    ("backend", "options", "takes"),
    [
        ("libvirt", {"imagedir": "/srv"}, "domain_type, image_dir, image_server, image_server_cert"),
        ("lxd", {"image_dir": "/srv"}, "cert, image_server, image_server_cert, profile, project, verify"),
    ],
)
def test_an_option_the_provider_does_not_take_is_refused(backend, options, takes):
    with pytest.raises(ProviderError) as e:
        make_provider(ProviderSettings(backend, options=options))
    assert str(e.value) == f"backend {backend!r} has no option {next(iter(options))!r}; it takes: {takes}"


def test_known_options_reach_the_provider():
    p = make_provider(ProviderSettings("libvirt", "qemu:///session", 7.0, {"image_dir": "/srv/images"}))
    assert isinstance(p, LibvirtProvider) and (p.uri, p.timeout, p.image_dir) == ("qemu:///session", 7.0, "/srv/images")
    lxd = make_provider(ProviderSettings("lxd", options={"project": "other"}))
    assert isinstance(lxd, LxdProvider) and lxd.project == "other"
