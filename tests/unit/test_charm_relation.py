"""The vm-host charm itself (its real metadata and config) serving vm-allocation: relation VMs boot
from relation-image with a seed, and the status a requirer reads is refreshed on update-status."""

from __future__ import annotations

import json

import pytest
from ops import testing

import charm
from tests.unit.juju_cli import charm_context
from tests.unit.relation_requests import DhcpProvider
from tests.unit.ssh_keys import ED25519
from tests.unit.test_charm import TOPOLOGY, Machine

MODEL = "aaaaaaaa-1111-4111-8111-000000000001"
CONFIG = {"backend": "libvirt", "relation-image": "ubuntu:noble"}


@pytest.fixture
def provider(monkeypatch) -> DhcpProvider:
    fake = DhcpProvider(TOPOLOGY)
    fake.dhcp = False
    monkeypatch.setattr(charm, "make_provider", lambda settings: fake)
    monkeypatch.setattr(charm.machine_setup, "lxd_supports_vms", lambda client=None, timeout=None: True)
    return fake


@pytest.fixture
def machine(monkeypatch, tmp_path) -> Machine:
    m = Machine(tmp_path)
    monkeypatch.setattr(charm, "make_host", m.host)
    return m


def test_update_status_publishes_the_address_once_the_vm_has_one(provider, machine):
    request = {"id": "web-0", "cores": 1, "memory": "512M", "ssh_authorized_keys": [ED25519]}
    rel = testing.Relation(
        "vm-allocation",
        remote_app_name="client",
        remote_model_uuid=MODEL,
        remote_app_data={"requests": json.dumps([request])},
    )
    c = charm_context()
    out = c.run(c.on.relation_changed(rel), testing.State(leader=True, config=CONFIG, relations=[rel]))
    (plan,) = provider.composed
    assert (plan.boot, plan.image, plan.cloud_init.ssh_authorized_keys) == ("image", "ubuntu:noble", (ED25519,))

    def status() -> dict:
        (entry,) = json.loads(out.get_relation(rel.id).local_app_data["vms"])
        return entry

    assert (status()["status"], status()["message"]) == ("pending", "VM is booting; waiting for an address")
    provider.lease(plan.allocation.name, "10.0.0.42")
    out = c.run(c.on.update_status(), out)
    assert (status()["status"], status()["addresses"], status()["login_user"]) == ("ready", ["10.0.0.42"], "ubuntu")
    assert len(provider.composed) == 1


def test_a_bad_relation_image_blocks_naming_the_option(provider, machine):
    c = charm_context()
    out = c.run(c.on.config_changed(), testing.State(config={**CONFIG, "relation-image": "/etc/shadow"}))
    assert out.unit_status.name == "blocked" and "relation-image" in out.unit_status.message
    assert provider.composed == []
