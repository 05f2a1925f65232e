"""Fixtures for the functional tier on the REAL libvirtd (no mocks).

Tests skip, with the reason printed, only when libvirtd or /dev/kvm is not usable; CI turns such a
skip into a failure where /dev/kvm works (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest

LIBVIRT_URI = os.environ.get("VMHOST_TEST_LIBVIRT_URI", "qemu:///system")


@pytest.fixture(scope="session")
def libvirt_uri() -> str:
    """The libvirt URI the functional tests drive, once it is known to answer and /dev/kvm is usable."""
    libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this machine (enable virtualisation, or run as a user in group kvm)")
    try:
        conn = libvirt.open(LIBVIRT_URI)
    except libvirt.libvirtError as e:
        pytest.skip(f"libvirtd is not reachable at {LIBVIRT_URI}: {e}")
    conn.close()
    return LIBVIRT_URI


@pytest.fixture
def libvirt_conn(libvirt_uri):
    """A raw libvirt connection, for looking at what the provider did from the outside."""
    import libvirt

    conn = libvirt.open(libvirt_uri)
    yield conn
    conn.close()


@pytest.fixture
def libvirt_provider(libvirt_uri):
    from vmhost.providers.libvirt import LibvirtProvider

    provider = LibvirtProvider(uri=libvirt_uri)
    yield provider
    provider.close()


@pytest.fixture
def host(libvirt_uri, tmp_path):
    """A VmHost on the real libvirtd (default policy, a per-test lock file) and a list of VM names to decompose."""
    from vmhost.model import Policy
    from vmhost.providers.registry import ProviderSettings, make_provider
    from vmhost.service import VmHost

    vmhost = VmHost(
        make_provider(ProviderSettings("libvirt", uri=libvirt_uri)), Policy(), lock_path=str(tmp_path / "lock")
    )
    made: list[str] = []
    yield vmhost, made
    for name in made:
        with contextlib.suppress(Exception):
            vmhost.decompose(name)
    vmhost.provider.close()


@pytest.fixture
def vm_names(libvirt_conn) -> Iterator[list[str]]:
    """Hands out per-test unique VM names and removes whatever carries them afterwards, pass or fail."""
    names: list[str] = []

    def new(prefix: str = "ft") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield new  # type: ignore[misc]
    _cleanup(libvirt_conn, names)


def _cleanup(conn, names: list[str]) -> None:
    import libvirt

    from vmhost.providers.base import NAME_PREFIX

    for name in names:
        with contextlib.suppress(libvirt.libvirtError):
            dom = conn.lookupByName(name)
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            if any(vol.name().startswith(f"{NAME_PREFIX}{n}-") for n in names):
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
