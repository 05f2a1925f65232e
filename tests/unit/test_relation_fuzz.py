"""Arbitrary relation data through ops.testing: no hook of the provider charm or the requirer library raises.

Every databag a remote model (or a broken peer) can write is drawn: arbitrary JSON, arbitrary strings
(lone surrogates, NUL, deep nesting, megabytes, huge integers, NaN), request-shaped objects with
arbitrary values in every field, in app and unit databags of `vm-allocation` and of the peer relation.
The provider is the real VmHostCharm (an in-memory hypervisor, a temp-dir machine) on every event
that reads relation data; the requirer is a small charm around VmAllocationRequirer. CI runs these
on the derandomized 'ci' profile (tests/conftest.py).
"""

from __future__ import annotations

import json
from collections import Counter

import ops
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ops import testing

import charm
from charm import VmHostCharm
from charms.vm_host.v0.vm_allocation import MAX_MESSAGE, MAX_REQUESTS, VmAllocationRequirer
from tests.unit.relation_requests import DhcpProvider
from tests.unit.ssh_keys import ED25519, host_key
from tests.unit.test_charm import TOPOLOGY, Machine
from vmhost.model import Allocation, VmInfo

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
COUNTS: Counter = Counter()
MODEL = "aaaaaaaa-1111-4111-8111-000000000001"

# ---------------------------------------------------------------------------------------------
# Strategies

PLAUSIBLE_FIELDS = ["id", "cores", "memory", "pinned_cores", "hugepages_backed", "hugepage_size", "storage"]
PLAUSIBLE_FIELDS += ["interfaces", "image", "ssh_authorized_keys", "user_data", "tags"]
TWENTY = ";".join(f"e{i}:" for i in range(20))

