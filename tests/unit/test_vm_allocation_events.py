"""The requirer side of vm_allocation: vm_ready, vm_changed, vm_released, each once per change; the
provider's data decoded totally; the module docstring's example run exactly as written."""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import replace

import ops
import pytest
from ops import testing

from charms.vm_host.v0 import vm_allocation as lib
from charms.vm_host.v0.vm_allocation import VmAllocationRequirer, VmHostKey
from tests.unit.ssh_keys import ECDSA, ED25519, host_key

META = {"name": "client", "requires": {"vm-host": {"interface": "vm_allocation"}}}
SEEN: list[tuple] = []
KEY = host_key(ED25519).to_dict()
KEY2 = host_key(ECDSA).to_dict()


class ClientCharm(ops.CharmBase):
    def __init__(self, framework):
        super().__init__(framework)
        self.vms = VmAllocationRequirer(self, "vm-host")
        for source in (self.vms.on.vm_ready, self.vms.on.vm_changed, self.vms.on.vm_released, self.vms.on.vm_failed):
            framework.observe(source, self._seen)

    def _seen(self, event):
        kind = type(event).__name__.removeprefix("Vm").removesuffix("Event").lower()
        SEEN.append((kind, event.request_id, event.name, tuple(event.addresses)))
        assert isinstance(event.host_unit, str | None) and isinstance(event.login_user, str | None)
        assert all(isinstance(key, VmHostKey) for key in event.host_keys)


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()


def entry(id="a", status="ready", name="vm-1", addresses=("10.0.0.5",), **kw) -> dict:
    return {
        "id": id,
        "status": status,
        "name": name,
        "unit": "vm-host/0",
        "addresses": list(addresses),
        "mac_addresses": ["52:54:00:00:00:01"],
        "login_user": "ubuntu",
        "host_keys": [KEY],
        **kw,
    }


class Requirer:
    """One requirer unit across hooks: the provider's data changes, the unit's stored state carries over."""

    def __init__(self):
        self.ctx = testing.Context(ClientCharm, meta=META)
        self.relation = testing.Relation("vm-host", remote_app_name="vm-host")
        self.state = testing.State(relations=[self.relation])

    def provider(self, *entries, raw: str | None = None) -> list[tuple]:
        """vm-host publishes `entries` (or `raw`); the events the unit's relation-changed hook fired."""
        data = {"vms": raw if raw is not None else json.dumps(list(entries))}
        self.relation = replace(self.relation, remote_app_data=data)
        return self._run(self.ctx.on.relation_changed(self.relation))

    def broken(self) -> list[tuple]:
        return self._run(self.ctx.on.relation_broken(self.relation))

    def _run(self, event) -> list[tuple]:
        before = len(SEEN)
        self.state = self.ctx.run(event, replace(self.state, relations=[self.relation]))
        return SEEN[before:]


def test_ready_fires_once_when_the_vm_has_an_address_and_a_replayed_hook_fires_nothing():
    unit = Requirer()
    assert unit.provider(entry(status="pending", addresses=(), message="VM is booting; waiting for an address")) == []
    assert unit.provider(entry(status="ready", addresses=())) == []  # an older provider's "ready": not usable yet
    assert unit.provider(entry()) == [("ready", "a", "vm-1", ("10.0.0.5",))]
    assert unit.provider(entry()) == []  # the same data again (a replayed or unrelated hook)
    assert unit.provider(entry(message="a note")) == []  # a message is no change of the machine


@pytest.mark.parametrize(
    "change",
    [
        {"addresses": ["10.0.0.6"]},
        {"addresses": ["10.0.0.5", "fd00::5"]},
        {"mac_addresses": ["52:54:00:00:00:02"]},
        {"host_keys": [KEY, KEY2]},
        {"login_user": "admin"},
    ],
    ids=["address", "added-address", "mac", "host-key", "login-user"],
)
def test_changed_fires_once_per_change_of_a_ready_vm(change):
    unit = Requirer()
    unit.provider(entry())
    events = unit.provider(entry(**change))
    assert [e[0] for e in events] == ["changed"]
    assert unit.provider(entry(**change)) == []


def test_order_alone_is_no_change():
    unit = Requirer()
    unit.provider(entry(addresses=("10.0.0.5", "10.0.0.6"), host_keys=[KEY, KEY2]))
    assert unit.provider(entry(addresses=("10.0.0.6", "10.0.0.5"), host_keys=[KEY2, KEY])) == []


