"""The vm-allocation provider through ops.testing: a tiny host charm around AllocationRelation, a real
VmHost and placement, and an in-memory provider standing in for the hypervisor."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import ops
import pytest
from ops import testing

from allocation_relation import HYPERVISOR_ERROR, AllocationRelation
from charm_config import CharmConfig
from tests.unit.fakes import FakeProvider
from tests.unit.hosts import GiB, synthetic_host
from tests.unit.relation_requests import DhcpProvider
from tests.unit.ssh_keys import ED25519, host_key
from vmhost.model import Allocation, HostKey, Nic, Policy, StoragePool, VmInfo
from vmhost.providers.base import ProviderError
from vmhost.providers.image_source import ImageError, ImageNotFound
from vmhost.service import VmHost

MODEL_A = "aaaaaaaa-1111-4111-8111-000000000001"
MODEL_B = "bbbbbbbb-2222-4222-8222-000000000002"
KEY = ED25519


def make_provider(host_cores: int = 4, memory: int = 16 * GiB, extra_nics: tuple[Nic, ...] = ()) -> DhcpProvider:
    """One node, SMT2, two bridges (br0 in space public), one pool."""
    return DhcpProvider(
        synthetic_host(
            nodes=1,
            cores_per_node=host_cores,
            threads_per_core=2,
            memory_per_node=memory,
            hugepages={"2M": 512},
            nics=(
                Nic(name="br0", kind="bridge", addresses=("10.20.0.1/24",), space="public"),
                Nic(name="br1", kind="bridge", addresses=("10.30.0.1/24",)),
                *extra_nics,
            ),
            storage_pools=(StoragePool(name="default", total=500 * 10**9),),
        )
    )


META = {
    "name": "vm-host",
    "provides": {"vm-allocation": {"interface": "vm_allocation"}},
    "peers": {"vm-host-peers": {"interface": "vm_host_peers"}},
}
ENV: dict = {}


class HostCharm(ops.CharmBase):
    def __init__(self, framework):
        super().__init__(framework)
        self.allocation = AllocationRelation(self, relation_name="vm-allocation", peer_name="vm-host-peers")
        for ev in (
            self.on["vm-allocation"].relation_changed,
            self.on["vm-allocation"].relation_broken,
            self.on["vm-host-peers"].relation_changed,
            self.on["vm-host-peers"].relation_departed,
            self.on.leader_elected,
            self.on.update_status,
            self.on.config_changed,
        ):
            framework.observe(ev, self._reconcile)

    def _reconcile(self, _event):
        self.allocation.reconcile(ENV["host"], CharmConfig.model_validate(vars(ENV["config"])))


@pytest.fixture
def provider(tmp_path):
    p = make_provider()
    ENV["host"] = VmHost(provider=p, policy=Policy(), lock_path=str(tmp_path / "lock"))
    ENV["config"] = SimpleNamespace(relation_quota="", allowed_networks="", space_bridges="public=br0 storage=br1")
    yield p
    ENV.clear()


def ctx(unit_id: int = 0) -> testing.Context:
    return testing.Context(HostCharm, meta=META, unit_id=unit_id)


def req(id: str, **kw) -> dict:
    return {"id": id, "cores": 1, "memory": "512M", **kw}


def rel(requests, *, app="client", model=MODEL_A, rid=None, raw=None) -> testing.Relation:
    data = {"requests": raw if raw is not None else json.dumps(requests)}
    kw = {"id": rid} if rid is not None else {}
    return testing.Relation("vm-allocation", remote_app_name=app, remote_model_uuid=model, remote_app_data=data, **kw)


def statuses(state: testing.State, relation: testing.Relation) -> dict[str, dict]:
    out = state.get_relation(relation.id).local_app_data
    return {v["id"]: v for v in json.loads(out.get("vms", "[]"))}


def run(relation, state: testing.State | None = None, *, leader=True, unit_id=0, event=None, peers=None):
    state = state or testing.State(leader=leader, relations=[relation, *(peers or [])])
    relation = state.get_relation(relation.id)
    c = ctx(unit_id)
    return c.run(event or c.on.relation_changed(relation), state)


# ---------------------------------------------------------------------------------------------


def test_new_request_composes_one_vm_owned_by_the_remote_app(provider):
    r = rel([req("web-0", cores=2, memory="1G", ssh_authorized_keys=[KEY], user_data="#cloud-config\n{}")])
    out = run(r)
    (vm,) = provider.vms.values()
    assert vm.allocation.owner == f"{MODEL_A}/client/web-0"
    assert (vm.allocation.vcpus, vm.allocation.memory) == (2, GiB)
    plan = provider.plans[vm.name]
    assert plan.start is True and (plan.boot, plan.image) == ("image", "ubuntu:24.04")  # relation-image's default
    assert plan.cloud_init.hostname == vm.name
    assert plan.cloud_init.ssh_authorized_keys == (KEY,)
    assert plan.cloud_init.user_data == "#cloud-config\n{}"
    st = statuses(out, r)["web-0"]
    assert st["status"] == "ready"
    assert st["name"] == vm.name and st["unit"] == "vm-host/0"
    assert st["mac_addresses"] == list(vm.macs)
    assert st["addresses"] == list(vm.addresses) and st["login_user"] == "ubuntu"
    assert st["host_keys"] == [host_key(ED25519).to_dict()]


def test_replayed_hook_and_repeated_request_compose_once(provider):
    r = rel([req("web-0"), req("web-0")])
    out = run(r)
    out = run(r, out)  # the hook runs again (retry / replay) with the same data
    out = ctx().run(ctx().on.update_status(), out)
    assert len(provider.composed) == 1
    assert len(provider.vms) == 1
    assert statuses(out, r)["web-0"]["status"] == "ready"


def test_withdrawn_request_releases_its_vm_only(provider):
    r = rel([req("a"), req("b")])
    out = run(r)
    names = {v.allocation.owner.rsplit("/", 1)[1]: v.name for v in provider.vms.values()}
    r2 = replace(out.get_relation(r.id), remote_app_data={"requests": json.dumps([req("b")])})
    out = run(r2, replace(out, relations=[r2]))
    assert provider.decomposed == [names["a"]]
    assert [v.name for v in provider.vms.values()] == [names["b"]]
    assert set(statuses(out, r2)) == {"b"}


def test_changed_request_keeps_its_vm_and_says_so(provider):
    r = rel([req("a", cores=1)])
    out = run(r)
    r2 = replace(out.get_relation(r.id), remote_app_data={"requests": json.dumps([req("a", cores=2)])})
    out = run(r2, replace(out, relations=[r2]))
    assert len(provider.composed) == 1 and len(provider.vms) == 1
    st = statuses(out, r2)["a"]
    assert st["status"] == "ready" and "changed" in st["message"]


def test_broken_relation_releases_all_its_vms_and_no_others(provider):
    r1 = rel([req("a"), req("b")], app="one", rid=1)
    r2 = rel([req("a")], app="two", rid=2)
    state = testing.State(leader=True, relations=[r1, r2])
    out = ctx().run(ctx().on.relation_changed(r1), state)
    assert len(provider.vms) == 3
    # an operator's own VM (no owner) is never touched
    provider.vms["mine"] = VmInfo(name="mine", state="running", allocation=Allocation(name="mine", vcpus=1, memory=GiB))
    out = ctx().run(ctx().on.relation_broken(out.get_relation(1)), out)
    owners = sorted(str(v.allocation.owner) for v in provider.vms.values())
    assert owners == ["None", f"{MODEL_A}/two/a"]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"cores": 0}, "cores"),
        ({"cores": 999}, "cores"),
        ({"cores": "2"}, "cores"),
        ({"memory": "lots"}, "memory"),
        ({"memory": "1M"}, "memory"),
        ({"pinned_cores": [0, 1]}, "pinned_cores"),
        ({"hugepage_size": "4M"}, "hugepage_size"),
        ({"hugepages_backed": "yes"}, "hugepages_backed"),
        ({"storage": "root:20;rm -rf"}, "storage"),
        ({"storage": "root:twenty"}, "storage"),
        ({"interfaces": "eth0:color=blue"}, "interfaces"),
        ({"interfaces": "eth0:space=public\n"}, "interfaces"),
        ({"image": "/etc/shadow"}, "image"),
        ({"ssh_authorized_keys": ["not a key"]}, "ssh_authorized_keys"),
        ({"ssh_authorized_keys": [KEY] * 33}, "ssh_authorized_keys"),
        ({"user_data": "x" * (64 * 1024 + 1)}, "user_data"),
        ({"tags": ["ok", "no spaces"]}, "tags"),
        ({"memory": "1G", "hugepages_backed": True, "hugepage_size": "1G", "cores": 1, "pinned_cores": "auto"}, None),
    ],
)
def test_malformed_field_is_rejected_naming_it(provider, bad, field):
    r = rel([req("good"), {**req("bad"), **bad}])
    out = run(r)
    st = statuses(out, r)
    assert st["good"]["status"] == "ready"
    if field is None:  # control: a well-formed request of the same shape is accepted (or fails on capacity)
        assert st["bad"]["status"] in ("ready", "failed")
        return
    assert st["bad"]["status"] == "rejected"
    assert field in st["bad"]["message"]
    assert {v.allocation.owner for v in provider.vms.values()} == {f"{MODEL_A}/client/good"}


def test_rejection_messages_never_echo_secret_values(provider):
    secret = "#cloud-config\npassword: hunter2-" + "x" * (64 * 1024)
    r = rel([{**req("a"), "user_data": secret, "ssh_authorized_keys": ["hunter2 secret-key"]}])
    out = run(r)
    st = statuses(out, r)["a"]
    assert st["status"] == "rejected"
    assert "hunter2" not in st["message"]


def test_unreadable_list_reports_an_error_and_keeps_existing_vms(provider):
    r = rel([req("a")])
    out = run(r)
    r2 = replace(out.get_relation(r.id), remote_app_data={"requests": "{not json"})
    out = run(r2, replace(out, relations=[r2]))
    assert len(provider.vms) == 1 and provider.decomposed == []
    assert json.loads(out.get_relation(r.id).local_app_data["error"])


def test_bad_entries_without_ids_are_reported_by_position(provider):
    r = rel([req("a"), "junk", {"cores": 1}])
    out = run(r)
    st = statuses(out, r)
    assert st["a"]["status"] == "ready"
    assert st["#1"]["status"] == "rejected" and st["#2"]["status"] == "rejected"
    assert "id" in st["#2"]["message"]


def test_quota_rejects_new_requests_but_never_existing_vms(provider):
    ENV["config"].relation_quota = "vms=2,cores=3"
    r = rel([req("a", cores=2), req("b", cores=2), req("c")])
    out = run(r)
    st = statuses(out, r)
    assert st["a"]["status"] == "ready"
    assert st["b"]["status"] == "rejected" and "quota" in st["b"]["message"] and "cores" in st["b"]["message"]
    assert st["c"]["status"] == "ready"
    # a new request listed first does not displace the VMs that exist
    r2 = replace(
        out.get_relation(r.id), remote_app_data={"requests": json.dumps([req("z"), req("a", cores=2), req("c")])}
    )
    out = run(r2, replace(out, relations=[r2]))
    st = statuses(out, r2)
    assert st["z"]["status"] == "rejected" and "vms" in st["z"]["message"]
    assert st["a"]["status"] == "ready" and st["c"]["status"] == "ready"
    assert len(provider.composed) == 2


def test_quota_is_per_application_and_model(provider):
    ENV["config"].relation_quota = "vms=1"
    r1 = rel([req("a")], app="client", model=MODEL_A, rid=1)
    r2 = rel([req("a")], app="client", model=MODEL_B, rid=2)
    state = testing.State(leader=True, relations=[r1, r2])
    out = ctx().run(ctx().on.relation_changed(r1), state)
    assert statuses(out, r1)["a"]["status"] == "ready"
    assert statuses(out, r2)["a"]["status"] == "ready"
    assert {v.allocation.owner for v in provider.vms.values()} == {f"{MODEL_A}/client/a", f"{MODEL_B}/client/a"}


def test_cross_model_apps_with_the_same_name_stay_apart(provider):
    r1 = rel([req("a")], app="client", model=MODEL_A, rid=1)
    r2 = rel([req("a")], app="client", model=MODEL_B, rid=2)
    out = ctx().run(ctx().on.relation_changed(r1), testing.State(leader=True, relations=[r1, r2]))
    vm_b = next(v for v in provider.vms.values() if v.allocation.owner.startswith(MODEL_B))
    # model A withdraws its request; model B's VM with the same app name and id stays
    r1b = replace(out.get_relation(1), remote_app_data={"requests": "[]"})
    out = ctx().run(ctx().on.relation_changed(r1b), replace(out, relations=[r1b, out.get_relation(2)]))
    assert list(provider.vms) == [vm_b.name]
    assert statuses(out, out.get_relation(2))["a"]["name"] == vm_b.name


def test_space_maps_to_its_bridge_and_static_ip_reaches_the_vm(provider):
    r = rel([req("a", interfaces="eth0:space=storage,ip=10.30.0.50")])
    out = run(r)
    (vm,) = provider.vms.values()
    (nic,) = vm.allocation.nics
    assert (nic.parent, nic.ip) == ("br1", "10.30.0.50")
    assert statuses(out, r)["a"]["addresses"] == ["10.30.0.50"]


def test_interfaces_only_onto_allowed_networks(provider):
    ENV["config"].allowed_networks = "public"
    r = rel(
        [
            req("ok", interfaces="eth0:space=public"),
            req("mapped", interfaces="eth0:space=storage"),
            req("subnet", interfaces="eth0:subnet=10.30.0.0/24"),
            req("named", interfaces="eth0:name=br1"),
        ]
    )
    out = run(r)
    st = statuses(out, r)
    assert st["ok"]["status"] == "ready"
    for rid in ("mapped", "subnet", "named"):
        assert st[rid]["status"] == "rejected", rid
        assert "does not offer to remote models" in st[rid]["message"] and "br1" not in st[rid]["message"]
    assert [v.allocation.nics[0].parent for v in provider.vms.values()] == ["br0"]


def test_placement_failure_is_reported_failed_and_retried_later(provider):
    r = rel([req("big", cores=64)])
    out = run(r)
    st = statuses(out, r)["big"]
    assert st["status"] == "failed" and st["message"]
    assert provider.vms == {}


def test_non_leader_never_writes_the_provider_databag(provider):
    r = rel([req("a")])
    out = run(r, leader=False)
    assert "vms" not in out.get_relation(r.id).local_app_data
    assert len(provider.composed) == 0  # nothing is assigned to it without a leader's assignment


# ---------------------------------------------------------------------------------------------
# Several host units


def cap(threads: int, vcpus: int | None = None, memory: int = 32 * GiB) -> str:
    return json.dumps({"threads": threads, "vcpus": threads if vcpus is None else vcpus, "memory": memory})


def test_three_units_leader_assigns_best_fit_and_reassigns_when_one_leaves(provider):
    r = rel([req("a", cores=2), req("b", cores=6), req("c", cores=1)])
    # unit 0 (leader, here) has 8 free threads; unit 1 has 3; unit 2 has 16
    peers = testing.PeerRelation("vm-host-peers", peers_data={1: {"capacity": cap(3)}, 2: {"capacity": cap(16)}})
    out = run(r, peers=[peers])
    assignments = json.loads(out.get_relation(peers.id).local_app_data["assignments"])
    owner = f"{MODEL_A}/client/"
    # a (2) -> fewest threads that fit: unit 1 (3); b (6) -> unit 0 (8); c (1) -> unit 1 (1 left)
    assert assignments == {owner + "a": "vm-host/1", owner + "b": "vm-host/0", owner + "c": "vm-host/1"}
    assert {v.allocation.owner for v in provider.vms.values()} == {owner + "b"}
    st = statuses(out, r)
    assert st["b"]["status"] == "ready" and st["b"]["unit"] == "vm-host/0"
    assert st["a"]["status"] == "pending" and st["a"]["unit"] == "vm-host/1"
    mine = json.loads(out.get_relation(peers.id).local_unit_data["results"])
    assert mine[owner + "b"]["status"] == "ready"

    # unit 1 runs with the leader's assignments: it composes a and c only, on its own host
    other = make_provider()
    ENV["host"] = VmHost(provider=other, policy=Policy(), lock_path=ENV["host"].lock_path)
    p1 = testing.PeerRelation(
        "vm-host-peers",
        id=peers.id,
        local_app_data={"assignments": json.dumps(assignments)},
        peers_data={0: {}, 2: {}},
    )
    out1 = ctx(1).run(ctx(1).on.relation_changed(p1), testing.State(leader=False, relations=[r, p1]))
    assert sorted(v.allocation.owner for v in other.vms.values()) == [owner + "a", owner + "c"]
    results1 = out1.get_relation(p1.id).local_unit_data["results"]

    # the leader merges unit 1's results; unit 2 has left: nothing was assigned to it, a and c stay
    ENV["host"] = VmHost(provider=provider, policy=Policy(), lock_path=ENV["host"].lock_path)
    p0 = replace(out.get_relation(peers.id), peers_data={1: {"capacity": cap(0), "results": results1}})
    out = ctx().run(ctx().on.relation_changed(p0), replace(out, relations=[out.get_relation(r.id), p0]))
    st = statuses(out, r)
    assert {k: (v["status"], v["unit"]) for k, v in st.items()} == {
        "a": ("ready", "vm-host/1"),
        "b": ("ready", "vm-host/0"),
        "c": ("ready", "vm-host/1"),
    }

    # unit 1 leaves: its requests go to the units that remain. Unit 0 has 2 shared vCPUs left
    # (8 threads, b takes 6): a (2) fits it exactly; c (1) then only fits unit 2.
    p0 = replace(out.get_relation(peers.id), peers_data={2: {"capacity": cap(16)}})
    out = ctx().run(ctx().on.relation_departed(p0, remote_unit=1), replace(out, relations=[out.get_relation(r.id), p0]))
    assignments = json.loads(out.get_relation(peers.id).local_app_data["assignments"])
    assert assignments == {owner + "a": "vm-host/0", owner + "b": "vm-host/0", owner + "c": "vm-host/2"}
    st = statuses(out, r)
    assert (st["a"]["status"], st["a"]["unit"]) == ("ready", "vm-host/0")
    assert (st["c"]["status"], st["c"]["unit"]) == ("pending", "vm-host/2")
    assert sorted(v.allocation.owner for v in provider.vms.values()) == [owner + "a", owner + "b"]


def test_departing_unit_releases_its_relation_vms(provider):
    r = rel([req("a")])
    peers = testing.PeerRelation("vm-host-peers", peers_data={1: {"capacity": cap(8)}})
    out = run(r, peers=[peers])
    assert len(provider.vms) == 1
    p = out.get_relation(peers.id)
    out = ctx().run(ctx().on.relation_departed(p, remote_unit=0, departing_unit=0), out)
    assert provider.vms == {}
    assert json.loads(out.get_relation(peers.id).local_unit_data["results"]) == {}


def test_unit_releases_a_duplicate_that_another_unit_serves(provider):
    owner = f"{MODEL_A}/client/a"
    r = rel([req("a")])
    ready = {owner: {"status": "ready", "name": "vm-x", "cores": 1, "memory": 512 * 1024**2}}
    peers = testing.PeerRelation(
        "vm-host-peers",
        local_app_data={"assignments": json.dumps({owner: "vm-host/1"})},
        peers_data={1: {"results": json.dumps(ready)}},
    )
    # this unit holds a stray VM for the same owner (say, from a hook that raced a re-assignment)
    provider.vms["vm-stray"] = VmInfo(
        name="vm-stray",
        state="running",
        allocation=Allocation(name="vm-stray", vcpus=1, memory=512 * 1024**2, owner=owner),
    )
    out = run(r, leader=False, peers=[peers])
    assert provider.decomposed == ["vm-stray"]
    assert json.loads(out.get_relation(peers.id).local_unit_data["results"]) == {}


# ---------------------------------------------------------------------------------------------
# The vm-allocation binding (`juju deploy vm-host --bind vm-allocation=SPACE`)


def bound(interface: str, address: str = "10.20.0.1", cidr: str = "10.20.0.0/24") -> testing.Network:
    """What Juju's network-get reports for the vm-allocation endpoint: which host interface, which subnet."""
    addr = testing.Address(address, cidr=cidr)
    return testing.Network("vm-allocation", bind_addresses=[testing.BindAddress([addr], interface_name=interface)])


