#!/usr/bin/env python3
"""Test requirer: turns actions into vm_allocation requests and shows what vm-host answers."""

from __future__ import annotations

import json

import ops

from charms.vm_host.v0.vm_allocation import VmAllocationRequirer


class RequirerCharm(ops.CharmBase):
    def __init__(self, framework: ops.Framework):
        super().__init__(framework)
        self.vms = VmAllocationRequirer(self, "vm-host")
        framework.observe(self.on.request_action, self._on_request)
        framework.observe(self.on.withdraw_action, self._on_withdraw)
        framework.observe(self.on.show_action, self._on_show)
        framework.observe(self.vms.on.vm_ready, self._on_status)
        framework.observe(self.vms.on.vm_failed, self._on_status)
        framework.observe(self.on.update_status, self._on_status)
        framework.observe(self.on.start, self._on_status)

    def _on_request(self, event: ops.ActionEvent) -> None:
        p = event.params
        try:
            self.vms.request_vm(p["id"], cores=p["cores"], memory=p["memory"], interfaces=p.get("interfaces") or None)
        except (ValueError, RuntimeError) as e:
            event.fail(str(e))

    def _on_withdraw(self, event: ops.ActionEvent) -> None:
        try:
            event.set_results({"withdrawn": self.vms.withdraw(event.params["id"])})
        except RuntimeError as e:
            event.fail(str(e))

    def _on_show(self, event: ops.ActionEvent) -> None:
        try:
            statuses = {k: v.model_dump(mode="json") for k, v in self.vms.statuses().items()}
        except RuntimeError as e:
            event.fail(str(e))
            return
        event.set_results({"vms": json.dumps(statuses)})

    def _on_status(self, _event: ops.EventBase) -> None:
        try:
            statuses = self.vms.statuses()
        except RuntimeError:
            self.unit.status = ops.BlockedStatus("relate to vm-host")
            return
        ready = sorted(k for k, v in statuses.items() if v.status == "ready")
        self.unit.status = ops.ActiveStatus(f"ready: {','.join(ready) or 'none'}")


if __name__ == "__main__":
    ops.main(RequirerCharm)
