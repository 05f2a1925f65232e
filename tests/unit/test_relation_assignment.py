"""vmhost.relation_assignment: capacity, which unit serves which request, what each unit does, and the
statuses the leader merges (pure: plain values in, plain values out)."""

from __future__ import annotations

import pytest

from tests.unit.relation_requests import GiB, M, judge, rel, spec, vm
from tests.unit.ssh_keys import ECDSA, ED25519, RSA, host_key
from vmhost.model import HostKey, NicAllocation, VmRequest
from vmhost.relation_assignment import (
    BOOTING,
    Capacity,
    ComposeFailure,
    UnitResult,
    assign,
    merge_statuses,
    unit_results,
    unit_work,
)
from vmhost.relation_policy import (
    IncomingRequest,
    RelationSettings,
    owner_key,
)


def req(cores=1, memory=GiB, **kw) -> VmRequest:
    return VmRequest.from_dict({"cores": cores, "memory": memory, **kw})


def test_capacity_fit_uses_threads_for_pinned_and_shared_vcpus_otherwise():
    c = Capacity(threads=2, vcpus=8, memory=4 * GiB, hugepages={"2M": 512, "1G": 0})
    assert c.fits(req(4)) and not c.fits(req(4, pinned_cores="auto"))
    assert c.fits(req(2, pinned_cores="auto", hugepages_backed=True, memory=GiB))
    assert not c.fits(req(1, hugepages_backed=True, hugepage_size="1G", memory=GiB))
    assert not c.fits(req(1, memory=5 * GiB))
    left = c.minus(req(2, pinned_cores="auto", hugepages_backed=True, memory=GiB))
    assert (left.threads, left.vcpus, left.memory, left.hugepages["2M"]) == (0, 8, 4 * GiB, 0)
    assert Capacity.from_dict(c.to_dict()) == c


def accepted(*ids, cores=1, pinned=False):
    ds = judge(
        [rel(*(spec(i, cores=cores, pinned_cores="auto" if pinned else None) for i in ids))], RelationSettings(), {}
    )
    return [d.accepted for d in ds]


def test_assign_best_fit_is_deterministic_with_ties_by_unit_name():
    caps = {"h/2": Capacity(threads=4, vcpus=4, memory=8 * GiB), "h/1": Capacity(threads=4, vcpus=4, memory=8 * GiB)}
    (a,) = accepted("a", cores=2)
    got = assign([a], current={}, units=["h/2", "h/1"], capacities=caps, located={})
    assert got.units == {a.owner: "h/1"} and got.waiting == {}
    caps["h/0"] = Capacity(threads=16, vcpus=16, memory=8 * GiB)
    big = accepted("big", cores=8)[0]
    got = assign([a, big], current={}, units=["h/0", "h/1", "h/2"], capacities=caps, located={})
    assert got.units == {a.owner: "h/1", big.owner: "h/0"}


def test_assign_keeps_vms_and_live_assignments_and_reassigns_departed_units():
    a, b, c = accepted("a", "b", "c")
    caps = {"h/0": Capacity(threads=8, vcpus=8, memory=8 * GiB), "h/2": Capacity(threads=2, vcpus=2, memory=8 * GiB)}
    current = {a.owner: "h/0", b.owner: "h/1", c.owner: "h/1"}
    located = {c.owner: "h/2"}  # c's VM lives on h/2 whatever the old assignment said
    got = assign([a, b, c], current=current, units=["h/0", "h/2"], capacities=caps, located=located).units
    assert got[a.owner] == "h/0" and got[c.owner] == "h/2"
    assert got[b.owner] == "h/2"  # h/1 left; h/2 is the tighter fit
    # a compose that failed on its unit is placed again
    got = assign([a], current={a.owner: "h/2"}, units=["h/0", "h/2"], capacities=caps, located={}, failed={a.owner})
    assert got.units[a.owner] == "h/2"  # still the best fit, chosen afresh
    got = assign(accepted("x", cores=64), current={}, units=["h/0", "h/2"], capacities=caps, located={})
    assert list(got.units.values()) == ["h/0"]  # nothing fits: the roomiest unit, whose placement says what is short
    got = assign([a], current={}, units=["h/0"], capacities={}, located={})
    assert got.units == {} and "capacity" in got.waiting[a.owner]


