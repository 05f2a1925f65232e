"""Deploy vm-host on a real machine, compose a VM through the action, read resources, decompose it.

Needs a Juju controller with a machine (bare metal or a VM with nested virtualisation, /dev/kvm)
to deploy to; set VMHOST_TEST_BACKEND=lxd to test the LXD backend (default libvirt, which works
on more clouds' VMs). Skipped where no `juju` is on PATH (tests/integration/conftest.py).
"""

from __future__ import annotations

import json
import os

import pytest

APP = "vm-host"
BACKEND = os.environ.get("VMHOST_TEST_BACKEND", "libvirt")


async def _action(unit, name: str, **params) -> dict:
    action = await unit.run_action(name, **params)
    action = await action.wait()
    assert action.status == "completed", f"{name} {params}: {action.status}: {action.data.get('message')}"
    return action.results


@pytest.mark.abort_on_fail
async def test_deploy_becomes_active(ops_test, charm, kvm_placement):
    await ops_test.model.deploy(
        charm,
        application_name=APP,
        config={"backend": BACKEND, "hugepages": "2M:256"},
        **kvm_placement,
    )
    await ops_test.model.wait_for_idle(apps=[APP], status="active", timeout=40 * 60)
    unit = ops_test.model.applications[APP].units[0]
    assert unit.workload_status_message.startswith(BACKEND)


async def test_compose_resources_decompose(ops_test):
    unit = ops_test.model.applications[APP].units[0]
    composed = await _action(
        unit, "compose", cores=1, memory="256M", pinned_cores="auto", hugepages_backed=True, hostname="it-vm"
    )
    assert composed["name"] == "it-vm"
    assert len(json.loads(composed["pinned"])) == 1
    assert json.loads(composed["hugepages"])["size"] == "2M"

    resources = await _action(unit, "resources")
    assert "it-vm" in resources["json"]
    assert resources["view"].strip()

    listed = await _action(unit, "list-vms")
    assert "it-vm" in {v["name"] for v in json.loads(listed["json"])}

    assert (await _action(unit, "decompose", name="it-vm"))["decomposed"] == "true"
    listed = await _action(unit, "list-vms")
    assert "it-vm" not in {v["name"] for v in json.loads(listed["json"])}


async def test_bad_compose_fails_cleanly(ops_test):
    unit = ops_test.model.applications[APP].units[0]
    action = await (await unit.run_action("compose", cores=1, memory="64T")).wait()
    assert action.status == "failed"
    assert "memory" in action.data.get("message", "")
    listed = await _action(unit, "list-vms")
    assert json.loads(listed["json"]) == []