def test_changed_carries_the_new_and_the_previous_values():
    got = []

    class Charm(ClientCharm):
        def _seen(self, event):
            if isinstance(event, lib.VmChangedEvent):
                got.append((event.addresses, event.previous_addresses, event.previous_mac_addresses))

    ctx = testing.Context(Charm, meta=META)
    rel = testing.Relation("vm-host", remote_app_name="vm-host", remote_app_data={"vms": json.dumps([entry()])})
    out = ctx.run(ctx.on.relation_changed(rel), testing.State(relations=[rel]))
    rel = replace(rel, remote_app_data={"vms": json.dumps([entry(addresses=("10.0.0.9",))])})
    ctx.run(ctx.on.relation_changed(rel), replace(out, relations=[rel]))
    assert got == [(["10.0.0.9"], ["10.0.0.5"], ["52:54:00:00:00:01"])]


def test_a_vm_that_goes_back_to_booting_fires_nothing_until_it_is_ready_again():
    unit = Requirer()
    unit.provider(entry())
    assert unit.provider(entry(status="pending", addresses=())) == []
    assert unit.provider(entry()) == []  # back with the same address: nothing changed for the requirer
    assert [e[0] for e in unit.provider(entry(status="pending", addresses=()))] == []
    assert unit.provider(entry(addresses=("10.0.0.7",))) == [("changed", "a", "vm-1", ("10.0.0.7",))]


def test_released_fires_once_when_the_vm_goes_away():
    unit = Requirer()
    unit.provider(entry("a"), entry("b", name="vm-2"))
    assert unit.provider(entry("b", name="vm-2")) == [("released", "a", "vm-1", ("10.0.0.5",))]
    assert unit.provider(entry("b", name="vm-2")) == []
    assert unit.provider() == [("released", "b", "vm-2", ("10.0.0.5",))]
    assert unit.provider() == []


def test_a_new_vm_for_the_same_request_is_a_release_then_a_ready():
    unit = Requirer()
    unit.provider(entry())
    assert unit.provider(entry(name="vm-9")) == [
        ("released", "a", "vm-1", ("10.0.0.5",)),
        ("ready", "a", "vm-9", ("10.0.0.5",)),
    ]


def test_a_failed_request_releases_its_vm_and_says_it_failed_once():
    unit = Requirer()
    unit.provider(entry())
    events = unit.provider(entry(status="failed", name=None, addresses=(), message="the hypervisor could not"))
    assert [e[0] for e in events] == ["released", "failed"]
    assert unit.provider(entry(status="failed", name=None, addresses=(), message="the hypervisor could not")) == []


def test_a_broken_relation_releases_every_ready_vm_once():
    unit = Requirer()
    unit.provider(entry("a"), entry("b", name="vm-2"), entry("c", status="pending", name="vm-3", addresses=()))
    assert sorted(e[1] for e in unit.broken()) == ["a", "b"]
    assert unit.state.stored_states  # and forgets them: a new relation starts afresh
    owner = "ClientCharm/VmAllocationRequirer[vm-host-requirer]"
    (stored,) = (s for s in unit.state.stored_states if s.owner_path == owner)
    assert stored.content["known"] == {}


@pytest.mark.parametrize(
    "raw",
    ["{not json", "x" * (lib.MAX_FIELD_BYTES + 1), json.dumps({"vms": "nested"}), "[" * 1000 + "]" * 1000],
    ids=["invalid", "megabytes", "not-a-list", "deep"],
)
def test_an_unreadable_list_fires_nothing_and_releases_nothing(raw):
    unit = Requirer()
    unit.provider(entry())
    assert unit.provider(raw=raw) == []
    assert unit.provider(entry()) == []  # still known as ready: no second vm_ready


def test_an_unreadable_entry_releases_nothing_until_the_list_is_readable():
    unit = Requirer()
    unit.provider(entry("a"), entry("b", name="vm-2"))
    hostile_b = entry("b", name="vm-2", addresses=("10.0.0.5; rm -rf /",))
    assert unit.provider(entry("a"), hostile_b) == []  # b cannot be read: it may still be there
    assert unit.provider(entry("a")) == [("released", "b", "vm-2", ("10.0.0.5",))]


# ---------------------------------------------------------------------------------------------
# The provider is untrusted from the requirer's side: every field decoded and bounded


PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ==\n-----END OPENSSH PRIVATE KEY-----"


@pytest.mark.parametrize(
    "field",
    [
        {"addresses": ["10.0.0.5; rm -rf /"]},
        {"addresses": ["10.0.0.5/24"]},
        {"addresses": ["10.0.0.1"] * (lib.MAX_ADDRESSES + 1)},
        {"mac_addresses": ["52:54:00:00:00:01 && id"]},
        {"login_user": "root; id"},
        {"login_user": "u" * 40},
        {"host_keys": [{**KEY, "public_key": PRIVATE}]},
        {"host_keys": [{**KEY, "public_key": KEY["public_key"] + " comment"}]},
        {"host_keys": [{**KEY, "fingerprint": KEY2["fingerprint"]}]},
        {"host_keys": [{**KEY, "algorithm": "ssh-rsa"}]},
        {"host_keys": [{**KEY2, "public_key": "ecdsa-sha2-nistp256 " + "A" * 3000}]},
        {"host_keys": [KEY] * (lib.MAX_HOST_KEYS + 1)},
    ],
    ids=[
        "address-shell",
        "address-prefix",
        "too-many-addresses",
        "mac-shell",
        "user-shell",
        "user-long",
        "private-key",
        "key-comment",
        "wrong-fingerprint",
        "wrong-algorithm",
        "key-too-long",
        "too-many-keys",
    ],
)
def test_a_status_with_any_hostile_field_is_left_out_whole(field):
    assert lib.parse_statuses([entry(**field), entry("b")]).keys() == {"b"}
    unit = Requirer()
    assert unit.provider(entry(**field)) == []