@pytest.fixture
def ported(provider, tmp_path):
    """The same host plus enp1s0, a port of bridge br1."""
    p = make_provider(extra_nics=(Nic(name="enp1s0", kind="physical", bridge="br1"),))
    ENV["host"] = VmHost(provider=p, policy=Policy(), lock_path=str(tmp_path / "lock2"))
    return p


def run_bound(relation: testing.Relation, network: testing.Network) -> testing.State:
    state = testing.State(leader=True, relations=[relation], networks={network})
    return ctx().run(ctx().on.relation_changed(relation), state)


@pytest.mark.parametrize(
    "interface, parent",
    [("br0", "br0"), ("enp1s0", "br1")],  # a bound bridge is used; a bound bridge port attaches through its bridge
)
def test_request_naming_no_network_gets_one_nic_on_the_bound_bridge(ported, interface, parent):
    r = rel([req("none"), req("bare", interfaces="eth0:"), req("subnet", interfaces="eth0:subnet=10.30.0.0/24")])
    out = run_bound(r, bound(interface))
    st = statuses(out, r)
    assert {k: v["status"] for k, v in st.items()} == {"none": "ready", "bare": "ready", "subnet": "ready"}
    nics = {
        v.allocation.owner.rsplit("/", 1)[1]: [(n.label, n.type, n.parent) for n in v.allocation.nics]
        for v in ported.vms.values()
    }
    assert nics["none"] == [("eth0", "bridge", parent)]
    assert nics["bare"] == [("eth0", "bridge", parent)]
    assert nics["subnet"] == [("eth0", "bridge", "br1")]  # a constrained interface ignores the binding