FIELDS = [*PLAUSIBLE_FIELDS, "status", "message", "unit", "name", "mac_addresses", "addresses", "login_user"]
FIELDS += ["host_keys", "algorithm", "public_key", "fingerprint"]
HOST_KEY = host_key(ED25519).to_dict()
ODD_TEXT = st.sampled_from(["", "\udc80", "\ud800x", "\x00", "a\nb", "é", "🙂", "a" * 300, "../../etc/passwd"])
text = st.text(max_size=20) | ODD_TEXT
keys = st.sampled_from(FIELDS) | text
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([-1, 0, 2**63, 10**300, -(10**300)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | text
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(keys, c, max_size=4), max_leaves=12
)

PLAUSIBLE = {
    "id": st.sampled_from(["a", "b", "web-0", "A", "-x", "#1", "a" * 64]),
    "cores": st.sampled_from([1, 2, 0, 257, "2", 1.5, True]),
    "memory": st.sampled_from(["512M", "1G", "64M", "1M", "5T", "9" * 20, 2**30, 10**400, "x"]),
    "pinned_cores": st.sampled_from(["auto", True, False, "0-3", [0, 1]]),
    "hugepages_backed": st.booleans(),
    "hugepage_size": st.sampled_from(["2M", "1G", "4M", "2048K"]),
    "storage": st.sampled_from(["root:10", "root:10,data:20(ssd)", "root:" + "9" * 400, "root:0", "x:y"]),
    "interfaces": st.sampled_from(
        ["eth0:", "eth0:space=public", "eth0:name=br0,ip=10.0.0.5", "eth0:ip=10.0.0.0", "eth0:type=sriov", TWENTY]
    ),
    "image": st.sampled_from(["ubuntu:24.04", "noble", "../etc", "a/b", "", "ubuntu:..", "ubuntu:24.04\n"]),
    "ssh_authorized_keys": st.sampled_from([[ED25519], ["ssh-ed25519 AAAA me"], ["x"], [], ED25519, [ED25519] * 40]),
    "user_data": st.sampled_from(["#cloud-config\n{}", "x" * 70_000]),
    "tags": st.sampled_from([["web"], ["a b"], ["x"] * 40]),
}
request_like = st.fixed_dictionaries(
    {}, optional={f: (PLAUSIBLE[f] | json_values) for f in PLAUSIBLE} | {"status": json_values}
)
valid_request = st.fixed_dictionaries(
    {"id": st.sampled_from(["a", "b", "web-0"])},
    optional={
        "cores": st.integers(1, 4),
        "memory": st.sampled_from(["512M", "1G", "6G"]),
        "pinned_cores": st.just("auto"),
        "hugepages_backed": st.booleans(),
        "storage": st.just("root:10"),
        "interfaces": st.sampled_from(["eth0:", "eth0:name=br0", "eth0:name=br0,ip=10.0.0.9"]),
    },
)
status_like = st.fixed_dictionaries(
    {"id": PLAUSIBLE["id"], "status": st.sampled_from(["pending", "ready", "failed", "rejected", "odd"])},
    optional={
        "message": text | json_values,
        "unit": st.just("vm-host/0") | json_values,
        "name": st.just("vm-1") | json_values,
        "mac_addresses": st.lists(st.just("52:54:00:00:00:01"), max_size=2) | json_values,
        "addresses": st.lists(st.sampled_from(["10.0.0.5", "fd00::5", "10.0.0.5; id"]), max_size=2) | json_values,
        "login_user": st.sampled_from(["ubuntu", "root; id", None]) | json_values,
        "host_keys": st.lists(
            st.sampled_from(
                [HOST_KEY, {**HOST_KEY, "fingerprint": "SHA256:" + "A" * 43}, {**HOST_KEY, "public_key": "x"}]
            )
            | json_values,
            max_size=5,
        )
        | json_values,
    },
)
# Well-formed ready statuses that differ between hooks, so ready, changed and released fire too.
usable_status = st.builds(
    lambda rid, name, address: {
        "id": rid,
        "status": "ready",
        "name": name,
        "addresses": [address],
        "login_user": "ubuntu",
        "host_keys": [HOST_KEY],
    },
    st.sampled_from(["a", "b"]),
    st.sampled_from(["vm-1", "vm-2"]),
    st.sampled_from(["10.0.0.5", "10.0.0.6"]),
)
BIG = [
    "x" * (1024 * 1024 + 1),
    json.dumps([{"id": "a", "user_data": "x" * (1024 * 1024)}]),
    json.dumps([{"id": f"r{i}", "cores": 1, "memory": "64M"} for i in range(MAX_REQUESTS + 30)]),
    json.dumps([{"id": f"r{i}", "status": "failed", "message": "m" * 900} for i in range(500)]),
]
databag_value = st.one_of(
    json_values.map(json.dumps),
    st.lists(request_like, max_size=5).map(json.dumps),
    st.lists(status_like, max_size=5).map(json.dumps),
    st.dictionaries(text, status_like | request_like, max_size=3).map(json.dumps),
    text,
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(["null", "NaN", "[NaN]", "1e999", "-0", "1" * 5000, '"\\udc80"', "[" * 100_000]),
    st.sampled_from(BIG),
)
databag = st.dictionaries(
    st.sampled_from(["requests", "vms", "error", "results", "capacity", "assignments"]) | text,
    databag_value,
    max_size=4,
)


def with_key(key: str, shaped: st.SearchStrategy) -> st.SearchStrategy:
    """A databag that mostly holds `key` in its expected shape (else anything), among other keys."""
    return st.builds(lambda bag, value: {**bag, key: value}, databag, shaped.map(json.dumps) | databag_value)


OWNERS = st.sampled_from([f"{MODEL}/client0/a", f"{MODEL}/client0/b", f"{MODEL}/client1/web-0"]) | text
result_like = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(["ready", "failed", "pending", "rejected", "odd"]),
        "cores": st.integers(-1, 9) | scalars,
        "memory": st.sampled_from([2**30, 0, -1, 2**70]) | scalars,
        "name": st.sampled_from(["vm-x", "vm-a"]) | text,
        "message": text,
        "addresses": json_values,
        "mac_addresses": json_values,
        "login_user": text | json_values,
        "host_keys": st.lists(st.just(HOST_KEY) | json_values, max_size=5) | json_values,
    },
)
capacity_like = st.fixed_dictionaries(
    {},
    optional={"threads": scalars, "vcpus": scalars, "memory": scalars, "hugepages": json_values}
    | {"hugepages": st.dictionaries(st.sampled_from(["2M", "1G", "4M"]), scalars)},
)
UNITS = st.sampled_from(["vm-host/0", "vm-host/1", "vm-host/9"])


# ---------------------------------------------------------------------------------------------
# Provider: the real charm

