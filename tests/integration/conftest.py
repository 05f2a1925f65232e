"""Integration tier: a real Juju controller and machine (pytest-operator).

Skipped, with the reason printed in the header and the -ra summary, where no `juju` binary is on
PATH (these machines have no controller and `charmcraft pack` refuses Debian).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).parent
NO_JUJU = "no `juju` binary on PATH: the integration tests need a Juju controller (see README, Deploying with Juju)"


def pytest_report_header(config) -> str | None:
    if shutil.which("juju") is None:
        return f"tests/integration: skipped - {NO_JUJU}"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    if shutil.which("juju") is not None:
        return
    skip = pytest.mark.skip(reason=NO_JUJU)
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kvm_placement() -> dict:
    """Where the vm-host unit goes: a machine with /dev/kvm.

    VMHOST_TEST_TO names a machine already in the model (`juju add-machine` of a bare-metal or
    nested-virtualisation host, or a MAAS machine), passed as `--to`. Otherwise the unit asks for a
    virtual machine (`virt-type=virtual-machine`): on LXD clouds that is a VM whose /dev/kvm works
    when the host allows nested virtualisation.
    """
    if os.environ.get("VMHOST_TEST_TO"):
        return {"to": os.environ["VMHOST_TEST_TO"]}
    return {"constraints": {"virt-type": "virtual-machine"}}


@pytest.fixture(scope="module")
def charm() -> Path:
    """The artefact `make charm` built ($CHARM_PATH, else ./vm-host_amd64.charm): never a fresh pack,
    so the integration tier deploys exactly what the package tier checked."""
    path = Path(os.environ.get("CHARM_PATH") or "vm-host_amd64.charm")
    if not path.is_file():
        pytest.fail(f"no packed charm at {path}: run `make charm` first, or set CHARM_PATH")
    return path.resolve()