def test_without_binding_information_a_request_naming_no_network_gets_no_nic(provider):
    # ops.testing's default network names no interface and gives a single address: nothing to go on
    r = rel([req("none")])
    out = run(r)
    assert statuses(out, r)["none"]["status"] == "ready"
    (vm,) = provider.vms.values()
    assert vm.allocation.nics == ()


def test_request_naming_an_unknown_space_is_rejected_without_the_hosts_spaces(provider):
    r = rel([req("dmz", interfaces="eth0:space=dmz"), req("ok", interfaces="eth0:space=public")])
    out = run_bound(r, bound("br1"))
    st = statuses(out, r)
    assert st["ok"]["status"] == "ready"
    assert st["dmz"]["status"] == "rejected"
    msg = st["dmz"]["message"]
    assert "space dmz" in msg and "vm-allocation endpoint is bound to" in msg
    assert "public" not in msg and "storage" not in msg  # the host's spaces are not told
    assert [v.allocation.owner.rsplit("/", 1)[1] for v in provider.vms.values()] == ["ok"]


def test_allowed_networks_still_refuses_a_bound_network_that_is_not_allowed(ported, caplog):
    ENV["config"].allowed_networks = "storage"  # space storage = br1 (space-bridges); br0 is not allowed
    r = rel([req("a")])
    caplog.set_level("INFO")
    out = run_bound(r, bound("br0"))
    st = statuses(out, r)["a"]
    assert st["status"] == "rejected"
    assert "does not offer to remote models" in st["message"] and "br0" not in st["message"]
    assert "NICs on br0, allowed-networks storage" in caplog.text  # the operator's log has what they are not told
    assert ported.vms == {} and ported.composed == []
    # bound to a port of the allowed bridge br1: the NIC lands on br1, which is allowed
    out = run_bound(r, bound("enp1s0", "10.30.0.1", "10.30.0.0/24"))
    assert statuses(out, r)["a"]["status"] == "ready"
    (vm,) = ported.vms.values()
    assert vm.allocation.nics[0].parent == "br1"