PROVIDER_EVENTS = [
    "relation_changed",
    "relation_departed",
    "relation_broken",
    "peer_changed",
    "peer_departed",
    "update_status",
    "leader_elected",
    "config_changed",
    "start",
    "upgrade_charm",
]


def _relation_vm(app: str, rid: str) -> VmInfo:
    """A relation VM as a hypervisor reports it: some have an address (ready), some are still booting."""
    owner = f"{MODEL}/{app}/{rid}"
    return VmInfo(
        name=f"vm-{rid}",
        state="running",
        allocation=Allocation(f"vm-{rid}", 1, 64 * 1024**2, owner=owner),
        addresses=() if rid == "b" else ("10.0.0.9",),
        login_user="ubuntu",
        host_keys=(host_key(ED25519),),
    )


def _check_published(out: testing.State) -> None:
    for rel in out.relations:
        if rel.endpoint != "vm-allocation":
            continue
        data = rel.local_app_data
        assert len(data.get("error", "")) <= MAX_MESSAGE + 2
        if "vms" in data:
            vms = json.loads(data["vms"])
            assert len(vms) <= MAX_REQUESTS
            assert all(len(v.get("message") or "") <= MAX_MESSAGE for v in vms)
            assert all(v["addresses"] for v in vms if v["status"] == "ready")  # ready means it has an address
            COUNTS["provider ready"] += sum(v["status"] == "ready" for v in vms)


def test_arbitrary_relation_data_never_raises_in_a_provider_hook(monkeypatch, tmp_path):
    machine = Machine(tmp_path)
    holder: dict = {}
    monkeypatch.setattr(charm, "make_host", machine.host)
    monkeypatch.setattr(charm, "make_provider", lambda settings: holder["p"])
    monkeypatch.setattr(charm.machine_setup, "lxd_supports_vms", lambda client=None: True)

    @FUZZ
    @given(
        leader=st.booleans(),
        event=st.sampled_from(PROVIDER_EVENTS),
        app_bags=st.lists(
            with_key(
                "requests", st.lists(valid_request, max_size=4) | st.lists(valid_request | request_like, max_size=5)
            ),
            min_size=1,
            max_size=2,
        ),
        has_peer=st.booleans(),
        unit_bag=databag,
        peer_app=with_key("assignments", st.dictionaries(OWNERS, UNITS | json_values, max_size=3)),
        peer_unit=st.builds(
            lambda a, b: {**a, **b},
            with_key("results", st.dictionaries(OWNERS, result_like, max_size=3)),
            with_key("capacity", capacity_like),
        ),
        peer_local=with_key("results", st.dictionaries(OWNERS, result_like, max_size=3)),
        existing=st.lists(st.sampled_from(["a", "b", "web-0"]), max_size=2, unique=True),
    )
    def one(leader, event, app_bags, has_peer, unit_bag, peer_app, peer_unit, peer_local, existing):
        provider = DhcpProvider(TOPOLOGY)
        holder["p"] = provider
        for rid in existing:
            vm = _relation_vm("client0", rid)
            provider.vms[vm.name] = vm
        rels = [
            testing.Relation(
                "vm-allocation",
                remote_app_name=f"client{i}",
                remote_model_uuid=MODEL,
                remote_app_data=bag,
                remote_units_data={0: unit_bag},
            )
            for i, bag in enumerate(app_bags)
        ]
        peer = testing.PeerRelation(
            "vm-host-peers",
            local_app_data=peer_app,
            local_unit_data=peer_local,
            peers_data={1: peer_unit} if has_peer else {},
        )
        state = testing.State(leader=leader, relations=[*rels, peer], config={"backend": "libvirt"})
        c = testing.Context(VmHostCharm)
        on = c.on
        trigger = {
            "relation_changed": lambda: on.relation_changed(rels[0], remote_unit=0),
            "relation_departed": lambda: on.relation_departed(rels[0], remote_unit=0),
            "relation_broken": lambda: on.relation_broken(rels[0]),
            "peer_changed": lambda: on.relation_changed(peer, remote_unit=1),
            "peer_departed": lambda: on.relation_departed(peer, remote_unit=1, departing_unit=1),
        }.get(event, lambda: getattr(on, event)())()
        out = c.run(trigger, state)  # an exception in the hook fails the example
        COUNTS["provider hooks"] += 1
        COUNTS["provider composes"] += len(provider.composed)
        if leader:
            _check_published(out)
            out = c.run(c.on.update_status(), out)  # and the state it left is read again cleanly
            COUNTS["provider hooks"] += 1
            _check_published(out)
        COUNTS["provider examples"] += 1

    one()
    _report("provider", f"{COUNTS['provider composes']} VMs composed, {COUNTS['provider ready']} ready published")