def test_unit_actions_compose_only_what_is_assigned_here_and_release_what_nobody_wants():
    a, b = accepted("a", "b")
    ds = judge([rel(spec("a"), spec("b"))], RelationSettings(), {})
    gone = owner_key(M, "client", "gone")
    other_app = owner_key(M, "unrelated", "a")
    vms = [vm("vm-a", a.owner), vm("vm-gone", gone), vm("vm-other", other_app), vm("vm-op", None), vm("vm-a2", a.owner)]
    assignments = {a.owner: "h/0", b.owner: "h/1"}
    work = unit_work("h/0", decisions=ds, assignments=assignments, vms=vms, live_apps={f"{M}/client"})
    assert work.compose == ()  # a exists here; b is h/1's
    assert sorted(work.release) == ["vm-a2", "vm-gone", "vm-other"]
    work = unit_work("h/1", decisions=ds, assignments=assignments, vms=[], live_apps={f"{M}/client"})
    assert [c.owner for c in work.compose] == [b.owner]
    # an app whose list cannot be read keeps its VMs
    work = unit_work(
        "h/0",
        decisions=[],
        assignments={},
        vms=[vm("vm-a", a.owner)],
        live_apps={f"{M}/client"},
        unreadable_apps={f"{M}/client"},
    )
    assert work.release == ()


def test_results_and_merged_statuses():
    ds = judge(
        [
            rel(
                spec("a", interfaces=None),
                spec("b"),
                IncomingRequest("bad", None, "request 'bad': cores: no"),
                spec("c"),
            )
        ],
        RelationSettings(),
        {},
    )
    by = {d.id: d for d in ds}
    nic = NicAllocation("eth0", "bridge", "br0", ip="10.0.0.9", mac="52:54:00:00:00:01")
    here = [vm("vm-a", by["a"].owner, nics=(nic,), addresses=("10.0.0.9/24", "fe80::1"), login_user="ubuntu")]
    assignments = {by["a"].owner: "h/0", by["b"].owner: "h/0", by["c"].owner: "h/1"}
    failures = {by["b"].owner: ComposeFailure("failed", "compose failed at step 'x'")}
    res = unit_results("h/0", decisions=ds, assignments=assignments, vms=here, failures=failures)
    expected = UnitResult("ready", None, "vm-a", ("52:54:00:00:00:01",), ("10.0.0.9",), 1, GiB, login_user="ubuntu")
    assert res[by["a"].owner] == expected
    assert res[by["b"].owner].status == "failed"
    assert by["c"].owner not in res
    merged = merge_statuses([rel()], decisions=ds, assignments=assignments, results={"h/0": res}, waiting={})
    st = {e["id"]: e for e in merged[1]}
    assert [e["id"] for e in merged[1]] == ["a", "b", "bad", "c"]
    assert (st["a"]["status"], st["a"]["unit"], st["a"]["addresses"]) == ("ready", "h/0", ["10.0.0.9"])
    assert (st["a"]["login_user"], st["a"]["host_keys"]) == ("ubuntu", [])
    assert st["b"]["status"] == "failed" and "step" in st["b"]["message"]
    assert st["bad"]["status"] == "rejected"
    assert (st["c"]["status"], st["c"]["unit"]) == ("pending", "h/1")


@pytest.mark.parametrize(
    "value",
    [
        [],
        "x",
        None,
        {"status": "odd"},
        {"cores": "1"},
        {"cores": True},
        {"memory": 1e308},
        {"cores": -1},
        {"memory": 2**70},
        {"addresses": "10.0.0.1"},
        {"mac_addresses": [1]},
        {"name": "x" * 65},
    ],
)
def test_result_from_dict_refuses_what_no_unit_writes(value):
    with pytest.raises(ValueError):
        UnitResult.from_dict(value)


def test_result_round_trips():
    r = UnitResult("ready", "m", "vm-1", ("52:54:00:00:00:01",), ("10.0.0.5",), 2, GiB)
    assert UnitResult.from_dict(r.to_dict()) == r


@pytest.mark.parametrize(
    "value",
    [[], "x", {"threads": "1"}, {"threads": 1.5}, {"memory": -1}, {"hugepages": [1]}, {"hugepages": {"2M": "x"}}],
)
def test_capacity_from_dict_refuses_what_no_unit_writes(value):
    with pytest.raises(ValueError):
        Capacity.from_dict(value)


