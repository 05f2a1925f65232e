"""uv.lock is the one pinned set of runtime versions: the packed charm, `make test` and CI install it.

The charm is built by charmcraft's uv plugin (`uv sync --frozen --extra charm`), the development venv
by `uv sync --frozen --extra charm --group dev` (Makefile). These tests fail when the venv running
them has drifted from the lock, or the charm's build no longer installs from it.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.markers import Marker
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def lock_packages() -> dict[str, dict]:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return {canonicalize_name(p["name"]): p for p in lock["package"]}


def runtime_closure(packages: dict[str, dict]) -> dict[str, str]:
    """name -> locked version for everything `vm-host[charm]` needs on this Python."""
    root = packages["vm-host"]
    todo = [*root.get("dependencies", []), *root.get("optional-dependencies", {}).get("charm", [])]
    found: dict[str, str] = {}
    while todo:
        dep = todo.pop()
        if "marker" in dep and not Marker(dep["marker"]).evaluate():
            continue
        name = canonicalize_name(dep["name"])
        if name in found:
            continue
        pkg = packages[name]
        found[name] = pkg["version"]
        todo.extend(pkg.get("dependencies", []))
    return found


def test_the_venv_running_the_tests_has_exactly_the_locked_runtime():
    closure = runtime_closure(lock_packages())
    assert {"ops", "pydantic", "pylxd", "libvirt-python", "tenacity", "pyyaml", "cryptography"} <= set(closure)
    drift = {}
    for name, locked in closure.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != locked:
            drift[name] = (locked, installed)
    assert not drift, f"venv differs from uv.lock (locked, installed): {drift}; run `make venv`"


def test_the_charm_is_built_from_the_lock_with_the_charm_extra():
    part = yaml.safe_load((REPO / "charmcraft.yaml").read_text())["parts"]["charm"]
    assert part["plugin"] == "uv" and part["uv-extras"] == ["charm"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "charm" in project["optional-dependencies"]
    assert not (REPO / "requirements.txt").exists(), "a second list of versions would drift from uv.lock"