def test_a_host_key_gives_its_known_hosts_line():
    (st,) = lib.parse_statuses([entry()]).values()
    (key,) = st.host_keys
    assert key.known_hosts_line("10.0.0.5") == f"10.0.0.5 {KEY['public_key']}"
    assert key.fingerprint == KEY["fingerprint"]


def test_a_unit_upgraded_from_libpatch_2_does_not_announce_its_ready_vms_again():
    ctx = testing.Context(ClientCharm, meta=META)
    rel = testing.Relation("vm-host", remote_app_name="vm-host", remote_app_data={"vms": json.dumps([entry()])})
    legacy = testing.StoredState(
        owner_path="ClientCharm/VmAllocationRequirer[vm-host-requirer]", content={"seen": {str(rel.id): {"a": "ready"}}}
    )
    out = ctx.run(ctx.on.relation_changed(rel), testing.State(relations=[rel], stored_states=[legacy]))
    assert SEEN == []
    rel = replace(rel, remote_app_data={"vms": "[]"})
    ctx.run(ctx.on.relation_changed(rel), replace(out, relations=[rel]))
    assert SEEN == [("released", "a", "vm-1", ("10.0.0.5",))]


# ---------------------------------------------------------------------------------------------
# The module docstring's example, exactly as written


def docstring_example() -> str:
    """The indented block after "Requirer usage::" in the library's docstring."""
    doc = lib.__doc__
    block = re.search(r"Requirer usage::\n\n((?:    .*\n|\n)+)", doc)
    assert block, "the library docstring has no 'Requirer usage::' example"
    return textwrap.dedent(block.group(1))


def test_the_docstring_example_runs_as_written():
    namespace: dict = {"__name__": "example_charm"}
    exec(compile(docstring_example(), "vm_allocation.py docstring", "exec"), namespace)
    ctx = testing.Context(namespace["MyCharm"], meta=META)
    rel = testing.Relation("vm-host", remote_app_name="vm-host")

    # the leader asks for its VM as soon as the relation exists
    out = ctx.run(ctx.on.relation_created(rel), testing.State(leader=True, relations=[rel]))
    (request,) = json.loads(out.get_relation(rel.id).local_app_data["requests"])
    assert request["id"] == "web-0" and request["image"] == "ubuntu:24.04"
    assert request["ssh_authorized_keys"] == [namespace["MY_KEY"]]
    assert lib.parse_requests([request])[0][0].spec is not None  # what vm-host reads back is valid

    # vm-host answers ready: the example says where to log in
    rel = replace(rel, remote_app_data={"vms": json.dumps([entry("web-0")])})
    out = ctx.run(ctx.on.relation_changed(rel), replace(out, relations=[rel]))
    assert out.unit_status == testing.ActiveStatus("web-0: ssh ubuntu@10.0.0.5")
    assert any(f"host keys {KEY['fingerprint']}" in line.message for line in ctx.juju_log)

    # then released
    rel = replace(rel, remote_app_data={"vms": "[]"})
    out = ctx.run(ctx.on.relation_changed(rel), replace(out, relations=[rel]))
    assert out.unit_status == testing.WaitingStatus("web-0 was released")


def test_a_vm_made_again_on_another_unit_is_a_release_then_a_ready():
    # vm-host names a request's VM alike on every unit: another unit means another machine (disk, host keys).
    unit = Requirer()
    unit.provider(entry())
    moved = entry(unit="vm-host/1", addresses=("10.0.0.8",), host_keys=[KEY2])
    assert unit.provider(moved) == [("released", "a", "vm-1", ("10.0.0.5",)), ("ready", "a", "vm-1", ("10.0.0.8",))]
    assert unit.provider(moved) == []


def test_the_events_carry_the_vm_host_application_and_log_no_false_juju_bug_warning():
    unit = Requirer()
    unit.provider(entry("a"), entry("b", name="vm-2"))
    unit.provider(entry("a", addresses=("10.0.0.6",)))
    unit.broken()
    assert not [log.message for log in unit.ctx.juju_log if "expected" in log.message]  # "'app' expected but not..."
