#!/usr/bin/env python3
"""vm-host: Juju events -> one reconcile of the host; actions -> the vmhost use cases.

Thin on purpose: host preparation lives in vmhost.machine_setup, placement and composition in
vmhost.service, typed config/params in charm_config. Nothing about VMs is kept in
StoredState: the hypervisor is the only database (docs/design.md §3).

Over ~400 lines on purpose: ten actions, install/upgrade/set-up and collect-status are Juju glue that
belongs to the one CharmBase; each action is a few lines through `_run_action`, the logic lives in vmhost.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import ops
import pydantic

from allocation_relation import AllocationRelation
from charm_config import (
    AddTrustedClientParams,
    CharmConfig,
    ClientTokenParams,
    ComposeParams,
    ListVmsParams,
    NameParams,
    PruneImagesParams,
    StopVmParams,
    error_message,
    vm_results,
)
from charms.grafana_agent.v0.cos_agent import COSAgentProvider
from vmhost import lxd_setup, machine_setup
from vmhost.model import VmRequest
from vmhost.parse import format_cpuset, parse_listen_address
from vmhost.providers.base import ProviderError
from vmhost.providers.libvirt_discovery import is_remote
from vmhost.providers.registry import ProviderSettings, make_provider
from vmhost.resources_view import render_view, summary_line, vm_line
from vmhost.service import HostLockError, VmHost
from vmhost.timeouts import HypervisorTimeout

logger = logging.getLogger(__name__)

NO_KVM = "no /dev/kvm: enable virtualisation in firmware"
# Errors that mean "this request cannot be served" (ParseError and PlacementError are ValueErrors):
# the action fails with their one-sentence message and nothing is created.
REQUEST_ERRORS = (ValueError, ProviderError)
SERVE_UNIT = "vmhost-serve.service"  # `vmhost serve`: metrics, the host page and /api/resources


class ActionFailed(Exception):
    """An action cannot do what was asked; the message is the one sentence the operator reads."""


@contextmanager
def failing_as(prefix: str, errors: type[Exception] | tuple[type[Exception], ...] = Exception) -> Iterator[None]:
    """Turn `errors` raised inside into ActionFailed(prefix + their message): for calls whose own words
    (LXD's, Juju's) are the most useful thing to show."""
    try:
        yield
    except ActionFailed:
        raise
    except errors as e:
        raise ActionFailed(f"{prefix}{e}") from e


def make_host() -> machine_setup.Host:
    """The machine the unit runs on (tests swap in a temp-dir root and a fake runner)."""
    return machine_setup.Host()


class VmHostCharm(ops.CharmBase):
    """Serve VMs from this machine on LXD or libvirt/KVM."""

    def __init__(self, framework: ops.Framework) -> None:
        super().__init__(framework)
        self.host = make_host()
        self._problem: ops.StatusBase | None = None  # found by this dispatch's reconcile, shown by collect-status
        # Constructed before the peer-departed observer below: a leaving unit must release its VMs first.
        self.vm_allocation = AllocationRelation(self, relation_name="vm-allocation", peer_name="vm-host-peers")
        on = self.on
        for event in (
            on.install,
            on.config_changed,
            on.upgrade_charm,
            on.start,
            on.update_status,
            on.leader_elected,
            on["vm-allocation"].relation_changed,
            on["vm-allocation"].relation_departed,
            on["vm-allocation"].relation_broken,
            on["vm-host-peers"].relation_changed,
            on["vm-host-peers"].relation_departed,
        ):
            framework.observe(event, self._reconcile)
        framework.observe(on.collect_unit_status, self._on_collect_status)
        framework.observe(on.compose_action, self._on_compose)
        framework.observe(on.decompose_action, self._on_decompose)
        framework.observe(on.list_vms_action, self._on_list_vms)
        framework.observe(on.resources_action, self._on_resources)
        framework.observe(on.start_vm_action, self._on_start_vm)
        framework.observe(on.stop_vm_action, self._on_stop_vm)
        framework.observe(on.refresh_action, self._on_refresh)
        framework.observe(on.prune_images_action, self._on_prune_images)
        framework.observe(on.add_trusted_client_action, self._on_add_trusted_client)
        framework.observe(on.get_client_token_action, self._on_get_client_token)
        framework.observe(on.secret_expired, self._on_secret_expired)  # only join-token secrets are ours
        # COS: what vmhost-serve exposes, with the alert rules and dashboard under src/, to the cos-agent subordinate.
        self.cos_agent = COSAgentProvider(
            self,
            relation_name="cos-agent",
            scrape_configs=self._scrape_configs,
            metrics_rules_dir="./src/prometheus_alert_rules",
            dashboard_dirs=["./src/grafana_dashboards"],
            refresh_events=[on.config_changed, on.upgrade_charm],
        )
        framework.observe(on.remove, self._on_remove)

    # --- the workload ---------------------------------------------------------------------------

    def _config(self) -> CharmConfig | None:
        try:
            return self.load_config(CharmConfig)
        except pydantic.ValidationError:
            return None  # collect-status names the bad option

    def _vmhost(self, config: CharmConfig) -> VmHost:
        """The one place a VmHost is built: provider from config, policy from config."""
        uri = config.libvirt_uri if config.backend == "libvirt" else None
        options: dict[str, object] = {"image_server": config.image_server}
        if config.backend == "libvirt":
            options["image_dir"] = config.libvirt_image_dir
            if config.libvirt_domain_type != "auto":
                options["domain_type"] = config.libvirt_domain_type
        provider = make_provider(ProviderSettings(config.backend, uri, config.hypervisor_timeout, options))
        return VmHost(provider, config.policy(), space_bridges=config.space_bridges)

    @contextmanager
    def _session(self, config: CharmConfig) -> Iterator[VmHost]:
        """A VmHost for one use case. A silent daemon or a busy host lock also sets the unit Waiting with
        the reason, so collect-status does not ask the daemon again (a second full wait) in this dispatch."""
        vmhost = self._vmhost(config)
        try:
            yield vmhost
        except (HostLockError, HypervisorTimeout) as e:
            self._problem = ops.WaitingStatus(str(e))
            raise
        finally:
            vmhost.provider.close()

    def _reconcile(self, _event: ops.EventBase | None = None) -> list[str]:
        """Bring the host in line with config, clean up after crashes, serve the relation.

        Returns the names of orphans removed (for the refresh action).
        """
        config = self._config()
        if config is None or not self.host.kvm_available():
            return []  # collect-status names the bad option, or the missing /dev/kvm: nothing is installed
        self._ensure_serve(config, restart=isinstance(_event, ops.UpgradeCharmEvent))
        try:
            self._prepare_host(config)
        except machine_setup.HostSetupError as e:
            # Transient causes (held dpkg lock, unreachable archive or snap store) were already tried again
            # in the hook, a few times with short waits (ops docs, "Handle errors"). Charm Tech's
            # examples/machine-tinyproxy (canonical/operator) lets an apt error put the unit in error so
            # Juju retries the hook; the same docs say Juju's retries can be switched off and must not be
            # relied on. So nothing is raised: Waiting names the cause, and the next hook retries
            # (update-status at the latest: every event reconciles, so no defer() is needed).
            logger.error("host set-up: %s", e)
            self._problem = ops.WaitingStatus(str(e)) if e.transient else ops.BlockedStatus(str(e))
            return []
        except HypervisorTimeout as e:  # a hung daemon: wait for it, the set-up itself may be fine
            logger.error("host set-up: %s", e)
            self._problem = ops.WaitingStatus(str(e))
            return []
        except Exception as e:  # never out of a hook: say what happened, the log has the traceback
            logger.exception("host set-up failed")
            self._problem = ops.BlockedStatus(f"host set-up failed: {e}; see juju debug-log, then run refresh")
            return []
        try:
            with self._session(config) as vmhost:
                removed = vmhost.gc()
                if removed:
                    logger.info("removed orphans of crashed composes: %s", ", ".join(removed))
                paused = self.vm_allocation.reconcile(vmhost, config)
                if paused:
                    self._problem = ops.WaitingStatus(paused)
        except (HostLockError, HypervisorTimeout):  # _session set Waiting with their sentence
            return []
        except ProviderError as e:
            self._problem = ops.WaitingStatus(f"{config.backend} not reachable: {e}")
            return []
        return removed

    def _prepare_host(self, config: CharmConfig) -> None:
        if config.backend == "libvirt":
            if not self.host.libvirt_installed():
                self.unit.status = ops.MaintenanceStatus("installing libvirt and QEMU packages")
            self.host.ensure_libvirt()
        else:
            if not self.host.lxd_installed():
                self.unit.status = ops.MaintenanceStatus(f"installing LXD from snap channel {config.lxd_snap_channel}")
            self.host.ensure_lxd(config.lxd_snap_channel)
            self._apply_lxd_preseed(config)
        if config.backend == "libvirt" and is_remote(config.libvirt_uri):
            # Hugepages and hugetlbfs belong to the remote host's kernel; this machine's are not its.
            if config.hugepages:
                raise machine_setup.HostSetupError(
                    f"hugepages cannot be set on the remote libvirt host {config.libvirt_uri} from here; "
                    "reserve them on that host (sysfs or its kernel command line) and clear the hugepages option"
                )
            return
        if config.hugepages:
            wanted = self.host.wanted_hugepages(config.hugepages)
            if any(self.host.hugepages().get(k, 0) != v for k, v in wanted.items()):
                self.unit.status = ops.MaintenanceStatus("setting hugepages")
            report = self.host.apply_hugepages(config.hugepages)
            if report.reboot_required:
                logger.warning("%s", report.message())
        try:
            made = self.host.ensure_hugetlbfs({s.size for s in config.hugepages})
        except machine_setup.HostSetupError as e:
            if config.hugepages:
                raise
            logger.warning("%s (no hugepages configured: VMs without hugepages are served)", e)
            made = []
        if made and config.backend == "libvirt":
            self.host.restart_libvirtd()

    def _apply_lxd_preseed(self, config: CharmConfig) -> None:
        cfg = lxd_setup.LxdHostConfig(
            storage_driver=config.lxd_storage_driver,
            bridge=config.bridge or None,
            listen_address=config.lxd_listen_address or None,
            storage_pool=config.default_storage_pool or "default",
        )
        try:
            report = lxd_setup.ensure_host(cfg, timeout=config.hypervisor_timeout)
        except HypervisorTimeout:
            raise
        except Exception as e:  # LXD's own words are the most useful message for the operator
            logger.exception("LXD set-up failed")
            raise machine_setup.HostSetupError(f"LXD set-up failed: {e}") from e
        if report.applied:
            logger.info("LXD set-up created what was missing: %s", ", ".join(sorted(report.applied)))
        if report.notes:  # the host serves VMs as it is; the operator should put the option back
            self._problem = ops.BlockedStatus(report.notes[0])

    # --- observability: vmhost serve as a systemd unit, scraped over cos-agent --------------------

    def _serve_argv(self, config: CharmConfig) -> list[str]:
        """`vmhost serve` with this unit's backend and policy, from the charm's own venv and source."""
        argv = [str(self.charm_dir / "venv/bin/python"), "-m", "vmhost.cli", "serve", "--backend", config.backend]
        argv += ["--listen", config.metrics_address]
        argv += ["--cpu-overcommit-ratio", repr(config.cpu_overcommit_ratio)]
        argv += ["--memory-overcommit-ratio", repr(config.memory_overcommit_ratio)]
        argv += ["--reserved-memory", f"{config.reserved_memory}B"]
        argv += ["--timeout", repr(config.hypervisor_timeout)]
        if config.reserved_cores:
            argv += ["--reserved-cores", format_cpuset(config.reserved_cores)]
        if config.default_storage_pool:
            argv += ["--default-storage-pool", config.default_storage_pool]
        if config.backend == "libvirt":
            argv += ["--uri", config.libvirt_uri]
        return argv

    def _ensure_serve(self, config: CharmConfig, restart: bool = False) -> None:
        """Run vmhost serve on metrics-address (none when it is empty); a failure is shown, never raised."""
        unit = None
        if config.metrics_address:
            env = {"PYTHONPATH": f"{self.charm_dir / 'lib'}:{self.charm_dir / 'src'}"}
            after = ("libvirtd.service",) if config.backend == "libvirt" else ("snap.lxd.daemon.service",)
            unit = machine_setup.systemd_unit(
                "vm-host resources: metrics, page, API", self._serve_argv(config), env, after
            )
        try:
            changed = self.host.ensure_service(SERVE_UNIT, unit, restart=restart)
        except machine_setup.HostSetupError as e:
            logger.error("%s", e)
            self._problem = ops.BlockedStatus(str(e))
            return
        if changed:
            logger.info("%s %s (%s)", SERVE_UNIT, changed, config.metrics_address or "metrics-address empty")

    def _scrape_configs(self) -> list[dict]:
        """Where the cos-agent subordinate, on this same machine, scrapes vmhost serve."""
        config = self._config()
        if config is None or not config.metrics_address:
            return []
        import ipaddress

        host, port = parse_listen_address(config.metrics_address)
        ip = ipaddress.ip_address(host)
        target = "localhost" if ip.is_unspecified else (f"[{host}]" if ip.version == 6 else host)
        return [{"metrics_path": "/metrics", "static_configs": [{"targets": [f"{target}:{port}"]}]}]

    def _on_remove(self, _event: ops.RemoveEvent) -> None:
        try:
            self.host.ensure_service(SERVE_UNIT, None)
        except Exception as e:  # never out of a hook; the unit is going away either way
            logger.warning("could not remove %s: %s", SERVE_UNIT, e)

    # --- status ---------------------------------------------------------------------------------

    def _on_collect_status(self, event: ops.CollectStatusEvent) -> None:
        try:
            config = self.load_config(CharmConfig)
        except pydantic.ValidationError as e:
            event.add_status(ops.BlockedStatus(error_message(e, "config")))
            return
        statuses: list[ops.StatusBase] = [self._problem] if self._problem else []
        if not self.host.kvm_available():
            statuses.append(ops.BlockedStatus(NO_KVM))
        installed = self.host.libvirt_installed() if config.backend == "libvirt" else self.host.lxd_installed()
        if not installed and not self._problem:  # Maintenance would outrank a Waiting that says why not
            statuses.append(ops.MaintenanceStatus(f"installing {config.backend}"))
        sizes = self.host.pending_reboot_sizes()
        if sizes:
            statuses.append(ops.WaitingStatus(f"reboot required for {' and '.join(sizes)} hugepages"))
        if not statuses:
            statuses.append(self._summary(config))
        for status in statuses:
            event.add_status(status)

    def _summary(self, config: CharmConfig) -> ops.StatusBase:
        try:
            if config.backend == "lxd" and not machine_setup.lxd_supports_vms(timeout=config.hypervisor_timeout):
                return ops.BlockedStatus("LXD cannot run VMs here: load the kvm and vhost_vsock modules")
            with self._session(config) as vmhost:
                res = vmhost.resources()
            return ops.ActiveStatus(summary_line(res))
        except Exception as e:  # status must never crash the hook; say what went wrong instead
            logger.warning("cannot read %s resources: %s", config.backend, e)
            return ops.WaitingStatus(f"cannot read {config.backend} resources: {e}")

    # --- actions --------------------------------------------------------------------------------

    def _run_action(
        self,
        event: ops.ActionEvent,
        params_class: type[pydantic.BaseModel] | None,
        run: Callable[[ops.ActionEvent, Any, CharmConfig], dict[str, str]],
    ) -> None:
        """The one way an action runs: typed parameters (`params_class`, None for none) and config, then
        `run(event, params, config)` gives the results. A bad parameter or config option, an ActionFailed
        or a refused request (REQUEST_ERRORS) fails the action with one sentence; so does an unforeseen
        error, whose traceback goes to the unit's log only (no exception escapes a hook)."""
        params = None
        if params_class is not None:
            try:
                params = event.load_params(params_class)
            except pydantic.ValidationError as e:
                event.fail(error_message(e, "parameter"))
                return
        try:
            config = self.load_config(CharmConfig)
        except pydantic.ValidationError as e:
            event.fail(f"fix the charm config first: {error_message(e, 'config')}")
            return
        try:
            results = run(event, params, config)
        except (ActionFailed, *REQUEST_ERRORS) as e:
            event.fail(str(e))
            return
        except Exception as e:
            logger.exception("action %s failed", event.handle.kind)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            event.fail(
                f"{event.handle.kind.removesuffix('_action').replace('_', '-')} failed: {type(e).__name__}"
                f"{': ' + first if first else ''}; the unit's log has the details (juju debug-log)"
            )
            return
        event.set_results(results)

    def _on_compose(self, event: ops.ActionEvent) -> None:
        self._run_action(event, ComposeParams, self._compose)

    def _on_decompose(self, event: ops.ActionEvent) -> None:
        self._run_action(event, NameParams, self._decompose)

    def _on_list_vms(self, event: ops.ActionEvent) -> None:
        self._run_action(event, ListVmsParams, self._list_vms)

    def _on_resources(self, event: ops.ActionEvent) -> None:
        self._run_action(event, None, self._resources)

    def _on_start_vm(self, event: ops.ActionEvent) -> None:
        self._run_action(event, NameParams, self._start_vm)

    def _on_stop_vm(self, event: ops.ActionEvent) -> None:
        self._run_action(event, StopVmParams, self._stop_vm)

    def _on_refresh(self, event: ops.ActionEvent) -> None:
        self._run_action(event, None, self._refresh)

    def _on_prune_images(self, event: ops.ActionEvent) -> None:
        self._run_action(event, PruneImagesParams, self._prune_images)

    def _on_add_trusted_client(self, event: ops.ActionEvent) -> None:
        self._run_action(event, AddTrustedClientParams, self._add_trusted_client)

    def _on_get_client_token(self, event: ops.ActionEvent) -> None:
        self._run_action(event, ClientTokenParams, self._get_client_token)

    # The actions themselves: (event, params, config) -> results; ActionFailed says why not.

    def _compose(self, event: ops.ActionEvent, params: ComposeParams, config: CharmConfig) -> dict[str, str]:
        request = VmRequest.from_dict(params.request_dict())
        with self._session(config) as vmhost:
            vm = vmhost.compose(
                request, start=params.start, boot=params.boot, image=params.image, cloud_init=params.cloud_init()
            )
        event.log(f"composed {vm.name}")
        return vm_results(vm.to_dict())

    def _decompose(self, event: ops.ActionEvent, params: NameParams, config: CharmConfig) -> dict[str, str]:
        with self._session(config) as vmhost:
            vmhost.decompose(params.name)
        return {"name": params.name, "decomposed": "true"}

    def _list_vms(self, event: ops.ActionEvent, params: ListVmsParams, config: CharmConfig) -> dict[str, str]:
        with self._session(config) as vmhost:
            vms = [v.to_dict() for v in vmhost.vms(pool=params.pool)]
        return {
            "count": str(len(vms)),
            "view": "\n".join(vm_line(v) for v in vms) or "no VMs",
            "json": json.dumps(vms, sort_keys=True),
        }

    def _resources(self, event: ops.ActionEvent, params: None, config: CharmConfig) -> dict[str, str]:
        with self._session(config) as vmhost:
            res = vmhost.resources()
        return {"view": render_view(res), "json": json.dumps(res, sort_keys=True)}

    def _start_vm(self, event: ops.ActionEvent, params: NameParams, config: CharmConfig) -> dict[str, str]:
        return self._power(config, params.name, start=True)

    def _stop_vm(self, event: ops.ActionEvent, params: StopVmParams, config: CharmConfig) -> dict[str, str]:
        return self._power(config, params.name, start=False, force=params.force)

    def _power(self, config: CharmConfig, name: str, *, start: bool, force: bool = False) -> dict[str, str]:
        with self._session(config) as vmhost:
            vmhost.find(name)  # a clear "no VM named ..." before touching anything
            if start:
                vmhost.start(name)
            else:
                vmhost.stop(name, force=force)
            state = vmhost.find(name).state
        return {"name": name, "state": state}

    def _refresh(self, event: ops.ActionEvent, params: None, config: CharmConfig) -> dict[str, str]:
        if not self.host.kvm_available():
            raise ActionFailed(NO_KVM)
        removed = self._reconcile()
        if isinstance(self._problem, ops.BlockedStatus | ops.WaitingStatus):
            raise ActionFailed(self._problem.message)
        summary = self._summary(config)
        return {"removed": json.dumps(removed), "summary": summary.message}

    def _prune_images(self, event: ops.ActionEvent, params: PruneImagesParams, config: CharmConfig) -> dict[str, str]:
        with self._session(config) as vmhost:
            removed = vmhost.prune_images(dry_run=params.dry_run)
            kept = [f"{b['pool']}/{b['volume']}" for b in vmhost.images()]
        return {"removed": json.dumps(removed), "kept": json.dumps(kept), "dry-run": str(params.dry_run).lower()}

    def _trust_projects(self, config: CharmConfig, action: str, admin: bool) -> tuple[str, ...] | None:
        """vm-host's own LXD project (made if it is not there yet), or None: full access, only when asked."""
        if config.backend != "lxd":
            raise ActionFailed(f"{action} needs backend=lxd; this unit runs {config.backend}")
        if admin:
            return None
        with self._session(config) as vmhost:
            vmhost.provider.ensure_project()
            return (vmhost.provider.project,)

    def _add_trusted_client(
        self, event: ops.ActionEvent, params: AddTrustedClientParams, config: CharmConfig
    ) -> dict[str, str]:
        with failing_as("LXD did not trust the certificate: "):  # LXD's own words, one line
            projects = self._trust_projects(config, "add-trusted-client", params.admin)
            fingerprint = lxd_setup.add_trusted_client(
                params.cert, params.name, projects=projects, timeout=config.hypervisor_timeout
            )
        return {"name": params.name, "fingerprint": fingerprint, "access": lxd_setup.describe_access(projects)}

    def _get_client_token(
        self, event: ops.ActionEvent, params: ClientTokenParams, config: CharmConfig
    ) -> dict[str, str]:
        with failing_as("LXD did not issue a token: "):
            projects = self._trust_projects(config, "get-client-token", params.admin)
            token = lxd_setup.create_join_token(
                params.name, expiry_s=params.expiry_seconds, projects=projects, timeout=config.hypervisor_timeout
            )
        access = lxd_setup.describe_access(projects)
        # A secret owned by this unit, never action output (which `juju show-operation` keeps for anyone
        # who can read the model); the operator reads it with `juju show-secret <id> --reveal`.
        with failing_as("could not store the token as a Juju secret, so it was not handed out: ", ops.ModelError):
            secret = self.unit.add_secret(
                {"token": token.token},
                description=f"LXD join token for {params.name} ({access}), expires {token.expires_at}",
                expire=datetime.timedelta(seconds=params.expiry_seconds),
            )
        return {"name": params.name, "secret-id": secret.id, "expires": token.expires_at, "access": access}

    def _on_secret_expired(self, event: ops.SecretExpiredEvent) -> None:
        """A join token's secret outlived its token (LXD refuses it now): nothing worth keeping."""
        event.secret.remove_all_revisions()


if __name__ == "__main__":  # pragma: nocover
    ops.main(VmHostCharm)
