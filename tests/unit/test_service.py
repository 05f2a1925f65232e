"""VmHost (the shared use cases), the resources view and the `vmhost` command over an in-memory provider."""

from __future__ import annotations

import json
import threading

import pytest

from tests.unit.fakes import GIB, FakeProvider
from vmhost import cli
from vmhost.model import HostTopology, Policy, VmRequest
from vmhost.placement import PlacementError
from vmhost.providers.base import NotFound, Provider
from vmhost.providers.libvirt import LibvirtProvider
from vmhost.providers.lxd import LxdProvider
from vmhost.resources_view import render_view, summary_line
from vmhost.service import Refused, VmHost, host_lock, new_vm_name


@pytest.fixture
def host(tmp_path):
    return VmHost(FakeProvider(), Policy(), lock_path=str(tmp_path / "lock"))


def req(**kw) -> VmRequest:
    return VmRequest.from_dict({"cores": 2, "memory": "2G", **kw})


def test_fake_is_a_provider():
    assert isinstance(FakeProvider(), Provider)


def test_compose_names_the_vm_and_records_the_allocation(host):
    vm = host.compose(req(pinned_cores="auto", hugepages_backed=True, hugepage_size="2M"), start=True)
    assert vm.name.startswith("vm-") and len(vm.name) == 7
    assert vm.state == "running"
    assert len(vm.allocation.pinned) == 2
    assert vm.allocation.hugepages.pages == 1024
    assert host.vms()[0].name == vm.name


def test_compose_refuses_a_taken_name_and_creates_nothing(host):
    host.compose(req(name="web"))
    with pytest.raises(ValueError, match="'web' already exists"):
        host.compose(req(name="web"))
    assert [v.name for v in host.vms()] == ["web"]


def test_second_compose_never_reuses_pinned_threads(host):
    a = host.compose(req(pinned_cores="auto"))
    b = host.compose(req(pinned_cores="auto"))
    assert set(a.allocation.pinned).isdisjoint(b.allocation.pinned)


def test_composes_and_decomposes_keep_the_usage_index_in_step_with_the_hypervisor(host):
    from dataclasses import replace

    from vmhost.placement import compute_usage

    made = [host.compose(req(cores=2, pinned_cores="auto", name=f"vm-{i}")).name for i in range(3)]
    host.decompose(made[1])
    # Changed behind vm-host's back (another tool, a restore): the index sees it on the next read.
    vm = host.provider.vms["vm-0"]
    host.provider.vms["vm-0"] = replace(vm, allocation=replace(vm.allocation, pinned=(9, 10)))
    d = host.compose(req(cores=2, pinned_cores="auto", name="vm-3"))
    allocations = host.allocations()
    fresh = compute_usage(host.topology(), allocations, host.policy)
    assert host._index.state(host.topology(), allocations, host.policy).usage == fresh
    assert set(d.allocation.pinned).isdisjoint({9, 10, *host.provider.vms["vm-2"].allocation.pinned})


def test_explicit_collision_names_the_owner_and_creates_nothing(host):
    first = host.compose(req(cores=1, pinned_cores=[3], name="first"))
    with pytest.raises(PlacementError, match="first"):
        host.compose(req(cores=1, pinned_cores=[3], name="second"))
    assert [v.name for v in host.vms()] == [first.name]


def test_boot_mode_is_checked_before_anything_is_made(host):
    with pytest.raises(ValueError, match="boot 'disk' is not a boot mode; allowed: network, image"):
        host.compose(req(), boot="disk")
    with pytest.raises(ValueError, match="boot=image needs an image"):
        host.compose(req(), boot="image")
    assert host.vms() == []


def test_image_boot_gets_a_hostname_seed_and_network_boot_none(host):
    host.compose(req(name="web-1"), boot="image", image="jammy")
    host.compose(req(name="pxe-1"))
    plans = host.provider.plans
    assert plans["web-1"].cloud_init.hostname == "web-1"
    assert plans["pxe-1"].cloud_init is None


