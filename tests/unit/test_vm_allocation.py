"""The vm_allocation interface library: models, validation, the requirer side and its events."""

from __future__ import annotations

import json

import ops
import pytest
from ops import testing
from pydantic import ValidationError

from charms.vm_host.v0 import vm_allocation as lib
from charms.vm_host.v0.vm_allocation import (
    VmAllocationProvider,
    VmAllocationRequirer,
    VmRequestSpec,
    VmStatus,
    parse_requests,
    parse_size,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@host"


def test_library_metadata():
    assert len(lib.LIBID) == 32 and int(lib.LIBID, 16)
    assert (lib.LIBAPI, lib.LIBPATCH) == (0, 4)
    assert lib.PYDEPS == ["pydantic>=2"]


def test_library_is_standalone():
    with open(lib.__file__) as fh:
        src = fh.read()
    assert "vmhost" not in src.replace("vm-host", "").replace("vm_host", "")


@pytest.mark.parametrize(
    "value, expected",
    [("8G", 8 * 1024**3), ("512MiB", 512 * 1024**2), ("1GB", 10**9), ("2048", 2048 * 1024**2), (4096, 4096)],
)
def test_parse_size(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["", "8Q", "-1G", "1.5G", True, None, [1]])
def test_parse_size_refuses(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_spec_fields_absent_are_none_and_unknown_are_ignored():
    s = VmRequestSpec.model_validate({"id": "a", "memory": "2G", "flavour": "large", "pinned_cores": True})
    assert s.cores is None and s.storage is None and s.memory == 2 * 1024**3 and s.pinned_cores == "auto"
    assert not hasattr(s, "flavour")
    assert s.to_databag() == {"id": "a", "memory": 2 * 1024**3, "pinned_cores": "auto"}


@pytest.mark.parametrize("value", [0, 65, "2", True, 1.5])
def test_spec_numa_nodes_is_a_bounded_whole_number(value):
    assert VmRequestSpec.model_validate({"id": "a", "numa_nodes": 2}).numa_nodes == 2
    with pytest.raises(ValidationError, match="numa_nodes"):
        VmRequestSpec.model_validate({"id": "a", "numa_nodes": value})


def test_secrets_stay_out_of_repr_and_errors():
    s = VmRequestSpec(id="a", user_data="password: hunter2", ssh_authorized_keys=[KEY])
    assert "hunter2" not in repr(s) and "AAAAC3" not in repr(s)
    entries, _ = parse_requests([{"id": "b", "user_data": "hunter2" * 20000}])
    assert "hunter2" not in entries[0].error and "user_data" in entries[0].error


def test_parse_requests_collapses_replays_and_rejects_conflicts_and_excess():
    same = {"id": "a", "cores": 2}
    entries, err = parse_requests([same, dict(same), {"id": "b"}, {"id": "b", "cores": 3}])
    assert err is None
    assert [(e.id, e.spec is not None) for e in entries] == [("a", True), ("b", False)]
    assert "more than once" in entries[1].error
    entries, err = parse_requests([{"id": f"r{i}"} for i in range(5)], max_requests=3)
    assert [(e.id, e.error) for e in entries] == [("r0", None), ("r1", None), ("r2", None)]
    assert "5 entries, at most 3" in err
    assert parse_requests({"id": "a"})[1] and parse_requests(None) == ([], None)


# ---------------------------------------------------------------------------------------------
# Requirer through ops.testing

META = {"name": "client", "requires": {"vm-host": {"interface": "vm_allocation"}}}
SEEN: list[tuple[str, str, str | None]] = []


class ClientCharm(ops.CharmBase):
    def __init__(self, framework):
        super().__init__(framework)
        self.vms = VmAllocationRequirer(self, "vm-host")
        framework.observe(self.vms.on.vm_ready, self._ready)
        framework.observe(self.vms.on.vm_failed, self._failed)
        framework.observe(self.on.config_changed, self._ask)

    def _ready(self, e):
        SEEN.append(("ready", e.request_id, e.name))

    def _failed(self, e):
        SEEN.append(("failed", e.request_id, e.message))

    def _ask(self, _):
        self.vms.request_vm("web-0", cores=2, memory="4G", interfaces="eth0:space=public", ssh_authorized_keys=[KEY])
        self.vms.request_vm("web-0", cores=2, memory="4G", interfaces="eth0:space=public", ssh_authorized_keys=[KEY])
        self.vms.request_vm("db-0", cores=4, memory=8 * 1024**3)


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()


def ctx():
    return testing.Context(ClientCharm, meta=META)


def test_requirer_writes_validated_requests_once():
    r = testing.Relation("vm-host", remote_app_name="vm-host")
    out = ctx().run(ctx().on.config_changed(), testing.State(leader=True, relations=[r]))
    reqs = json.loads(out.get_relation(r.id).local_app_data["requests"])
    assert [q["id"] for q in reqs] == ["web-0", "db-0"]
    assert reqs[0]["memory"] == 4 * 1024**3 and reqs[0]["ssh_authorized_keys"] == [KEY]
    # the provider library reads back exactly these, all valid
    entries, err = parse_requests(reqs)
    assert err is None and all(e.spec is not None for e in entries)


def test_only_the_leader_can_request():
    r = testing.Relation("vm-host", remote_app_name="vm-host")
    with pytest.raises(testing.errors.UncaughtCharmError, match="leader"):
        ctx().run(ctx().on.config_changed(), testing.State(leader=False, relations=[r]))


def test_changed_and_withdrawn_requests():
    r = testing.Relation("vm-host", remote_app_name="vm-host")
    c = ctx()
    with c(c.on.config_changed(), testing.State(leader=True, relations=[r])) as mgr:
        mgr.run()
        vms = mgr.charm.vms
        vms.request_vm("web-0", cores=8, memory="4G")  # changed
        assert vms.withdraw("db-0") is True
        assert vms.withdraw("db-0") is False
        assert [(s.id, s.cores) for s in vms.requests()] == [("web-0", 8)]
        with pytest.raises(ValidationError):
            vms.request_vm("Bad Id")
        with pytest.raises(ValidationError):
            vms.request_vm("x", cores=1000)


def test_events_fire_once_per_transition():
    def provider_data(*vms):
        entries = [{"id": i, "status": s, "name": n, "message": m, "addresses": ["10.0.0.5"]} for i, s, n, m in vms]
        return {"vms": json.dumps(entries)}

    r = testing.Relation(
        "vm-host", remote_app_name="vm-host", remote_app_data=provider_data(("a", "pending", None, None))
    )
    c = ctx()
    out = c.run(c.on.relation_changed(r), testing.State(relations=[r]))
    assert SEEN == []
    r2 = out.get_relation(r.id)
    r2 = testing.Relation(
        "vm-host",
        id=r.id,
        remote_app_name="vm-host",
        remote_app_data=provider_data(("a", "ready", "vm-1", None), ("b", "rejected", None, "over quota")),
    )
    out = c.run(c.on.relation_changed(r2), testing.State(relations=[r2], stored_states=out.stored_states))
    assert SEEN == [("ready", "a", "vm-1"), ("failed", "b", "over quota")]
    out = c.run(c.on.relation_changed(r2), testing.State(relations=[r2], stored_states=out.stored_states))
    assert len(SEEN) == 2  # nothing changed: no new events


def test_statuses_tolerate_unknown_fields_and_garbage():
    r = testing.Relation(
        "vm-host",
        remote_app_name="vm-host",
        remote_app_data={"vms": json.dumps([{"id": "a", "status": "ready", "future": 1}]), "other": "x"},
    )
    c = ctx()
    with c(c.on.update_status(), testing.State(relations=[r])) as mgr:
        assert mgr.charm.vms.vm("a").status == "ready"
    bad = testing.Relation(
        "vm-host", remote_app_name="vm-host", remote_app_data={"vms": json.dumps([{"id": "a", "status": "odd"}])}
    )
    with c(c.on.update_status(), testing.State(relations=[bad])) as mgr:
        assert mgr.charm.vms.statuses() == {}


# ---------------------------------------------------------------------------------------------
# Remote data is decoded totally

DEEP = "[" * 1000 + "]" * 1000


@pytest.mark.parametrize(
    "value, words",
    [
        (DEEP, "nested too deeply"),
        ("[" * (lib.MAX_DEPTH + 1) + "]" * (lib.MAX_DEPTH + 1), "nested too deeply"),
        ("x" * (lib.MAX_FIELD_BYTES + 1), f"at most {lib.MAX_FIELD_BYTES}"),
        ("{not json", "not valid JSON"),
        ("1" * 5000, "not valid JSON"),  # past Python's int-from-string limit
        (b"[]", "not a string"),
    ],
    ids=["deep", "too-deep", "megabytes", "invalid", "huge-int", "bytes"],
)
def test_decode_json_turns_every_bad_value_into_one_bounded_sentence(value, words):
    with pytest.raises(ValueError, match=words) as e:
        lib.decode_json(value)
    assert len(str(e.value)) < 100


def test_decode_json_keeps_what_is_within_bounds():
    depth = lib.MAX_DEPTH
    assert lib.decode_json("[" * depth + "]" * depth) is not None
    assert lib.decode_json(None) is None
    assert lib.decode_json('[{"id": "a"}]') == [{"id": "a"}]


def test_validation_errors_name_the_first_few_fields_only():
    bad = {"id": "a", "cores": "x", "memory": "x", "pinned_cores": 5, "hugepages_backed": 3, "image": "/x"}
    entries, _ = parse_requests([bad])
    assert "cores" in entries[0].error and "and 2 more" in entries[0].error
    assert len(entries[0].error) <= lib.MAX_MESSAGE + 20


def test_a_request_may_list_at_most_max_interfaces():
    ok = ";".join(f"eth{i}:" for i in range(lib.MAX_INTERFACES))
    assert VmRequestSpec(id="a", interfaces=ok).interfaces == ok
    with pytest.raises(ValidationError, match="more than 16 interfaces"):
        VmRequestSpec(id="a", interfaces=ok + ";eth99:")


def test_statuses_are_read_entry_by_entry_and_capped():
    good = {"id": "a", "status": "ready"}
    raw = [good, {"id": "b", "status": "odd"}, {"id": "c", "status": "failed", "message": "m" * 5000}, "junk"]
    raw += [{"id": "d", "status": "ready", "addresses": ["10.0.0.1"] * 17}, {"id": "e", "status": "pending"}]
    assert sorted(lib.parse_statuses(raw)) == ["a", "e"]
    many = [{"id": f"r{i}", "status": "pending"} for i in range(10_000)]
    assert len(lib.parse_statuses(many)) == lib.MAX_REQUESTS
    assert lib.parse_statuses({"id": "a"}) == {} and lib.parse_statuses(None) == {}


@pytest.mark.parametrize(
    "vms",
    [
        DEEP,
        "x" * (lib.MAX_FIELD_BYTES + 1),
        json.dumps([{"id": f"r{i}", "status": "failed", "message": "no"} for i in range(10_000)]),
        json.dumps([{"id": 10**400, "status": float("nan")}]),
        json.dumps({"vms": "nested"}),
        '[{"id": "\\udc80", "status": "ready"}]',
    ],
    ids=["deep", "megabytes", "10k-statuses", "huge-int-nan", "wrong-type", "lone-surrogate"],
)
def test_requirer_survives_any_provider_payload_and_fires_bounded_events(vms):
    r = testing.Relation("vm-host", remote_app_name="vm-host", remote_app_data={"vms": vms})
    c = ctx()
    out = c.run(c.on.relation_changed(r), testing.State(relations=[r]))  # raised RecursionError before
    assert len(SEEN) <= lib.MAX_REQUESTS
    with c(c.on.update_status(), out) as mgr:
        assert len(mgr.charm.vms.statuses()) <= lib.MAX_REQUESTS


def test_requirer_reads_its_own_unreadable_list_as_empty_and_rewrites_it():
    r = testing.Relation("vm-host", remote_app_name="vm-host", local_app_data={"requests": DEEP})
    c = ctx()
    with c(c.on.update_status(), testing.State(leader=True, relations=[r])) as mgr:
        assert mgr.charm.vms.requests() == []
        mgr.charm.vms.request_vm("a")
        assert [s.id for s in mgr.charm.vms.requests()] == ["a"]


def test_requirer_refuses_to_write_more_than_the_provider_reads():
    r = testing.Relation("vm-host", remote_app_name="vm-host")
    c = ctx()
    with c(c.on.update_status(), testing.State(leader=True, relations=[r])) as mgr:
        big = "#cloud-config\n" + "x" * (lib.MAX_USER_DATA - 20)
        with pytest.raises(ValueError, match="at most 1048576"):
            for i in range(lib.MAX_REQUESTS):
                mgr.charm.vms.request_vm(f"r{i}", user_data=big)
        assert 10 < len(mgr.charm.vms.requests()) < lib.MAX_REQUESTS


@pytest.mark.parametrize(
    "field, value",
    [
        ("user_data", "#cloud-config\n\ud800"),
        ("user_data", "a\x00b"),
        ("ssh_authorized_keys", [KEY + " \udc80"]),
        ("ssh_authorized_keys", [KEY + "\x00"]),
    ],
    ids=["user-data-surrogate", "user-data-nul", "key-surrogate", "key-nul"],
)
def test_text_that_cannot_be_written_out_is_rejected_naming_the_field(field, value):
    entries, _ = parse_requests([{"id": "a", field: value}])
    assert entries[0].spec is None and field in entries[0].error


class HostCharm(ops.CharmBase):
    """The provider side as a charm of its own would use it: read the requests, answer each."""

    def __init__(self, framework):
        super().__init__(framework)
        self.vms = VmAllocationProvider(self, "vm-allocation")
        framework.observe(self.on["vm-allocation"].relation_changed, self._serve)

    def _serve(self, event):
        parsed, error = self.vms.requests(event.relation)
        self.vms.publish(event.relation, [VmStatus(id=p.id, status="pending") for p in parsed], error=error)


def test_both_sides_run_on_ops_older_than_2_23(monkeypatch):
    # The library needs only ops and pydantic; Relation.load and Relation.save are only in ops 2.23 and later.
    monkeypatch.delattr(ops.Relation, "load")
    monkeypatch.delattr(ops.Relation, "save")
    c = testing.Context(HostCharm, meta={"name": "host", "provides": {"vm-allocation": {"interface": "vm_allocation"}}})
    r = testing.Relation("vm-allocation", remote_app_data={"requests": json.dumps([{"id": "a"}, {"id": "Bad"}])})
    out = c.run(c.on.relation_changed(r), testing.State(leader=True, relations=[r]))
    data = out.get_relation(r.id).local_app_data
    assert [s["id"] for s in json.loads(data["vms"])] == ["a", "#1"] and json.loads(data["error"]) is None
    test_requirer_writes_validated_requests_once()
