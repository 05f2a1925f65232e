"""examples/vm-requirer through ops.testing with its own charmcraft.yaml: it asks for vm-0 with the
configured key once related, and its status says where to log in once vm-host reports it ready."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import ops
import pytest
import yaml
from ops import testing

from tests.unit.ssh_keys import ED25519, host_key

EXAMPLE = Path(__file__).resolve().parents[2] / "examples/vm-requirer"


def _charm_type():
    spec = importlib.util.spec_from_file_location("vm_requirer_charm", EXAMPLE / "src/charm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VmRequirerCharm


@pytest.fixture(scope="module")
def ctx_args() -> dict:
    spec = yaml.safe_load((EXAMPLE / "charmcraft.yaml").read_text())
    meta = {key: spec[key] for key in ("name", "requires")}
    return {"charm_type": _charm_type(), "meta": meta, "config": spec["config"], "actions": spec["actions"]}


def ready(addresses=("10.0.0.5",)) -> dict:
    entry = {"id": "vm-0", "status": "ready", "name": "vm-1a2b3c4d", "unit": "vm-host/0", "login_user": "ubuntu"}
    entry |= {"addresses": list(addresses), "mac_addresses": ["52:54:00:00:00:01"]}
    return {"vms": json.dumps([entry | {"host_keys": [host_key(ED25519).to_dict()]}])}


def test_the_example_asks_for_vm_0_and_shows_where_to_log_in(ctx_args):
    ctx = testing.Context(**ctx_args)
    rel = testing.Relation("vm-host", remote_app_name="vm-host")
    config = {"ssh-public-key": ED25519, "image": "ubuntu:24.04", "memory": "2G"}
    out = ctx.run(ctx.on.relation_created(rel), testing.State(leader=True, config=config, relations=[rel]))
    (request,) = json.loads(out.get_relation(rel.id).local_app_data["requests"])
    assert (request["id"], request["image"], request["ssh_authorized_keys"]) == ("vm-0", "ubuntu:24.04", [ED25519])
    assert request["memory"] == 2 * 1024**3
    assert out.unit_status == testing.WaitingStatus("waiting for vm-host to answer")

    booting = {
        "vms": json.dumps([{"id": "vm-0", "status": "pending", "message": "VM is booting; waiting for an address"}])
    }
    rel = replace(out.get_relation(rel.id), remote_app_data=booting)
    out = ctx.run(ctx.on.relation_changed(rel), replace(out, relations=[rel]))
    assert out.unit_status == testing.WaitingStatus("vm-0: VM is booting; waiting for an address")

    rel = replace(out.get_relation(rel.id), remote_app_data=ready())
    out = ctx.run(ctx.on.relation_changed(rel), replace(out, relations=[rel]))
    assert out.unit_status == testing.ActiveStatus("vm-0: ssh ubuntu@10.0.0.5")
    fingerprint = host_key(ED25519).fingerprint
    assert any("ssh ubuntu@10.0.0.5" in log.message and fingerprint in log.message for log in ctx.juju_log)


def test_without_a_key_it_asks_for_nothing_and_says_what_to_set(ctx_args):
    ctx = testing.Context(**ctx_args)
    rel = testing.Relation("vm-host", remote_app_name="vm-host")
    out = ctx.run(ctx.on.relation_created(rel), testing.State(leader=True, relations=[rel]))
    assert "requests" not in out.get_relation(rel.id).local_app_data
    assert out.unit_status == testing.BlockedStatus("set ssh-public-key to ask for vm-0")


def test_show_action_reports_what_vm_host_said(ctx_args):
    ctx = testing.Context(**ctx_args)
    rel = testing.Relation("vm-host", remote_app_name="vm-host", remote_app_data=ready())
    ctx.run(ctx.on.action("show"), testing.State(relations=[rel]))
    shown = json.loads(ctx.action_results["vms"])
    assert shown["vm-0"]["addresses"] == ["10.0.0.5"] and shown["vm-0"]["login_user"] == "ubuntu"


def test_the_example_runs_on_ops_older_than_2_23_as_its_requirements_allow(ctx_args, monkeypatch):
    # requirements.txt says ops>=2.17; Relation.load and Relation.save are only in ops 2.23 and later
    monkeypatch.delattr(ops.Relation, "load")
    monkeypatch.delattr(ops.Relation, "save")
    test_the_example_asks_for_vm_0_and_shows_where_to_log_in(ctx_args)
