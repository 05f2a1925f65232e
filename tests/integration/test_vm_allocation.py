"""vm-allocation across models: vm-host offers the endpoint in one model, the example requirer
(examples/vm-requirer) consumes it from another, asks for a VM with an SSH key, sees it ready with an
address, the login user and host keys, withdraws it and sees it released.

Needs a Juju controller whose machines can run VMs (nested virtualisation or bare metal); skipped,
with the reason, where no `juju` is on PATH.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("juju") is None, reason="no `juju` on PATH: integration tests need a Juju controller"
)

ROOT = Path(__file__).resolve().parents[2]
REQUIRER = ROOT / "examples/vm-requirer"
LIB = ROOT / "lib/charms/vm_host/v0/vm_allocation.py"
HOST_APP, CLIENT_APP = "vm-host", "vm-client"


async def _action(unit, name: str, **params) -> dict:
    action = await unit.run_action(name, **params)
    action = await action.wait()
    assert action.status == "completed", action.results
    return action.results


async def _statuses(unit) -> dict:
    return json.loads((await _action(unit, "show"))["vms"])


async def _wait_for(predicate, unit, timeout: int = 900):
    for _ in range(timeout // 10):
        st = await _statuses(unit)
        if predicate(st):
            return st
        await asyncio.sleep(10)
    raise AssertionError(f"vm-host never reached the expected state; last: {st}")


@pytest.fixture(scope="module")
def requirer_source(tmp_path_factory) -> Path:
    """The example requirer with the interface library copied in (the repo keeps one copy)."""
    dst = tmp_path_factory.mktemp("requirer") / "vm-requirer"
    shutil.copytree(REQUIRER, dst)
    lib_dst = dst / "lib/charms/vm_host/v0"
    lib_dst.mkdir(parents=True)
    shutil.copy(LIB, lib_dst / "vm_allocation.py")
    return dst


@pytest.mark.abort_on_fail
@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory) -> str:
    """A throwaway client key pair; the VM's login user accepts its public half."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen on PATH: cannot make a client key")
    path = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)
    return path.with_suffix(".pub").read_text().strip()


async def test_offer_consume_request_and_release(ops_test, charm, requirer_source, kvm_placement, ssh_key):
    client_charm = await ops_test.build_charm(requirer_source)

    host_model = ops_test.model
    await host_model.deploy(charm, application_name=HOST_APP, config={"backend": "lxd"}, **kvm_placement)
    await host_model.wait_for_idle(apps=[HOST_APP], status="active", timeout=1800)
    await ops_test.juju("offer", f"{HOST_APP}:vm-allocation", "vm-allocation", check=True)
    offer_url = f"admin/{host_model.info.name}.vm-allocation"

    consumer = await ops_test.track_model("consumer")
    with ops_test.model_context("consumer"):
        await consumer.deploy(client_charm, application_name=CLIENT_APP, config={"ssh-public-key": ssh_key})
        await ops_test.juju("consume", offer_url, "vm-host", check=True)
        await ops_test.juju("integrate", f"{CLIENT_APP}:vm-host", "vm-host", check=True)
        await consumer.wait_for_idle(apps=[CLIENT_APP], timeout=900)
        client = consumer.applications[CLIENT_APP].units[0]

        await _action(client, "request", id="web-0", cores=1, memory="512M")
        st = await _wait_for(lambda s: s.get("web-0", {}).get("status") in ("ready", "failed", "rejected"), client)
        assert st["web-0"]["status"] == "ready", st["web-0"]
        name = st["web-0"]["name"]
        # ready means usable: an address, the user to log in as, the host keys to pin
        assert st["web-0"]["addresses"] and st["web-0"]["login_user"] == "ubuntu" and st["web-0"]["host_keys"]
        # a malformed request is rejected with the reason, the good one is untouched
        await _action(client, "request", id="big", cores=100000, memory="512M")
        st = await _wait_for(lambda s: "big" in s, client)
        assert st["big"]["status"] == "rejected" and "cores" in st["big"]["message"]

    host_unit = host_model.applications[HOST_APP].units[0]
    listed = await _action(host_unit, "list-vms")
    assert name in json.dumps(listed)

    with ops_test.model_context("consumer"):
        await _action(client, "withdraw", id="web-0")
        await _wait_for(lambda s: "web-0" not in s, client)

    for _ in range(60):
        if name not in json.dumps(await _action(host_unit, "list-vms")):
            break
        await asyncio.sleep(10)
    else:
        raise AssertionError(f"{name} was not released after its request was withdrawn")