def test_pool_filter_and_decompose(host):
    host.compose(req(name="a", pool="prod"))
    host.compose(req(name="b", pool="dev"))
    assert [v.name for v in host.vms(pool="prod")] == ["a"]
    host.decompose("a")
    assert [v.name for v in host.vms()] == ["b"]
    with pytest.raises(NotFound, match="no VM named 'a'"):
        host.decompose("a")


def test_resources_reflect_pinned_threads_and_hugepages(host):
    host.compose(req(cores=4, pinned_cores="auto", hugepages_backed=True, hugepage_size="1G", memory="2G", name="db"))
    res = host.resources()
    assert json.loads(json.dumps(res)) == res
    pinned = sum(n["threads"]["pinned"] for n in res["nodes"])
    assert pinned == 4
    used_1g = sum(n["hugepages"]["1G"]["used"] for n in res["nodes"])
    assert used_1g == 2
    assert summary_line(res) == "fake: 1 VM, 4/16 threads pinned, 2/12 GiB hugepages"
    view = render_view(res)
    assert "NUMA node 0" in view and "NUMA node 1" in view
    assert "hugepages 1G: 2/4 used, 2 free" in view
    assert "db" in view


def test_new_vm_name_avoids_taken_names(monkeypatch):
    names = iter(["aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr("vmhost.service.secrets.token_hex", lambda n: next(names))
    assert new_vm_name({"vm-aaaa"}) == "vm-bbbb"


def test_host_lock_serialises_threads(tmp_path):
    path = str(tmp_path / "lock")
    inside, overlaps = [], []

    def work():
        with host_lock(path):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            threading.Event().wait(0.01)
            inside.pop()

    # flock is per open file description, so threads with their own open() exclude each other too.
    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert overlaps == []


# ---- the vmhost command -------------------------------------------------------------------------


@pytest.fixture
def fake(monkeypatch, tmp_path):
    provider = FakeProvider()
    monkeypatch.setenv("VMHOST_LOCK_FILE", str(tmp_path / "lock"))
    monkeypatch.setattr(cli, "make_provider", lambda settings: provider)
    return provider


def test_cli_compose_json_prints_the_allocation(fake, capsys):
    rc = cli.main(
        ["compose", "--cores", "2", "--memory", "1G", "--pinned-cores", "auto", "--hugepages-backed", "--json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["name"] in fake.vms
    assert out["vcpus"] == 2 and len(out["pinned"]) == 2
    assert out["hugepages"]["size"] in ("2M", "1G")
    assert out["memory"] == GIB


def test_cli_numa_nodes_places_on_exactly_that_many_nodes(fake, capsys):
    argv = ["compose", "--cores", "2", "--memory", "1G", "--pinned-cores", "auto", "--dry-run", "--json"]
    assert cli.main([*argv, "--numa-nodes", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["numa_nodes"]) == 2 and len(out["cells"]) == 2
    assert cli.main(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["numa_nodes"]) == 1


def test_cli_dry_run_creates_nothing(fake, capsys):
    assert cli.main(["compose", "--cores", "2", "--pinned-cores", "auto", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vcpus"] == 2
    assert fake.vms == {}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["compose", "--memory", "8Q"], "'8Q'"),
        (["compose", "--pinned-cores", "0-1", "--cores", "3"], "lists 2 CPUs but cores is 3"),
        (["compose", "--hostname", "Bad_Name"], "'Bad_Name' is not a valid host name"),
        (["compose", "--cores", "64", "--pinned-cores", "auto"], "need 64"),
        (["compose", "--cores", "2", "--numa-nodes", "0"], "numa_nodes '0' must be a whole number from 1 to 64"),
        (["compose", "--cores", "2", "--numa-nodes", "2", "--memory", "1G", "--hugepage-size", "1G"], "numa_nodes 2"),
        (["decompose", "ghost"], "no VM named 'ghost'"),
    ],
)
def test_cli_errors_are_one_line_exit_1_and_create_nothing(fake, capsys, argv, needle):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vmhost: error: ")
    assert needle in err[0]
    assert fake.vms == {}


def test_cli_list_start_stop_gc(fake, capsys):
    cli.main(["compose", "--hostname", "web", "--pool", "prod"])
    cli.main(["compose", "--hostname", "db", "--pool", "dev"])
    capsys.readouterr()
    assert cli.main(["list", "--pool", "prod", "--json"]) == 0
    assert [v["name"] for v in json.loads(capsys.readouterr().out)] == ["web"]
    assert cli.main(["start", "web", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"name": "web", "state": "running"}
    assert cli.main(["stop", "web"]) == 0
    assert capsys.readouterr().out.strip() == "web: stopped"
    fake.orphans = ["vmhost-vm-dead-root"]
    assert cli.main(["gc", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": ["vmhost-vm-dead-root"]}
    assert cli.main(["resources"]) == 0
    assert "fake: 2 VMs" in capsys.readouterr().out


# -- rule 1 for floating VMs: they run only on threads no VM pins -----------------------------------------

ALL_THREADS = tuple(range(16))  # TWO_NODE_HOST


@pytest.fixture
def reserved_host(tmp_path):
    """Threads 0 and 8 (core 0 of node 0) are the host's own."""
    return VmHost(FakeProvider(), Policy(reserved_cores=(0, 8)), lock_path=str(tmp_path / "lock"))


def _without(*gone: int) -> tuple[int, ...]:
    return tuple(t for t in ALL_THREADS if t not in gone)


def test_floating_compose_gets_the_shared_threads_and_confines_nothing(reserved_host):
    fake = reserved_host.provider
    vm = reserved_host.compose(req(name="float"))
    assert fake.plans["float"].shared_threads == _without(0, 8)
    assert vm.allocation.pinned is None and fake.confined == []


def test_pinned_compose_and_decompose_confine_floating_vms_to_the_shared_threads(reserved_host):
    fake = reserved_host.provider
    reserved_host.compose(req(name="float"))
    pinned = reserved_host.compose(req(cores=2, pinned_cores=[3, 11], name="pinned"))
    assert fake.plans["pinned"].shared_threads is None
    assert fake.confined == [_without(0, 8, 3, 11)]
    later = reserved_host.compose(req(name="float2"))
    assert fake.plans[later.name].shared_threads == _without(0, 8, 3, 11)
    reserved_host.decompose(pinned.name)
    assert fake.confined == [_without(0, 8, 3, 11), _without(0, 8)]
    reserved_host.decompose("float")  # a floating VM frees no thread: nothing to widen
    assert len(fake.confined) == 2


def test_failed_pinned_compose_gives_floating_vms_their_threads_back(reserved_host):
    fake = reserved_host.provider
    fake.fail_compose = RuntimeError("backend fell over")
    with pytest.raises(RuntimeError, match="fell over"):
        reserved_host.compose(req(cores=1, pinned_cores=[5], name="pinned"))
    assert fake.confined == [_without(0, 8, 5), _without(0, 8)]
    assert reserved_host.vms() == []


def test_pinned_compose_is_refused_when_floating_vms_cannot_be_confined(reserved_host):
    from vmhost.providers.base import ProviderError

    fake = reserved_host.provider
    fake.fail_confine = ProviderError("libvirt could not confine floating VMs")
    with pytest.raises(ProviderError, match="confine"):
        reserved_host.compose(req(cores=1, pinned_cores=[5], name="pinned"))
    assert fake.composed == [] and reserved_host.vms() == []


def test_decompose_succeeds_even_if_floating_vms_cannot_be_widened(reserved_host):
    from vmhost.providers.base import ProviderError

    fake = reserved_host.provider
    reserved_host.compose(req(cores=1, pinned_cores=[5], name="pinned"))
    fake.fail_confine = ProviderError("libvirt could not confine floating VMs")
    reserved_host.decompose("pinned")
    assert fake.decomposed == ["pinned"] and fake.confined[-1] == _without(0, 8)


def test_confinement_is_a_required_part_of_the_provider_contract():
    class WithoutConfinement:  # everything a provider has but confinement
        name = "bare"
        discover = list_vms = compose = decompose = start = stop = FakeProvider.discover
        storage_pools = networks = gc = close = FakeProvider.discover

    assert not isinstance(WithoutConfinement(), Provider)
    assert isinstance(FakeProvider(), Provider) and FakeProvider().confine_floating((2, 1)) is True
    assert LxdProvider.confines_floating is False and LibvirtProvider.confines_floating is True
    lxd = LxdProvider(uri="/nonexistent/unix.socket")  # no daemon is asked: LXD cannot confine, and says so
    assert lxd.confine_floating((1, 2), foreign=True) is False


def test_cli_image_paths_typed_at_the_shell_become_absolute_and_names_stay_names(fake, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compose", "--hostname", "a", "--boot", "image", "--image", "imgs/jammy.qcow2"]) == 0
    assert cli.main(["compose", "--hostname", "b", "--boot", "image", "--image", "jammy"]) == 0
    assert fake.plans["a"].image == str(tmp_path / "imgs/jammy.qcow2")
    assert fake.plans["b"].image == "jammy"


def test_accept_sees_the_plan_under_the_lock_and_a_refusal_creates_nothing(host):
    seen = []

    def accept(planned, topo):
        seen.append((planned.name, len(planned.pinned), len(topo.nodes)))
        return "eth0 lands on br9, which allowed-networks does not list"

    with pytest.raises(Refused, match="br9"):
        host.compose(req(name="x", pinned_cores="auto"), accept=accept)
    assert seen == [("x", 2, 2)]
    assert host.vms() == []
    vm = host.compose(req(name="y"), accept=lambda planned, topo: None)
    assert vm.name == "y"


def test_gc_confines_floating_vms_to_what_is_really_pinned_after_a_crash(reserved_host):
    """Defect 4: a crash left floating VMs confined as if a dead VM's threads were pinned; gc recomputes."""
    fake = reserved_host.provider
    reserved_host.compose(req(name="float"))
    pinned = reserved_host.compose(req(cores=1, pinned_cores=[5], name="pinned"))
    assert fake.confined[-1] == _without(0, 8, 5)
    del fake.vms[pinned.name]  # what the provider's gc removes: an unfinished VM
    fake.orphans = [pinned.name]
    assert reserved_host.gc() == [pinned.name]
    assert fake.confined[-1] == _without(0, 8)


def test_gc_still_returns_what_it_removed_when_confining_fails(reserved_host):
    from vmhost.providers.base import ProviderError

    fake = reserved_host.provider
    fake.orphans = ["vm-dead"]
    fake.fail_confine = ProviderError("libvirt could not confine floating VMs")
    assert reserved_host.gc() == ["vm-dead"]


@pytest.mark.parametrize("flag", [True, False])
def test_policy_decides_whether_foreign_vms_are_confined_too(tmp_path, flag):
    h = VmHost(FakeProvider(), Policy(confine_foreign_vms=flag), lock_path=str(tmp_path / "lock"))
    h.compose(req(cores=1, pinned_cores=[5], name="pinned"))
    assert h.provider.confined_foreign == [flag]


def test_confine_foreign_vms_setting_from_cli_env_and_dict(fake, monkeypatch, capsys):
    assert Policy.from_dict({}).confine_foreign_vms is True
    assert Policy.from_dict({"confine_foreign_vms": "false"}).confine_foreign_vms is False
    with pytest.raises(ValueError, match="confine_foreign_vms 'maybe' is not a yes/no value; use true or false"):
        Policy.from_dict({"confine_foreign_vms": "maybe"})
    assert cli._policy(cli.build_parser().parse_args(["resources"])).confine_foreign_vms is True
    args = cli.build_parser().parse_args(["resources", "--confine-foreign-vms", "no"])
    assert cli._policy(args).confine_foreign_vms is False
    monkeypatch.setenv("VMHOST_CONFINE_FOREIGN_VMS", "false")
    assert cli._policy(cli.build_parser().parse_args(["resources"])).confine_foreign_vms is False


def _vm(name, *, pinned=None, managed=True, state="running"):
    from vmhost.model import Allocation, VmInfo

    alloc = Allocation(name=name, vcpus=len(pinned or (1,)), memory=GIB, pinned=pinned, other=not managed)
    return VmInfo(name, state, alloc, managed=managed)


def test_shared_pinned_threads_name_the_vms_that_may_run_there():
    from vmhost.resources_view import shared_pinned_threads

    vms = [
        _vm("ours-pinned", pinned=(2, 3)),
        _vm("ours-float"),
        _vm("theirs-float", managed=False),
        _vm("theirs-stopped", managed=False, state="stopped"),
        _vm("theirs-on-3", pinned=(3, 9), managed=False),
    ]
    # libvirt confining both: only a foreign VM that pins itself onto our thread shares it.
    assert shared_pinned_threads(vms, (True, True)) == [
        {"thread": 3, "pinned_by": "ours-pinned", "shared_with": ["theirs-on-3"]}
    ]
    # libvirt with the opt-out: running foreign floating VMs too (never a stopped one, never ours).
    assert shared_pinned_threads(vms, (True, False)) == [
        {"thread": 2, "pinned_by": "ours-pinned", "shared_with": ["theirs-float"]},
        {"thread": 3, "pinned_by": "ours-pinned", "shared_with": ["theirs-float", "theirs-on-3"]},
    ]
    # LXD: nothing is kept off, our floating VMs included.
    assert shared_pinned_threads(vms, (False, False))[0] == {
        "thread": 2,
        "pinned_by": "ours-pinned",
        "shared_with": ["ours-float", "theirs-float"],
    }


def test_resources_and_status_say_which_pinned_threads_are_shared(tmp_path):
    class Unconfined(FakeProvider):  # a backend without per-VM affinity (LXD): it says it cannot confine
        confines_floating = False

        def confine_floating(self, threads, foreign=False):
            return False

    provider = Unconfined()
    h = VmHost(provider, Policy(), lock_path=str(tmp_path / "lock"))
    pinned = h.compose(req(cores=1, pinned_cores=[5], name="pinned"), start=True)
    assert h.resources()["shared_pinned_threads"] == []
    provider.vms["other"] = _vm("other", managed=False)
    res = h.resources()
    assert res["shared_pinned_threads"] == [{"thread": 5, "pinned_by": pinned.name, "shared_with": ["other"]}]
    assert summary_line(res).endswith("; pinned threads 5 shared with other")
    assert "pinned thread 5 of pinned is shared with other" in render_view(res)


def test_space_bridges_label_discovered_bridges_with_their_space(tmp_path):
    topo = HostTopology.from_dict(
        {
            "nodes": [{"id": 0, "memory": 1 << 30, "cores": [{"id": 0, "threads": [0]}]}],
            "nics": [{"name": "br0", "kind": "bridge"}, {"name": "eno1"}],
        }
    )
    h = VmHost(FakeProvider(topo), Policy(), lock_path=str(tmp_path / "lock"), space_bridges={"public": "br0"})
    nics = {n.name: n for n in h.topology().nics}
    assert nics["br0"].space == "public"
    assert nics["br0"].kind == "bridge"
    assert nics["eno1"].space is None
    assert VmHost(FakeProvider(topo), Policy()).topology() is topo  # no mapping: discovered as is
