#!/usr/bin/env python3
"""vm-requirer: asks vm-host for a VM over vm_allocation and shows where to log in to it.

The pattern of the library's docstring: the leader requests `vm-0` once related (and again when the
config changes: asking again with the same values changes nothing), and the library's events say
when the VM is ready, changes address, or goes away. Only the leader writes requests; every unit
hears the events.
"""

from __future__ import annotations

import json
import logging

import ops

from charms.vm_host.v0.vm_allocation import VmAllocationRequirer, VmEvent

logger = logging.getLogger(__name__)

VM_ID = "vm-0"


class VmRequirerCharm(ops.CharmBase):
    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.vms = VmAllocationRequirer(self, "vm-host")
        framework.observe(self.on["vm-host"].relation_created, self._request)
        framework.observe(self.on.config_changed, self._request)
        framework.observe(self.on.leader_elected, self._request)
        framework.observe(self.vms.on.vm_ready, self._on_vm_ready)
        framework.observe(self.vms.on.vm_changed, self._on_vm_ready)
        framework.observe(self.vms.on.vm_released, self._on_vm_released)
        framework.observe(self.vms.on.vm_failed, self._on_vm_failed)
        framework.observe(self.on.collect_unit_status, self._on_collect_status)
        framework.observe(self.on.request_action, self._on_request_action)
        framework.observe(self.on.withdraw_action, self._on_withdraw_action)
        framework.observe(self.on.show_action, self._on_show_action)

    # --- asking -------------------------------------------------------------------------------

    def _request(self, _event: ops.EventBase) -> None:
        """The leader asks for vm-0 with the configured key, once related."""
        key = str(self.config.get("ssh-public-key") or "").strip()
        if not self.unit.is_leader() or not key or self.model.get_relation("vm-host") is None:
            return
        try:
            self.vms.request_vm(
                VM_ID,
                cores=int(self.config["cores"]),
                memory=str(self.config["memory"]),
                image=str(self.config.get("image") or "") or None,
                ssh_authorized_keys=[key],
            )
        except ValueError as e:  # a bad config value (pydantic's errors are ValueErrors): ask for nothing
            logger.error("vm-0 not requested: %s", e)

    # --- what vm-host reports -----------------------------------------------------------------

    def _on_vm_ready(self, event: VmEvent) -> None:
        fingerprints = ", ".join(key.fingerprint for key in event.host_keys) or "none reported"
        logger.info(
            "VM %s (%s) on %s: ssh %s@%s; host key fingerprints: %s",
            event.request_id,
            event.name,
            event.host_unit,
            event.login_user,
            event.addresses[0],
            fingerprints,
        )

    def _on_vm_released(self, event: VmEvent) -> None:
        logger.info("VM %s (%s) was released", event.request_id, event.name)

    def _on_vm_failed(self, event: VmEvent) -> None:
        logger.warning("vm-host did not make %s: %s", event.request_id, event.message)

    def _on_collect_status(self, event: ops.CollectStatusEvent) -> None:
        """One line a person can act on: where to log in to vm-0, or what it waits for."""
        if self.model.get_relation("vm-host") is None:
            event.add_status(ops.BlockedStatus("relate to vm-host (juju integrate vm-requirer:vm-host <offer>)"))
            return
        if not self.config.get("ssh-public-key"):
            event.add_status(ops.BlockedStatus("set ssh-public-key to ask for vm-0"))
            return
        vm = self.vms.vm(VM_ID)
        if vm is None:
            event.add_status(ops.WaitingStatus("waiting for vm-host to answer"))
        elif vm.usable:
            event.add_status(ops.ActiveStatus(f"{VM_ID}: ssh {vm.login_user}@{vm.addresses[0]}"))
        elif vm.status in ("failed", "rejected"):
            event.add_status(ops.BlockedStatus(f"{VM_ID} {vm.status}: {vm.message}"[:120]))
        else:
            event.add_status(ops.WaitingStatus(f"{VM_ID}: {vm.message or 'pending'}"[:120]))

    # --- actions ------------------------------------------------------------------------------

    def _on_request_action(self, event: ops.ActionEvent) -> None:
        p = event.params
        key = str(self.config.get("ssh-public-key") or "").strip()
        try:
            self.vms.request_vm(
                p["id"],
                cores=p["cores"],
                memory=p["memory"],
                interfaces=p.get("interfaces") or None,
                image=p.get("image") or None,
                ssh_authorized_keys=[key] if key else None,
            )
        except (ValueError, RuntimeError) as e:
            event.fail(str(e))

    def _on_withdraw_action(self, event: ops.ActionEvent) -> None:
        try:
            event.set_results({"withdrawn": self.vms.withdraw(event.params["id"])})
        except RuntimeError as e:
            event.fail(str(e))

    def _on_show_action(self, event: ops.ActionEvent) -> None:
        try:
            statuses = {k: v.model_dump(mode="json") for k, v in self.vms.statuses().items()}
        except RuntimeError as e:
            event.fail(str(e))
            return
        event.set_results({"vms": json.dumps(statuses)})


if __name__ == "__main__":
    ops.main(VmRequirerCharm)
