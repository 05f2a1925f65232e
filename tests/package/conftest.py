"""The package tier: checks on the packed artefact that `make charm` built ($CHARM_PATH).

Skipped, with the reason, when there is no artefact; CI builds one and turns such a skip into a
failure (VMHOST_REQUIRE_TIERS in .ci/run, tests/conftest.py).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

NO_CHARM = "no packed charm: run `make charm` (make test does), or set CHARM_PATH to a vm-host_*.charm"


@pytest.fixture(scope="session")
def charm_path() -> Path:
    path = Path(os.environ.get("CHARM_PATH") or "vm-host_amd64.charm")
    if not path.is_file():
        pytest.skip(f"{NO_CHARM} ({path} does not exist)")
    return path.resolve()


@pytest.fixture(scope="session")
def unpacked(charm_path, tmp_path_factory) -> Path:
    """The artefact unzipped as Juju unpacks it, keeping each file's mode."""
    root = tmp_path_factory.mktemp("charm")
    with zipfile.ZipFile(charm_path) as z:
        for info in z.infolist():
            z.extract(info, root)
            mode = info.external_attr >> 16
            if mode:
                (root / info.filename).chmod(mode & 0o7777)
    return root