# ---------------------------------------------------------------------------------------------
# Requirer: the library in a small charm

REQUIRER_META = {"name": "client", "requires": {"vm-host": {"interface": "vm_allocation"}}}


class ClientCharm(ops.CharmBase):
    def __init__(self, framework):
        super().__init__(framework)
        self.vms = VmAllocationRequirer(self, "vm-host")
        framework.observe(self.vms.on.vm_ready, self._seen)
        framework.observe(self.vms.on.vm_changed, self._seen)
        framework.observe(self.vms.on.vm_released, self._seen)
        framework.observe(self.vms.on.vm_failed, self._seen)
        framework.observe(self.on.update_status, self._read)
        framework.observe(self.on.config_changed, self._ask)

    def _seen(self, event):
        COUNTS["requirer events"] += 1
        assert len(event.message or "") <= MAX_MESSAGE and len(event.request_id) <= 64
        assert len(event.addresses) <= 16 and all(len(key.public_key) <= 2048 for key in event.host_keys)
        if type(event).__name__ == "VmReadyEvent":
            assert event.addresses and event.name  # ready means usable

    def _read(self, _):
        assert len(self.vms.statuses()) <= MAX_REQUESTS
        self.vms.vm("a")
        if self.unit.is_leader():
            self.vms.requests()

    def _ask(self, _):
        if self.unit.is_leader():
            try:
                self.vms.request_vm("web-0", cores=1, memory="1G")
            except ValueError as e:  # documented: the list is full (its own databag held 64+ entries)
                assert "at most" in str(e)
                COUNTS["requirer refused"] += 1
            self.vms.withdraw("a")


def test_arbitrary_relation_data_never_raises_in_the_requirer_library():
    @FUZZ
    @given(
        leader=st.booleans(),
        events=st.lists(
            st.sampled_from(["relation_changed", "relation_broken", "update_status", "config_changed"]),
            min_size=1,
            max_size=3,
        ),
        remote=st.lists(with_key("vms", st.lists(status_like | usable_status, max_size=5)), min_size=1, max_size=3),
        remote_unit=databag,
        local=databag,
    )
    def one(leader, events, remote, remote_unit, local):
        c = testing.Context(ClientCharm, meta=REQUIRER_META)
        rel_id = testing.Relation("vm-host").id
        state = testing.State(leader=leader)
        own = local  # this application's own databag: garbage at first, then what the library wrote
        for i, name in enumerate(events):
            # the provider's data changes between hooks; the library's stored state carries over
            rel = testing.Relation(
                "vm-host",
                id=rel_id,
                remote_app_name="vm-host",
                remote_app_data=remote[i % len(remote)],
                remote_units_data={0: remote_unit},
                local_app_data=own,
            )
            state = testing.State(leader=leader, relations=[rel], stored_states=state.stored_states)
            if name == "relation_changed":
                trigger = c.on.relation_changed(rel, remote_unit=0)
            elif name == "relation_broken":
                trigger = c.on.relation_broken(rel)
            elif name == "config_changed" and not leader:
                trigger = c.on.update_status()  # only a leader may write requests (a documented RuntimeError)
            else:
                trigger = getattr(c.on, name)()
            state = c.run(trigger, state)
            own = dict(state.get_relation(rel_id).local_app_data)
            COUNTS["requirer hooks"] += 1
            if name == "relation_broken":
                break
        COUNTS["requirer examples"] += 1

    one()
    _report("requirer", f"{COUNTS['requirer events']} events")


def _report(side: str, extra: str) -> None:
    """The figures for the record (shown with -s); every example ran its hooks without an exception."""
    examples, hooks = COUNTS[f"{side} examples"], COUNTS[f"{side} hooks"]
    print(f"\n{side} fuzz: {examples} examples, {hooks} hooks, {extra}, 0 exceptions")
    assert examples >= 50
