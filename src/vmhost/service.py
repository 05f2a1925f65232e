"""The use cases the `vmhost` command and the charm share.

Plan and compose happen under one host-wide file lock, so two processes composing at once can never
be handed the same threads or pages. Every call reads usage from what the hypervisor reports
(docs/design.md §3): there is no side state to drift. Under the lock, a usage index (placement.UsageIndex,
one per VmHost) counts again only the VMs whose allocation changed since the last compose or decompose
of this VmHost, and the provider's parse cache hands back unchanged allocations without parsing them.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace

from vmhost.hostlock import DEFAULT_LOCK, HostLockBusy, HostLockError, host_lock
from vmhost.model import BOOT_MODES, Allocation, CloudInit, ComposePlan, HostTopology, Policy, VmInfo, VmRequest
from vmhost.placement import UsageIndex, compute_usage, place
from vmhost.providers.base import NotFound, Provider, ProviderError, fault_point, name_taken
from vmhost.resources_view import resources_dict
from vmhost.simplestreams import is_stream_name, parse_image_name
from vmhost.timeouts import DEFAULT_LOCK_TIMEOUT

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOCK",
    "HostLockBusy",
    "HostLockError",
    "Refused",
    "VmHost",
    "host_lock",
    "new_vm_name",
]

STOP_WAIT = 60.0  # seconds a stopping guest gets to shut down before stop reports it still running
STOP_POLL = 0.5


class Refused(ValueError):
    """A caller's own check refused the planned VM (the relation's network policy, say); nothing was made."""


def new_vm_name(taken: set[str]) -> str:
    """A short unique name like vm-3f2a (the provider, never a remote model, names VMs)."""
    while True:
        name = f"vm-{secrets.token_hex(2)}"
        if name not in taken:
            return name


def check_boot(boot: str, image: str | None) -> None:
    """What compose refuses about boot and image before it places anything (a dry run asks the same)."""
    if boot not in BOOT_MODES:
        raise ValueError(f"boot {boot!r} is not a boot mode; allowed: {', '.join(BOOT_MODES)}")
    if boot == "image" and not image:
        raise ValueError("boot=image needs an image; give image=<path or alias> or use boot=network")
    if image and is_stream_name(image):
        parse_image_name(image)  # the server is asked only by a real compose


@dataclass
class VmHost:
    """One VM host: a provider plus the operator's policy."""

    provider: Provider
    policy: Policy = field(default_factory=Policy)
    lock_path: str | None = None
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    # Juju space -> bridge (the charm's space-bridges): discovered bridges carry their space.
    space_bridges: Mapping[str, str] = field(default_factory=dict)
    _lock_busy: bool = field(default=False, init=False, repr=False)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The host lock. Once a wait for it ran out, this VmHost does not wait again: the holder is still
        there, and a hook serving many requests would otherwise wait the full bound for each."""
        with ExitStack() as stack:
            try:
                stack.enter_context(host_lock(self.lock_path, 0.0 if self._lock_busy else self.lock_timeout))
            except HostLockBusy:
                self._lock_busy = True
                raise
            yield

    # Used only under the host lock (compose, decompose): threads sharing a VmHost never race on it.
    _usage_index: UsageIndex | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def _index(self) -> UsageIndex:
        if self._usage_index is None:
            self._usage_index = UsageIndex()
        return self._usage_index

    def topology(self) -> HostTopology:
        return self.provider.discover().with_spaces(self.space_bridges)

    def vms(self, pool: str | None = None) -> list[VmInfo]:
        vms = sorted(self.provider.list_vms(), key=lambda v: v.name)
        return [v for v in vms if pool is None or v.allocation.resource_pool == pool]

    def allocations(self) -> list[Allocation]:
        return [v.allocation for v in self.provider.list_vms(addresses=False)]

    def _snapshot(self) -> tuple[HostTopology, list[VmInfo]]:
        """What the hypervisor reports now: read once per use case, so every decision in it agrees (without
        the guests' DHCP addresses: placement does not need them, and the host lock is held meanwhile)."""
        return self.topology(), self.provider.list_vms(addresses=False)

    def plan(self, request: VmRequest, snapshot: tuple[HostTopology, list[VmInfo]] | None = None) -> Allocation:
        """What compose would allocate now, without creating anything (raises PlacementError)."""
        return self._plan(request, *(snapshot or self._snapshot()), None)

    def _plan(self, request: VmRequest, host: HostTopology, vms: list[VmInfo], index: UsageIndex | None) -> Allocation:
        if request.name is None:
            request = replace(request, name=new_vm_name({v.name for v in vms}))
        elif any(v.name == request.name for v in vms):
            raise ValueError(name_taken(request.name))
        return place(host, [v.allocation for v in vms], request, self.policy, index=index)

    def compose(
        self,
        request: VmRequest,
        *,
        start: bool = False,
        boot: str = "network",
        image: str | None = None,
        cloud_init: CloudInit | None = None,
        accept: Callable[[Allocation, HostTopology], str | None] | None = None,
    ) -> VmInfo:
        """Place and create a VM atomically with respect to other vmhost processes.

        `accept`, when given, sees the planned allocation under the same lock and returns a reason to
        refuse it (raised as Refused) or None: what it checked is exactly what gets created.
        """
        check_boot(boot, image)
        with self._locked():
            host, vms = self._snapshot()
            allocation = self._plan(request, host, vms, self._index)
            if cloud_init is None and boot == "image":
                # An image boots with its name as hostname and its static addresses, generated name or not.
                cloud_init = CloudInit(hostname=allocation.name)
            elif cloud_init is not None and not cloud_init.hostname:
                cloud_init = replace(cloud_init, hostname=allocation.name)  # keys or user-data, no hostname given
            if accept is not None and (reason := accept(allocation, host)):
                raise Refused(reason)
            allocations = [v.allocation for v in vms]
            shared = self._shared_threads(host, allocations, self._index)
            plan = ComposePlan(
                allocation=allocation,
                start=start,
                boot=boot,
                image=image,
                cloud_init=cloud_init,
                shared_threads=shared if allocation.pinned is None else None,
            )
            if allocation.pinned is None:
                return self.provider.compose(plan)
            # Rule 1: floating VMs leave the new VM's threads before it can start on them, and get them
            # back if the compose fails (placement already left the shared capacity they need).
            try:
                self._confine(self._shared_threads(host, [*allocations, allocation], self._index))
                fault_point("provider compose")
                return self.provider.compose(plan)
            except BaseException:
                try:
                    self._confine(shared)
                except Exception as e:
                    log.warning("could not give floating VMs back threads %s: %s", shared, e)
                raise

    def find(self, name: str) -> VmInfo:
        for vm in self.provider.list_vms():
            if vm.name == name:
                return vm
        raise NotFound(f"no VM named {name!r} on this host")

    def decompose(self, name: str) -> None:
        with self._locked():
            host, vms = self._snapshot()
            vm = next((v for v in vms if v.name == name), None)
            if vm is None:
                raise NotFound(f"no VM named {name!r} on this host")
            self.provider.decompose(name)
            if vm.allocation.pinned is None:
                return
            # The VM is gone whatever happens next; failing to widen the floating VMs only wastes its threads
            # until the next pinned compose or decompose confines them again, so it is not an error here.
            try:
                rest = [v.allocation for v in vms if v.name != name]
                fault_point("widen floating VMs")
                self._confine(self._shared_threads(host, rest, self._index))
            except Exception as e:
                log.warning("could not give floating VMs the threads of %s back: %s", name, e)

    def _confine(self, threads: tuple[int, ...]) -> None:
        """Keep floating VMs (and, unless the policy opts out, running VMs made by others) to `threads`."""
        self.provider.confine_floating(tuple(threads), foreign=self.policy.confine_foreign_vms)

    def shared_threads(self) -> tuple[int, ...]:
        """Where floating VMs may run now: online threads neither reserved nor pinned."""
        host, vms = self._snapshot()
        return self._shared_threads(host, [v.allocation for v in vms])

    def _shared_threads(
        self, host: HostTopology, allocations: list[Allocation], index: UsageIndex | None = None
    ) -> tuple[int, ...]:
        """Online threads neither reserved nor pinned: where floating VMs may run."""
        usage = compute_usage(host, allocations, self.policy, index=index)
        return tuple(sorted(t for node in usage.nodes for t in node.free_threads))

    def start(self, name: str) -> None:
        self.provider.start(name)

    def stop(self, name: str, force: bool = False, wait: float = STOP_WAIT) -> str:
        """Stop a VM and wait, at most `wait` seconds, until it is down; returns its state.

        A guest may ignore the shutdown request (no ACPI, or busy): still running after the wait is an
        error that says so, never a quiet success.
        """
        self.provider.stop(name, force=force)
        deadline = time.monotonic() + max(0.0, wait)
        while (state := self.find(name).state) in ("running", "stopping"):
            if time.monotonic() >= deadline:
                raise ProviderError(
                    f"VM {name!r} is still {state} {wait:g}s after it was asked to stop; wait longer, "
                    "or stop it with force (power off)"
                )
            time.sleep(min(STOP_POLL, max(0.0, deadline - time.monotonic())))
        return state

    def gc(self) -> list[str]:
        """Remove what crashes left unfinished (only what vm-host can prove it made), then confine floating
        VMs to what is really free now: a crash mid-compose leaves them confined as if the dead VM's threads
        were pinned. Returns what was removed; what was skipped, and why, is logged."""
        with self._locked():
            removed = self.provider.gc()
            try:
                host, vms = self._snapshot()
                self._confine(self._shared_threads(host, [v.allocation for v in vms]))
            except Exception as e:
                log.warning("gc could not confine floating VMs to the shared threads: %s", e)
            return removed

    def images(self) -> list[dict]:
        """The base images the provider keeps for stream images (libvirt; LXD caches its own)."""
        return self.provider.images()

    def prune_images(self, dry_run: bool = False) -> list[str]:
        """Remove the base images no VM uses, under the host lock (no compose is making one meanwhile)."""
        with self._locked():
            return self.provider.prune_images(dry_run)

    def resources(self) -> dict:
        """Per NUMA node and host-wide capacity and use, as JSON-ready data."""
        host = self.topology()
        vms = self.vms()
        usage = compute_usage(host, [v.allocation for v in vms], self.policy)
        ours = self.provider.confines_floating
        return resources_dict(
            self.provider.name,
            host,
            usage,
            vms,
            self.policy,
            kept_off=(ours, ours and self.policy.confine_foreign_vms),
        )