# ---------------------------------------------------------------------------------------------
# One bad request never takes the hook down


def test_over_long_rejection_is_rejected_with_a_bounded_message_and_the_hook_survives(provider):
    from charms.vm_host.v0.vm_allocation import MAX_MESSAGE

    # The reviewer's repro: 20 long unknown spaces; echoing them all overflowed VmStatus.message.
    ifaces = "eth0:" + ",".join(f"space={i:02d}" + "x" * 40 for i in range(20))
    r = rel([req("many", interfaces=ifaces), req("ok")])
    out = run(r)  # raised pydantic.ValidationError before the fix
    st = statuses(out, r)
    assert st["many"]["status"] == "rejected"
    assert len(st["many"]["message"]) <= MAX_MESSAGE
    assert "00" + "x" * 40 in st["many"]["message"] and "and 17 more" in st["many"]["message"]
    assert "19" + "x" * 40 not in st["many"]["message"]
    assert st["ok"]["status"] == "ready"


def test_a_hypervisor_failure_tells_the_requirer_that_and_the_log_the_detail(provider, caplog):
    class LongFailure(type(provider)):
        def compose(self, plan):
            raise ProviderError("disk trouble in /var/lib/secret-path: " + "y" * 5000)

    provider.__class__ = LongFailure
    r = rel([req("a")])
    out = run(r)
    st = statuses(out, r)["a"]
    assert st["status"] == "failed"
    assert st["message"] == HYPERVISOR_ERROR
    assert "disk trouble in /var/lib/secret-path" in caplog.text


