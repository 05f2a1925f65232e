"""The provider protocol every hypervisor plugin implements, and the pieces they share.

Providers do I/O and nothing clever: placement decides, the provider makes it so. Compose is a
transaction (see `Transaction`): each step registers its undo, and a failure unwinds them in
reverse so a failed compose leaves nothing behind.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from vmhost.model import ComposePlan, HostTopology, Nic, StoragePool, VmInfo

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vmhost.providers"
# Prefix of every object (domain, volume, instance) vm-host creates; gc only ever touches these.
NAME_PREFIX = "vmhost-"


# Test-only fault point (tests/functional/test_faults.py): VMHOST_TEST_FAULT=kill-at:<step glob> makes the
# process exit at once (os._exit, as a kill -9 would leave things) when it reaches a matching named step of
# compose or decompose. Anything without the kill-at: prefix is ignored, and so is everything inside a Juju
# hook (JUJU_UNIT_NAME set), so no charm and no stray variable can set it off.
FAULT_ENV = "VMHOST_TEST_FAULT"
FAULT_PREFIX = "kill-at:"
FAULT_EXIT = 97


def fault_point(step: str) -> None:
    """Exit here when the test-only fault point names this step (see FAULT_ENV); otherwise nothing."""
    spec = os.environ.get(FAULT_ENV, "")
    armed = spec.startswith(FAULT_PREFIX) and "JUJU_UNIT_NAME" not in os.environ
    if armed and fnmatch.fnmatchcase(step, spec[len(FAULT_PREFIX) :]):
        os._exit(FAULT_EXIT)


class ProviderError(Exception):
    """A backend refused or failed; the message is one sentence an operator can act on."""


class NotFound(ProviderError):
    """The named VM does not exist on this host."""


class ComposeError(ProviderError):
    """A compose step failed; everything done before it was undone."""

    def __init__(self, step: str, cause: BaseException):
        super().__init__(f"compose failed at step '{step}': {cause}")
        self.step = step
        self.cause = cause


@runtime_checkable
class Provider(Protocol):
    """A hypervisor backend. Found through the `vmhost.providers` entry-point group.

    Optional (not required by isinstance, so older plugins still qualify): `confine_floating(threads)`,
    see `FloatingConfinement`; callers go through `confine_floating()`, which skips providers without it.
    """

    name: str

    def discover(self) -> HostTopology: ...

    def list_vms(self) -> list[VmInfo]: ...

    def compose(self, plan: ComposePlan) -> VmInfo: ...

    def decompose(self, name: str) -> None: ...

    def start(self, name: str) -> None: ...

    def stop(self, name: str, force: bool = False) -> None: ...

    def storage_pools(self) -> list[StoragePool]: ...

    def networks(self) -> list[Nic]: ...

    def gc(self) -> list[str]:
        """Remove objects tagged as ours that no VM owns (left by a crash); return their names."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class FloatingConfinement(Protocol):
    """A provider that can keep floating VMs off the threads pinned VMs own (DESIGN.md §4 rule 1)."""

    def confine_floating(self, threads: tuple[int, ...], foreign: bool = False) -> None:
        """Give every floating VM that vm-host manages exactly these host threads (vCPUs and emulator),
        now and across restarts. Idempotent. With `foreign`, running VMs made by others that pin nothing
        themselves are kept to these threads too (live only); without, they are left alone."""
        ...


def confine_floating(provider: object, threads: tuple[int, ...], foreign: bool = False) -> bool:
    """Call `provider.confine_floating(threads, foreign=...)`; False (a no-op) for a provider without it,
    whose backend offers no per-VM affinity that leaves the vCPU count alone (the kernel then floats them)."""
    if not isinstance(provider, FloatingConfinement):
        return False
    if foreign:
        provider.confine_floating(tuple(threads), foreign=True)
    else:
        provider.confine_floating(tuple(threads))
    return True


@dataclass
class Transaction:
    """Undo log for a compose: `with tx.step("define domain"): ...; tx.on_undo(fn)`.

    A failing step unwinds every registered undo in reverse and raises ComposeError naming the step.
    """

    undos: list[tuple[str, Callable[[], object]]] = field(default_factory=list)
    undo_failures: int = 0  # undos that failed so far: a later undo may keep the record gc needs

    def on_undo(self, what: str, fn: Callable[[], object]) -> None:
        self.undos.append((what, fn))

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        fault_point(name)
        try:
            yield
        except Exception as e:
            self.rollback()
            raise ComposeError(name, e) from e

    def rollback(self) -> None:
        while self.undos:
            what, fn = self.undos.pop()
            try:
                fn()
            except Exception as e:  # keep unwinding; the orphan is tagged and gc will find it
                self.undo_failures += 1
                log.warning("undo %s failed: %s", what, e)


# The built-in plugins, also reachable when vmhost runs unpackaged (inside a charm) with no entry points.
BUILTIN_PROVIDERS = {
    "libvirt": "vmhost.providers.libvirt:LibvirtProvider",
    "lxd": "vmhost.providers.lxd:LxdProvider",
}


def available_providers() -> dict[str, str]:
    """Provider "module:Class" paths by name: built-ins plus the entry-point group (third parties add theirs)."""
    found = dict(BUILTIN_PROVIDERS)
    from importlib.metadata import entry_points  # only when asked: scanning installed packages is slow

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def get_provider(name: str, uri: str | None = None, **options) -> Provider:
    """Instantiate the provider plugin `name` (e.g. "libvirt", "lxd") for `uri`."""
    eps = BUILTIN_PROVIDERS if name in BUILTIN_PROVIDERS else available_providers()
    if name not in eps:
        allowed = ", ".join(sorted(eps)) or "none installed"
        raise ProviderError(f"backend {name!r} is not available; installed: {allowed}")
    module, _, attr = eps[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(uri=uri, **options)
