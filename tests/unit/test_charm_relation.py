"""The vm-host charm itself (its real metadata and config) serving vm-allocation: relation VMs boot
from relation-image with a seed, and the status a requirer reads is refreshed on update-status."""

from __future__ import annotations

import json
from dataclasses import replace

from ops import testing

from tests.unit import test_charm
from tests.unit.juju_cli import charm_context
from tests.unit.ssh_keys import ED25519

MODEL = "aaaaaaaa-1111-4111-8111-000000000001"
CONFIG = {"backend": "libvirt", "relation-image": "ubuntu:noble"}


# The charm with an in-memory provider and a temp-dir machine, as tests/unit/test_charm.py runs it.
fake, machine = test_charm.fake, test_charm.machine


def relation_changed(requests: list) -> tuple[testing.Relation, testing.Context, testing.State]:
    """One relation-changed from the remote application `client` listing `requests`, on the leader."""
    rel = testing.Relation(
        "vm-allocation",
        remote_app_name="client",
        remote_model_uuid=MODEL,
        remote_app_data={"requests": json.dumps(requests)},
    )
    c = charm_context()
    return rel, c, c.run(c.on.relation_changed(rel), testing.State(leader=True, config=CONFIG, relations=[rel]))


def test_update_status_publishes_the_address_once_the_vm_has_one(fake, machine):
    request = {"id": "web-0", "cores": 1, "memory": "512M", "ssh_authorized_keys": [ED25519]}
    rel, c, out = relation_changed([request])
    (plan,) = fake.composed
    assert (plan.boot, plan.image, plan.cloud_init.ssh_authorized_keys) == ("image", "ubuntu:noble", (ED25519,))

    def status() -> dict:
        (entry,) = json.loads(out.get_relation(rel.id).local_app_data["vms"])
        return entry

    assert (status()["status"], status()["message"]) == ("pending", "VM is booting; waiting for an address")
    name = plan.allocation.name
    fake.vms[name] = replace(fake.vms[name], addresses=("10.0.0.42",), login_user="ubuntu")  # DHCP answered
    out = c.run(c.on.update_status(), out)
    assert (status()["status"], status()["addresses"], status()["login_user"]) == ("ready", ["10.0.0.42"], "ubuntu")
    assert len(fake.composed) == 1


def test_a_bad_relation_image_blocks_naming_the_option(fake, machine):
    c = charm_context()
    out = c.run(c.on.config_changed(), testing.State(config={**CONFIG, "relation-image": "/etc/shadow"}))
    assert out.unit_status.name == "blocked" and "relation-image" in out.unit_status.message
    assert fake.composed == []


def test_user_data_nested_past_pythons_recursion_limit_is_rejected_and_the_others_are_served(fake, machine):
    deep = "#cloud-config\na: " + "[" * 20000 + "]" * 20000  # 40 KB: within the 64 KiB user_data allows
    requests = [{"id": "deep", "user_data": deep}, {"id": "web-0", "cores": 1, "memory": "512M"}]
    rel, _, out = relation_changed(requests)
    statuses = {entry["id"]: entry for entry in json.loads(out.get_relation(rel.id).local_app_data["vms"])}
    assert statuses["deep"]["status"] == "rejected" and "nested" in statuses["deep"]["message"]
    assert statuses["web-0"]["status"] == "pending" and len(fake.composed) == 1


def test_a_binding_that_cannot_be_read_pauses_the_relation_and_the_unit_says_so(fake, machine, monkeypatch):
    import allocation_relation

    def unreadable(self):
        raise ValueError("Expecting value: line 1 column 1 (char 0)")

    monkeypatch.setattr(allocation_relation.AllocationRelation, "_binding", unreadable)
    request = {"id": "web-0", "cores": 1, "memory": "512M"}
    _, _, out = relation_changed([request])
    assert fake.composed == []
    assert out.unit_status.name == "waiting"
    assert out.unit_status.message.startswith("vm-allocation paused: cannot read this unit's binding (Expecting value")