@pytest.mark.parametrize(
    ("error", "told"),
    [
        (
            ImageNotFound("image server https://10.9.8.7/internal has no disk image named 'ubuntu:24.04'"),
            "has no image",
        ),
        (ImageError("image server https://10.9.8.7/internal is unreachable: timed out"), "could not fetch image"),
    ],
)
def test_an_image_failure_names_the_image_but_never_the_hosts_image_server(provider, caplog, error, told):
    class NoImage(type(provider)):
        def compose(self, plan):
            raise error

    provider.__class__ = NoImage
    r = rel([req("a")])
    st = statuses(run(r), r)["a"]
    assert st["status"] == "failed"
    assert told in st["message"] and "ubuntu:24.04" in st["message"]
    assert "10.9.8.7" not in st["message"]
    assert "ubuntu:24.04" in caplog.text


def test_a_provider_bug_fails_only_its_own_request(provider, caplog):
    secret_key = KEY

    class BuggyOnTwoCores(type(provider)):
        def compose(self, plan):
            if plan.allocation.vcpus == 2:
                raise KeyError(f"internal {secret_key}")
            return super().compose(plan)

    provider.__class__ = BuggyOnTwoCores
    r = rel([req("bad", cores=2, ssh_authorized_keys=[KEY]), req("good", cores=1)])
    out = run(r)  # the KeyError escaped the hook before the fix
    st = statuses(out, r)
    assert st["bad"]["status"] == "failed" and st["bad"]["message"]
    assert "AAAAC3" not in st["bad"]["message"]
    assert st["good"]["status"] == "ready"
    assert {v.allocation.owner for v in provider.vms.values()} == {f"{MODEL_A}/client/good"}
    assert "AAAAC3" not in caplog.text and "KeyError" in caplog.text


