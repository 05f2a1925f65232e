"""The provider protocol every hypervisor plugin implements, and the pieces they share.

Providers do I/O and nothing clever: placement decides, the provider makes it so. Compose is a
transaction (see `Transaction`): each step registers its undo, and a failure unwinds them in
reverse so a failed compose leaves nothing behind.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import tenacity

from vmhost.model import BOOT_MODES, ComposePlan, HostTopology, Nic, StoragePool, VmInfo
from vmhost.parse import ParseError, parse_vm_name

log = logging.getLogger(__name__)
T = TypeVar("T")

# Prefix of every object (domain, volume, instance) vm-host creates; gc only ever touches these.
NAME_PREFIX = "vmhost-"

# Where a VM is in its life, as both providers record it on the VM (libvirt metadata, LXD user.vmhost.state).
STATE_COMPOSING = "composing"  # until every compose step succeeded
STATE_READY = "ready"
STATE_DECOMPOSING = "decomposing"  # a decompose began: gc finishes it
UNFINISHED = (STATE_COMPOSING, STATE_DECOMPOSING)

# MAC prefixes (OUI) each hypervisor uses for the MACs it picks itself.
QEMU_OUI = "52:54:00"
LXD_OUI = "00:16:3e"


RETRY_ATTEMPTS = 5  # per call, the first included
RETRY_WAIT = tenacity.wait_exponential(multiplier=0.2, max=2)  # 0.2, 0.4, 0.8, 1.6 s: about 3 s in all


def with_retries(
    fn: Callable[[], T],
    transient: Callable[[BaseException], bool],
    budget: float,
    *,
    waits: Sequence[float] | None = None,
    sleep: Callable[[float], None] | None = None,
    before_wait: Callable[[BaseException, float], None] | None = None,
) -> T:
    """fn(), tried again while `transient(error)` holds (connection refused, LXD 503, libvirt's operation
    timeout): RETRY_ATTEMPTS in all, RETRY_WAIT between, and no new attempt once `budget` s have passed.
    Neither provider counts a call that overran its time limit as transient, so a call with its
    retries stays bounded too. The one retry idiom of the project: `waits` gives other waits (then
    len(waits) + 1 attempts), `sleep` stands in for time.sleep, `before_wait(error, seconds)` is told
    before each wait."""
    hooks: dict[str, Any] = {}
    if sleep is not None:
        hooks["sleep"] = sleep
    if before_wait is not None:
        hooks["before_sleep"] = lambda state: before_wait(state.outcome.exception(), state.next_action.sleep)
    attempts = RETRY_ATTEMPTS if waits is None else len(waits) + 1
    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(transient),
        stop=tenacity.stop_after_attempt(attempts) | tenacity.stop_after_delay(budget),
        wait=RETRY_WAIT if waits is None else (lambda state: _nth_wait(waits, state.attempt_number)),
        reraise=True,
        **hooks,
    )
    return retrying(fn)


def _nth_wait(waits: Sequence[float], attempt: int) -> float:
    """The wait after failed attempt `attempt` (tenacity asks after the last one too, before it stops)."""
    return waits[attempt - 1] if attempt <= len(waits) else 0.0


def volume_name(vm: str, label: str, prefix: str = NAME_PREFIX) -> str:
    """The volume holding disk `label` of `vm`. libvirt's pools are shared, so it carries NAME_PREFIX
    for gc to tell ours; LXD's volumes live in vm-host's own project and pass prefix="" (as they always did)."""
    return f"{prefix}{vm}-{label}"


def random_mac(oui: str) -> str:
    """A MAC under `oui`, random in its last three bytes (set up front so cloud-init can match it)."""
    rnd = random.SystemRandom()
    return f"{oui}:" + ":".join(f"{rnd.randrange(256):02x}" for _ in range(3))


def name_taken(name: str, where: str = "on this host") -> str:
    """The one refusal for a VM name already in use: the service says it before placing, each provider
    again when it makes the VM (another process may have taken the name in between)."""
    return f"a VM named {name!r} already exists {where}; choose another name"


def check_plan(plan: ComposePlan) -> None:
    """What every provider refuses before it touches the hypervisor: a VM name outside the one rule
    (vmhost.parse.parse_vm_name) and a boot mode that is not one."""
    name = plan.allocation.name
    try:
        parse_vm_name(name or "")
    except ParseError as e:
        raise ProviderError(f"VM name {(name or '')[:80]!r} is not allowed: {e}") from None
    if plan.boot not in BOOT_MODES:
        raise ProviderError(f"boot {plan.boot!r} is not a boot mode; allowed: {', '.join(BOOT_MODES)}")


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
    """A hypervisor backend. Found through the `vmhost.providers` entry-point group (vmhost.providers.registry).

    `confines_floating` says whether `confine_floating` can keep floating VMs off the threads pinned
    VMs own (design §4 rule 1); a backend without per-VM affinity that leaves the vCPU count alone says
    False, its `confine_floating` does nothing and returns False, and the resources report says so.
    """

    name: str
    confines_floating: bool

    def discover(self) -> HostTopology: ...

    # addresses=False: leave out what only the guest's network knows (DHCP leases, guest agent, instance
    # state), for the reads placement makes under the host lock; static ip= addresses are always there.
    def list_vms(self, addresses: bool = True) -> list[VmInfo]: ...

    def compose(self, plan: ComposePlan) -> VmInfo: ...

    def decompose(self, name: str) -> None: ...

    def start(self, name: str) -> None: ...

    def stop(self, name: str, force: bool = False) -> None: ...

    def storage_pools(self) -> list[StoragePool]: ...

    def networks(self) -> list[Nic]: ...

    def gc(self) -> list[str]:
        """Remove objects tagged as ours that no VM owns (left by a crash); return their names."""
        ...

    def confine_floating(self, threads: tuple[int, ...], foreign: bool = False) -> bool:
        """Give every floating VM that vm-host manages exactly these host threads (vCPUs and emulator),
        now and across restarts. Idempotent. With `foreign`, running VMs made by others that pin nothing
        themselves are kept to these threads too (live only); without, they are left alone. Returns
        whether anything was confined (False: this backend cannot)."""
        ...

    def images(self) -> list[dict]:
        """The base images vm-host keeps for stream images (§12), each with what uses it; [] where the
        hypervisor keeps its own image store."""
        ...

    def prune_images(self, dry_run: bool = False) -> list[str]:
        """Remove the base images nothing uses; returns what was (or, dry, would be) removed."""
        ...

    def close(self) -> None: ...


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