def test_capacity_round_trips_and_drops_unknown_page_sizes():
    c = Capacity(threads=3, vcpus=4, memory=GiB, hugepages={"2M": 5})
    assert Capacity.from_dict(c.to_dict()) == c
    assert Capacity.from_dict({"hugepages": {"4M": 1, "2M": 2}}).hugepages == {"2M": 2}


# ---------------------------------------------------------------------------------------------
# Ready means usable: running, with an address another machine can reach


def _result(**vm_fields) -> UnitResult:
    (d,) = judge([rel(spec("a"))], RelationSettings(), {})
    here = [vm("vm-a", d.owner, **vm_fields)]
    return unit_results("h/0", decisions=[d], assignments={d.owner: "h/0"}, vms=here, failures={})[d.owner]


def test_a_vm_without_an_address_is_pending_and_says_it_is_booting():
    result = _result(login_user="ubuntu", host_keys=(host_key(ED25519),))
    assert (result.status, result.message, result.addresses) == ("pending", BOOTING, ())
    assert result.has_vm and result.name == "vm-a"  # it exists: never composed again, counted in quotas


@pytest.mark.parametrize(
    "addresses", [("fe80::5054:ff:fe00:1",), ("169.254.3.4",), ("127.0.0.1",), ("not-an-ip",), ("::",)]
)
def test_addresses_nobody_else_can_reach_do_not_make_a_vm_ready(addresses):
    assert _result(addresses=addresses).status == "pending"


@pytest.mark.parametrize(
    "fields, words",
    [({"state": "stopped"}, "VM is stopped; waiting for it to run"), ({"phase": "composing"}, "VM is composing")],
)
def test_a_vm_that_does_not_run_yet_is_pending_without_its_stale_addresses(fields, words):
    result = _result(addresses=("10.0.0.9",), **fields)
    assert (result.status, result.addresses) == ("pending", ())
    assert result.message.startswith(words)


def test_a_ready_vm_carries_its_addresses_login_user_and_public_host_keys_in_a_stable_order():
    keys = (host_key(RSA), host_key(ED25519), host_key(ECDSA))
    result = _result(addresses=("fd00::9", "10.0.0.9/24", "fe80::1", "10.0.0.10"), login_user="ubuntu", host_keys=keys)
    assert result.status == "ready" and result.message is None
    assert result.addresses == ("10.0.0.9", "10.0.0.10", "fd00::9")
    assert result.login_user == "ubuntu"
    assert [key.algorithm for key in result.host_keys] == ["ecdsa-sha2-nistp256", "ssh-ed25519", "ssh-rsa"]
    assert UnitResult.from_dict(result.to_dict()) == result


def test_only_public_host_keys_with_their_own_fingerprint_are_reported():
    good = host_key(ED25519)
    private = HostKey("ssh-ed25519", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n", good.fingerprint)
    commented = HostKey("ssh-ed25519", ED25519 + " root@vm", good.fingerprint)
    mislabelled = HostKey("ssh-rsa", good.public_key, good.fingerprint)
    wrong_print = HostKey("ecdsa-sha2-nistp256", host_key(ECDSA).public_key, good.fingerprint)
    result = _result(addresses=("10.0.0.9",), host_keys=(private, commented, mislabelled, wrong_print))
    # the comment is dropped (it could carry anything), the fingerprint recomputed from the key itself
    assert result.host_keys == (host_key(ECDSA), good)
    assert "PRIVATE" not in str(result.to_dict())
    # a peer's published result is read the same way
    published = result.to_dict() | {"host_keys": [private.to_dict(), good.to_dict()]}
    assert UnitResult.from_dict(published).host_keys == (good,)


def test_a_vm_booting_on_a_peer_is_held_there_not_composed_again():
    (d,) = judge([rel(spec("a"))], RelationSettings(), {})
    booting = UnitResult("pending", BOOTING, "vm-a", cores=1, memory=GiB)
    assert booting.has_vm and not UnitResult("pending", "being composed on h/1").has_vm
    work = unit_work(
        "h/0", decisions=[d], assignments={d.owner: "h/1"}, vms=[], live_apps={f"{M}/client"}, held_elsewhere={d.owner}
    )
    assert work.compose == ()
    merged = merge_statuses([rel()], decisions=[d], assignments={}, results={"h/1": {d.owner: booting}}, waiting={})
    assert (merged[1][0]["status"], merged[1][0]["unit"], merged[1][0]["message"]) == ("pending", "h/1", BOOTING)