def test_a_busy_host_lock_stops_the_hook_instead_of_failing_the_request(provider, tmp_path):
    """Not the request's fault, and its sentence names the lock holder's command: never published."""
    from vmhost.hostlock import HostLockBusy, host_lock

    ENV["host"].lock_timeout = 0.1
    r = rel([req("web-0")])
    with host_lock(ENV["host"].lock_path, timeout=0), pytest.raises(testing.errors.UncaughtCharmError) as e:
        # (held through another open file description: flock excludes it as it would another process)
        run(r)
    assert isinstance(e.value.__cause__, HostLockBusy)
    assert provider.composed == []


# ---------------------------------------------------------------------------------------------
# Remote data is decoded totally and answered in bounded space

HOSTILE = {
    "deep": "[" * 1000 + "]" * 1000,
    "deep-inside": json.dumps([{"id": "a", "tags": "TAGS"}]).replace('"TAGS"', "[" * 900 + "]" * 900),
    "megabytes": json.dumps([{"id": "a", "user_data": "x" * (2 * 1024 * 1024)}]),
    "object": json.dumps({"id": "a"}),
    "number": "5",
    "huge-int": json.dumps([{"id": "a", "cores": 10**4000}])[:4400],
    "huge-int-json": json.dumps([{"id": "a", "cores": 10**400, "memory": 10**300}]),
    "nan": '[{"id": "a", "cores": NaN, "memory": Infinity}]',
    "surrogates": '[{"id": "\\udc80", "image": "\\ud800x", "user_data": "\\udfff"}, "\\udc80"]',
    "nul-and-newlines": json.dumps([{"id": "a\x00", "storage": "root:1\n"}]),
    "wrong-types": json.dumps([{"id": ["a"], "cores": {}, "memory": [], "tags": "x", "ssh_authorized_keys": {}}]),
    "empty": "",
}


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
@pytest.mark.parametrize("event", ["relation_changed", "update_status", "leader_elected", "config_changed"])
def test_any_payload_is_answered_in_bounds_and_never_raises_nor_releases(provider, payload, event):
    from charms.vm_host.v0.vm_allocation import MAX_MESSAGE

    r = rel([req("a")])
    out = run(r)
    assert len(provider.vms) == 1
    r2 = replace(out.get_relation(r.id), remote_app_data={"requests": payload})
    state = replace(out, relations=[r2])
    c = ctx()
    trigger = c.on.relation_changed(r2) if event == "relation_changed" else getattr(c.on, event)()
    out = c.run(trigger, state)  # RecursionError escaped every one of these hooks before the fix
    data = out.get_relation(r.id).local_app_data
    assert len(data.get("error", "")) <= MAX_MESSAGE + 2
    for st in statuses(out, r2).values():
        assert len(st["message"] or "") <= MAX_MESSAGE
        assert st["status"] in ("rejected", "ready")
    assert len(provider.composed) == 1  # nothing new made from hostile data


def test_a_deep_list_is_refused_in_one_sentence_and_keeps_existing_vms(provider):
    r = rel([req("a")])
    out = run(r)
    r2 = replace(out.get_relation(r.id), remote_app_data={"requests": HOSTILE["deep"]})
    out = run(r2, replace(out, relations=[r2]))
    assert (
        json.loads(out.get_relation(r.id).local_app_data["error"]) == "requests is nested too deeply; at most 16 levels"
    )
    assert len(provider.vms) == 1 and provider.decomposed == []


def test_a_list_over_the_size_bound_is_refused_unread(provider):
    from charms.vm_host.v0.vm_allocation import MAX_FIELD_BYTES

    r = rel(None, raw=HOSTILE["megabytes"])
    out = run(r)
    error = json.loads(out.get_relation(r.id).local_app_data["error"])
    assert error.startswith("requests is ") and f"at most {MAX_FIELD_BYTES}" in error
    assert provider.composed == []


def test_ten_thousand_requests_publish_a_bounded_answer_and_release_nothing(provider):
    from charms.vm_host.v0.vm_allocation import MAX_MESSAGE, MAX_REQUESTS

    r = rel([req("keep")])
    out = run(r)
    (kept,) = provider.vms
    # 10,000 entries (within the size bound): the first ones rejected with the longest message the
    # host writes, the rest rejected too; "keep" is listed last
    noisy = {"interfaces": "eth0:" + ",".join(f"space={i:02d}" + "x" * 40 for i in range(20))}
    many = [req(f"n{i}", **noisy) for i in range(100)] + [{"id": f"r{i}", "cores": 0} for i in range(9_899)]
    many.append(req("keep"))
    r2 = replace(out.get_relation(r.id), remote_app_data={"requests": json.dumps(many)})
    out = run(r2, replace(out, relations=[r2]))
    data = out.get_relation(r.id).local_app_data
    vms = json.loads(data["vms"])
    assert len(vms) == MAX_REQUESTS
    assert all(v["status"] == "rejected" for v in vms)
    assert len(data["vms"]) + len(data["error"]) < MAX_REQUESTS * (MAX_MESSAGE + 256)
    assert "too many requests: 10000 entries, at most 64" in json.loads(data["error"])
    # the list is not served as written, so no VM of this application is released
    assert list(provider.vms) == [kept] and provider.decomposed == []
    assert len(provider.composed) == 1


