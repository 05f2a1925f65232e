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


@pytest.fixture(scope="module")
async def charm(ops_test) -> Path:
    """The packed charm: $CHARM_PATH, else the one ./vm-host_*.charm, else `charmcraft pack` now."""
    if os.environ.get("CHARM_PATH"):
        path = Path(os.environ["CHARM_PATH"])
        if not path.exists():
            raise FileNotFoundError(f"CHARM_PATH {path} does not exist")
        return path.resolve()
    packed = sorted(Path(".").glob("vm-host_*.charm"))
    if len(packed) > 1:
        raise ValueError(f"more than one packed charm here: {', '.join(map(str, packed))}; set CHARM_PATH")
    if packed:
        return packed[0].resolve()
    return await ops_test.build_charm(".")