def distinctive_provider() -> FakeProvider:
    """A host whose free amounts are numbers no message would hold by chance."""
    return FakeProvider(
        synthetic_host(
            nodes=1,
            cores_per_node=3,
            threads_per_core=2,
            memory_per_node=13 * GiB + 333 * 2 * 1024**2,
            hugepages={"2M": 333},
            nics=(Nic(name="br0", kind="bridge", addresses=("10.20.0.1/24",)),),
            storage_pools=(StoragePool(name="default", total=77 * 10**9),),
        )
    )


SHORT = {
    "pinned": (req("pinned", cores=7, pinned_cores="auto"), "not enough pinned threads"),
    "shared": (req("shared", cores=7), "not enough shared vCPUs"),
    "memory": (req("memory", memory="14G"), "not enough memory"),
    "2M": (req("two", memory="1G", hugepages_backed=True, hugepage_size="2M"), "not enough 2M hugepages"),
    "1G": (req("one", memory="2G", hugepages_backed=True, hugepage_size="1G"), "not enough 1G hugepages"),
    "disk": (req("disk", storage="root:99"), "disk root: not enough storage"),
    "nic": (req("nic", interfaces="eth0:name=br9"), "interface eth0: no host network matches it"),
}


def test_remote_models_learn_what_was_short_never_what_the_host_has(tmp_path, caplog):
    p = distinctive_provider()
    ENV["host"] = VmHost(provider=p, policy=Policy(), lock_path=str(tmp_path / "lock"))
    ENV["config"] = SimpleNamespace(relation_quota="", allowed_networks="", space_bridges="")
    r = rel([spec for spec, _ in SHORT.values()])
    out = run(r)
    st = statuses(out, r)
    for key, (spec, words) in SHORT.items():
        assert st[spec["id"]]["status"] == "failed", key
        assert st[spec["id"]]["message"] == f"the host cannot place this VM now: {words}", key
    said = json.dumps(dict(out.get_relation(r.id).local_app_data))
    for number in ("333", "666", "13", "12", "77", "6 ", "5 "):
        assert number not in said.replace("2M", "").replace("1G", "")
    assert "br0" not in said
    # the operator's log keeps the detail
    assert "333" in caplog.text and "br0" in caplog.text and "77" in caplog.text
    ENV.clear()


@pytest.mark.parametrize(
    "peer_unit, peer_app",
    [
        ({"results": "[" * 1000 + "]" * 1000, "capacity": "[" * 1000 + "]" * 1000}, {}),
        ({"results": json.dumps({"o": {"cores": "x", "memory": 1e308}}), "capacity": '{"threads": 1e999}'}, {}),
        ({"results": json.dumps({"o": [], "p": {"status": "odd"}}), "capacity": '{"hugepages": [1]}'}, {}),
        ({"capacity": json.dumps({"threads": 2**70, "hugepages": {"2M": -1}})}, {}),
        ({}, {"assignments": json.dumps({f"{MODEL_A}/client/a": ["vm-host/1"], "x": {}})}),
        ({}, {"assignments": "[" * 1000 + "]" * 1000}),
    ],
    ids=["deep", "wrong-types", "wrong-shapes", "huge-ints", "assignment-types", "deep-assignments"],
)
@pytest.mark.parametrize("leader", [True, False])
def test_garbage_in_the_peer_relation_never_raises(provider, peer_unit, peer_app, leader):
    r = rel([req("a")])
    peers = testing.PeerRelation("vm-host-peers", local_app_data=peer_app, peers_data={1: peer_unit})
    out = run(r, leader=leader, peers=[peers])  # raised ValueError / TypeError / RecursionError before
    if leader:
        assert statuses(out, r)["a"]["status"] in ("ready", "pending")


def test_a_binding_network_get_cannot_read_pauses_the_relation_without_failing_the_hook(provider, monkeypatch):
    def unreadable(self, name, relation_id=None):
        raise json.JSONDecodeError("Expecting value", "", 0)  # what ops raises for output that is not JSON

    monkeypatch.setattr(ops.model.Binding, "_network_get", unreadable)
    r = rel([req("a")])
    out = run(r)  # the hook completes
    assert provider.vms == {} and statuses(out, r) == {}  # nothing composed on a guess about the network


# ---------------------------------------------------------------------------------------------
# Ready means usable: an address, the login user, the host keys; refreshed on every hook


def test_a_booting_vm_is_pending_until_it_has_an_address_then_ready_with_it(provider):
    provider.dhcp = False
    r = rel([req("a")])
    out = run(r)
    (vm,) = provider.vms.values()
    st = statuses(out, r)["a"]
    assert (st["status"], st["message"], st["addresses"]) == ("pending", "VM is booting; waiting for an address", [])
    assert st["name"] == vm.name and st["mac_addresses"] == list(vm.macs)
    out = ctx().run(ctx().on.update_status(), out)
    assert statuses(out, r)["a"]["status"] == "pending"  # still no lease: still pending, nothing composed again

    provider.lease(vm.name, "10.20.0.77/24", "fe80::5054:ff:fe00:1")  # DHCP answered; read live on the next hook
    out = ctx().run(ctx().on.update_status(), out)
    st = statuses(out, r)["a"]
    assert (st["status"], st["addresses"], st["login_user"]) == ("ready", ["10.20.0.77"], "ubuntu")
    assert st["host_keys"] == [host_key(ED25519).to_dict()]

    provider.lease(vm.name, "10.20.0.78")  # a new lease: the next relation event publishes it
    out = run(r, out)
    assert statuses(out, r)["a"]["addresses"] == ["10.20.0.78"]
    assert len(provider.composed) == 1


def test_relation_image_is_what_a_request_naming_no_image_boots(provider):
    ENV["config"].relation_image = "ubuntu:22.04"
    r = rel([req("a"), req("b", image="ubuntu:noble")])
    run(r)
    images = {plan.allocation.owner.rsplit("/", 1)[1]: (plan.boot, plan.image) for plan in provider.composed}
    assert images == {"a": ("image", "ubuntu:22.04"), "b": ("image", "ubuntu:noble")}


HOSTILE_REQUESTS = {
    "image-path": {"image": "/var/lib/vmhost/images/secret.qcow2"},
    "image-local-name": {"image": "noble"},
    "image-traversal": {"image": "ubuntu:../../x"},
    "key-options": {"ssh_authorized_keys": ['command="/bin/sh" ' + ED25519]},
    "key-dsa": {"ssh_authorized_keys": [ED25519.replace("ssh-ed25519", "ssh-dss", 1)]},
    "key-type-mismatch": {"ssh_authorized_keys": ["ssh-rsa " + ED25519.split(" ")[1]]},
    "user-data-too-big": {"user_data": "#cloud-config\n" + "x" * (64 * 1024)},
    "user-data-nul": {"user_data": "#cloud-config\n\x00"},
}


@pytest.mark.parametrize("bad", list(HOSTILE_REQUESTS.values()), ids=list(HOSTILE_REQUESTS))
def test_a_hostile_request_is_rejected_in_one_sentence_creates_nothing_and_loses_nothing(provider, bad):
    r = rel([req("kept")])
    out = run(r)
    (kept,) = provider.vms
    r2 = replace(out.get_relation(r.id), remote_app_data={"requests": json.dumps([req("kept"), {**req("x"), **bad}])})
    out = run(r2, replace(out, relations=[r2]))
    st = statuses(out, r2)
    field = next(iter(bad))
    assert st["x"]["status"] == "rejected" and field in st["x"]["message"]
    assert st["x"]["message"].count(". ") == 0 and len(st["x"]["message"]) < 400
    assert list(provider.vms) == [kept] and len(provider.composed) == 1 and provider.decomposed == []
    assert st["kept"]["status"] == "ready"


@pytest.fixture
def real_host_key(tmp_path):
    """A host key pair made as vm-host's seed makes one: (HostKey of the public half, the private half's text)."""
    import shutil
    import subprocess

    if shutil.which("ssh-keygen") is None:
        pytest.skip("no ssh-keygen on PATH: cannot make a real host key pair")
    path = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True, timeout=30)
    return host_key(path.with_suffix(".pub").read_text().strip()), path.read_text()


def test_private_key_material_and_user_data_never_reach_relation_data_or_logs(provider, real_host_key, caplog):
    public, private = real_host_key
    # a provider bug hands the private half over where the public key belongs
    leaked = HostKey("ssh-ed25519", private, public.fingerprint)
    provider.host_keys = (public, leaked)
    secret = "#cloud-config\npassword: hunter2-SECRET\n"
    r = rel([req("a", user_data=secret, ssh_authorized_keys=[KEY]), req("b", user_data=secret)])
    peers = testing.PeerRelation("vm-host-peers", peers_data={1: {"capacity": cap(0)}})
    provider.fail_compose = None
    caplog.set_level("DEBUG")
    out = run(r, peers=[peers])
    out = ctx().run(ctx().on.update_status(), out)
    st = statuses(out, r)["a"]
    assert st["status"] == "ready" and st["host_keys"] == [public.to_dict()]
    body = [line for line in private.splitlines() if line and "-----" not in line]
    published = json.dumps([{**rel.local_app_data, **rel.local_unit_data} for rel in out.relations])
    published += json.dumps([dict(rel.local_app_data) for rel in out.relations])
    for where in (published, caplog.text):
        assert "PRIVATE KEY" not in where and "hunter2" not in where
        assert not any(line in where for line in body)
    assert "hunter2" in provider.plans[next(iter(provider.vms))].cloud_init.user_data  # it did reach the seed


def test_the_largest_status_list_fits_what_the_requirer_reads():
    from charms.vm_host.v0.vm_allocation import MAX_FIELD_BYTES, MAX_REQUESTS, VmStatus
    from tests.unit.ssh_keys import ECDSA, RSA

    keys = [host_key(k).to_dict() for k in (ED25519, ECDSA, RSA)]
    keys.append({**keys[2]})  # four keys, the ceiling
    biggest = VmStatus(
        id="r" * 63,
        status="ready",
        message="m" * 1024,
        unit="u" * 128,
        name="n" * 64,
        mac_addresses=["52:54:00:00:00:01"] * 16,
        addresses=["fd00:1111:2222:3333:4444:5555:6666:7777"] * 16,
        login_user="u" * 32,
        host_keys=[{**k, "public_key": k["public_key"]} for k in keys],
    )
    assert len(json.dumps([biggest.model_dump(mode="json")] * MAX_REQUESTS)) < MAX_FIELD_BYTES
