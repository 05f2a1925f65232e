"""How many LXD API round-trips each use case may cost, counted against a recording in-memory LXD.

Every request the provider sends (pylxd's connecting GET /1.0 included) is recorded. Tests assert call
budgets (at most N round-trips per operation, writes exactly) and the few orderings that are safety
(a name checked before a create, a mark before a delete, a cancel before an undo), never the whole
sequence, so a harmless reordering passes and a change that re-reads what one CLI call or charm hook
already knows fails. The functional tests check the same paths on the real daemon.
"""

from __future__ import annotations

import json
from urllib.parse import unquote, urlsplit

import pytest

from vmhost.model import Policy, VmRequest
from vmhost.providers import base
from vmhost.providers import lxd as lxdmod
from vmhost.providers import lxd_config as cfg
from vmhost.providers.base import STATE_COMPOSING, STATE_READY, ComposeError, ProviderError
from vmhost.service import VmHost

GIB = 1024**3

# What every compose and decompose first reads through the service: /1.0 when connecting, then
# discover (resources, networks and each NIC's state, pools and each pool's space) and the VM listing.
SNAPSHOT = [
    ("GET", "/1.0"),
    ("GET", "/1.0/resources"),
    ("GET", "/1.0/networks"),
    ("GET", "/1.0/networks/lxdbr0/state"),
    ("GET", "/1.0/networks/eth0/state"),
    ("GET", "/1.0/storage-pools"),
    ("GET", "/1.0/storage-pools/default/resources"),
    ("GET", "/1.0/instances"),
]


DEFAULT_PROFILE_DEVICES = {
    "root": {"type": "disk", "path": "/", "pool": "default"},
    "eth0": {"type": "nic", "network": "lxdbr0", "name": "eth0"},
}


class _Response:
    def __init__(self, status: int, body: dict):
        self.status_code, self._body, self.text = status, body, json.dumps(body)

    def json(self) -> dict:
        return self._body


def _sync(metadata=None, status: int = 200) -> _Response:
    return _Response(status, {"type": "sync", "status_code": status, "metadata": metadata})


def _error(status: int, message: str) -> _Response:
    return _Response(status, {"type": "error", "error_code": status, "error": message})


class FakeLxd:
    """Enough of LXD 5.0's REST API for compose/decompose, recording each request's method and path.

    `config_at_create` keeps each instance's config as it was when the record appeared, which is what
    gc would see if vmhost crashed right then. `fail` maps (method, path) to an error status.
    `running` maps an operation id to how many more waits find it still Running (a slow image
    download); each wait moves `clock` on by its timeout, as the real daemon would have waited.
    """

    def __init__(self, projects=("default",)):
        self.calls: list[tuple[str, str]] = []
        self.projects = set(projects)
        self.instances: dict[tuple[str, str], dict] = {}
        self.volumes: dict[tuple[str, str, str], dict] = {}
        self.config_at_create: dict[str, dict] = {}
        self.fail: dict[tuple[str, str], int] = {}
        self.ops = 0
        self.running: dict[str, float] = {}
        self.clock = 0.0
        self.profiles = {"default": {"name": "default", "devices": DEFAULT_PROFILE_DEVICES}}
        self.wait_timeout_is_an_error = False
        self.wait_timeouts: dict[str, list[int]] = {}  # operation id -> the timeout of each wait for it
        self.image_aliases = {"noble"}  # LXD's own image store (shared by every project here)

    def close(self) -> None:
        pass

    def _op(self) -> _Response:
        self.ops += 1
        return _Response(202, {"type": "async", "metadata": {"id": f"op-{self.ops}"}})

    def get(self, url, **kw) -> _Response:  # pylxd's client asks for /1.0 this way when it connects
        return self.request("GET", url, **kw)

    def request(self, method, url, *, json=None, params=None, timeout=None) -> _Response:
        path = unquote(urlsplit(url).path)
        self.calls.append((method, path))
        params = params or {}
        project = params.get("project", "default")
        if (method, path) in self.fail:
            return _error(self.fail[(method, path)], f"injected failure of {method} {path}")
        parts = path.split("/")[2:]
        if method == "GET" and path == "/1.0":
            return _sync({"auth": "trusted", "api_extensions": ["instance_all_projects", "cloud_init"]})
        if method == "GET" and path == "/1.0/resources":
            return _sync(
                {
                    "cpu": {
                        "sockets": [{"cores": [{"threads": [{"id": 0, "numa_node": 0}, {"id": 1, "numa_node": 0}]}]}]
                    },
                    "memory": {"total": 8 * GIB, "hugepages_size": 2 * 1024**2, "hugepages_total": 1 * GIB},
                    "network": {"cards": []},
                }
            )
        if method == "GET" and parts[:2] == ["images", "aliases"] and len(parts) == 3:
            if parts[2] in self.image_aliases:
                return _sync({"name": parts[2], "target": "f" * 64})
            return _error(404, "Image alias not found")
        if method == "GET" and path == "/1.0/networks":
            return _sync(
                [
                    {"name": "lxdbr0", "type": "bridge"},
                    {"name": "eth0", "type": "physical"},
                    {"name": "lo", "type": "loopback"},
                ]
            )
        if method == "GET" and parts[:1] == ["networks"] and parts[-1] == "state":
            return _sync({"addresses": [{"address": "10.0.0.1", "netmask": "24", "scope": "global"}]})
        if method == "GET" and path == "/1.0/storage-pools":
            return _sync(
                [{"name": "default", "driver": "dir"}] if params.get("recursion") else ["/1.0/storage-pools/default"]
            )
        if method == "GET" and parts[:1] == ["storage-pools"] and parts[-1] == "resources":
            return _sync({"space": {"total": 100 * 10**9, "used": 10**9}})
        if method == "GET" and path == "/1.0/instances":
            return _sync([{**i, "project": p} for (p, _), i in self.instances.items()])
        if parts[:1] == ["profiles"]:
            return _sync(self.profiles[parts[1]]) if parts[1] in self.profiles else _error(404, "Profile not found")
        if method == "GET" and parts[:1] == ["projects"]:
            return _sync({"name": parts[1]}) if parts[1] in self.projects else _error(404, "Project not found")
        if method == "POST" and path == "/1.0/projects":
            self.projects.add(json["name"])
            return _sync(None, 201)
        if method == "POST" and path == "/1.0/instances":
            name = json["name"]
            self.instances[(project, name)] = {
                "name": name,
                "type": json["type"],
                "status": "Stopped",
                "config": {"volatile.uuid": "u", **json["config"]},  # LXD keeps a volatile.uuid given at create
                "devices": json["devices"],
                "expanded_devices": json["devices"],
            }
            self.config_at_create[name] = dict(json["config"])
            return self._op()
        if parts[:1] == ["operations"]:
            op = parts[1]
            if method == "DELETE":
                self.running[op] = 0
                return _sync(None)
            running = self.running.get(op, 0) > 0
            if parts[-1] == "wait":
                self.wait_timeouts.setdefault(op, []).append(int(params["timeout"]))
                self.clock += int(params["timeout"])
                if running:
                    self.running[op] -= 1
                    if self.wait_timeout_is_an_error:  # newer LXD: the wait's own deadline is an error answer
                        return _error(500, "context deadline exceeded")
            if running:
                return _sync({"id": op, "status": "Running", "status_code": 103, "description": "Creating instance"})
            return _sync({"status": "Success", "status_code": 200, "metadata": None})
        if parts[:1] == ["instances"] and len(parts) >= 2:
            key = (project, parts[1])
            if key not in self.instances:
                return _error(404, "Instance not found")
            inst = self.instances[key]
            if method == "GET":
                return _sync(inst)
            if method == "PATCH":
                inst["config"].update(json.get("config") or {})
                return _sync(None)
            if method == "PUT" and parts[-1] == "state":
                inst["status"] = "Running" if json["action"] == "start" else "Stopped"
                return self._op()
            if method == "DELETE":
                del self.instances[key]
                return self._op()
        if parts[:1] == ["storage-pools"] and parts[2:4] == ["volumes", "custom"]:
            pool = parts[1]
            if method == "POST":
                self.volumes[(project, pool, json["name"])] = json
                return _sync(None, 201)
            if method == "GET" and len(parts) == 4:
                return _sync([v for (p, pl, _), v in self.volumes.items() if p == project and pl == pool])
            if method == "DELETE":
                if self.volumes.pop((project, pool, parts[4]), None) is None:
                    return _error(404, "Storage volume not found")
                return _sync(None)
        raise AssertionError(f"the fake LXD does not know {method} {path} {params}")


@pytest.fixture
def lxd(monkeypatch):
    fake = FakeLxd(projects=("default", "vmhost"))
    monkeypatch.setattr(lxdmod.LxdProvider, "_session", lambda self: fake)
    return fake


def host(tmp_path) -> VmHost:
    return VmHost(lxdmod.LxdProvider(), Policy(), lock_path=str(tmp_path / "lock"))


def request(**kw) -> VmRequest:
    return VmRequest.from_dict({"cores": 1, "memory": "256M", **kw})


def within(calls: list[tuple[str, str]], **limits: int) -> bool:
    """At most `limits[method]` round-trips of each method, and none of any other: a budget, not a sequence
    (a reordering passes, one more read fails)."""
    counts: dict[str, int] = {}
    for method, _ in calls:
        counts[method] = counts.get(method, 0) + 1
    return all(n <= limits.get(method, 0) for method, n in counts.items())


def test_compose_costs_the_snapshot_three_checks_create_mark_and_one_read_back(lxd, tmp_path):
    vm = host(tmp_path).compose(request(name="vm-a"))
    # Budget: the snapshot, then at most 7 round-trips (which profile, our project, no VM of that name,
    # create + its wait, the mark composing -> ready, one read back of the MACs); 2 writes only.
    assert len(lxd.calls) <= len(SNAPSHOT) + 7
    assert within(lxd.calls[len(SNAPSHOT) :], GET=5, POST=1, PATCH=1)
    # Safety, not sequence: the name is checked before the create (a failed create must never undo
    # someone else's VM).
    assert lxd.calls.index(("GET", "/1.0/instances/vm-a")) < lxd.calls.index(("POST", "/1.0/instances"))
    assert vm.name == "vm-a" and vm.managed and vm.state == "stopped"
    # Crash safety: the record appeared marked unfinished (gc removes it), and ends ready.
    assert lxd.config_at_create["vm-a"][cfg.STATE_KEY] == STATE_COMPOSING
    assert lxd.instances[("vmhost", "vm-a")]["config"][cfg.STATE_KEY] == STATE_READY


def test_decompose_costs_the_snapshot_one_read_the_delete_and_one_volume_listing_per_pool(lxd, tmp_path):
    host(tmp_path).compose(request(name="vm-a", storage="root:10,data:2"))
    lxd.calls.clear()
    host(tmp_path).decompose("vm-a")
    # Budget: the snapshot, then at most 6 (one read, the mark, the delete + its wait, one volume listing
    # per pool, one delete per volume).
    assert len(lxd.calls) <= len(SNAPSHOT) + 6
    assert within(lxd.calls[len(SNAPSHOT) :], GET=3, PATCH=1, DELETE=2)
    # Safety: marked decomposing before anything is deleted, so gc finishes it after a crash.
    first_delete = next(i for i, c in enumerate(lxd.calls) if c[0] == "DELETE")
    assert lxd.calls.index(("PATCH", "/1.0/instances/vm-a")) < first_delete
    assert lxd.instances == {} and lxd.volumes == {}


def test_compose_with_a_volume_and_start_adds_exactly_those_writes(lxd, tmp_path):
    vm = host(tmp_path).compose(request(name="vm-b", storage="root:10,data:2"), start=True)
    writes = [c for c in lxd.calls if c[0] != "GET"]
    assert sorted(writes) == sorted(
        [
            ("POST", "/1.0/storage-pools/default/volumes/custom"),
            ("POST", "/1.0/instances"),
            ("PATCH", "/1.0/instances/vm-b"),
            ("PUT", "/1.0/instances/vm-b/state"),
        ]
    )
    # The plain compose (3 checks, create + wait, mark, read back), plus the volume and start + its wait.
    assert len(lxd.calls) <= len(SNAPSHOT) + 3 + 4 + 1 + 2
    assert vm.state == "running"


def test_addresses_are_read_by_list_not_by_compose_under_the_host_lock(lxd, tmp_path):
    """A running VM's state (its DHCP addresses) costs a call per VM: list makes it, placement's snapshot does not."""
    h = host(tmp_path)
    h.compose(request(name="vm-a"), start=True)
    lxd.calls.clear()
    h.compose(request(name="vm-b"))
    assert not [c for c in lxd.calls if c[1].startswith("/1.0/instances/") and c[1].endswith("/state")]
    lxd.calls.clear()
    assert [v.name for v in h.vms()] == ["vm-a", "vm-b"]
    assert [c for c in lxd.calls if c[1].startswith("/1.0/instances/") and c[1].endswith("/state")] == [
        ("GET", "/1.0/instances/vm-a/state")
    ]


def test_a_second_compose_in_the_same_hook_does_not_reread_server_profile_or_project(lxd, tmp_path):
    h = host(tmp_path)
    h.compose(request(name="vm-a"))
    lxd.calls.clear()
    h.compose(request(name="vm-b"))
    assert ("GET", "/1.0") not in lxd.calls
    assert ("GET", "/1.0/profiles/vmhost") not in lxd.calls
    assert ("GET", "/1.0/projects/vmhost") not in lxd.calls
    assert len(lxd.calls) <= len(SNAPSHOT) - 1 + 1 + 4  # the name check, create + wait, mark, read back


def test_first_compose_creates_the_project_once(monkeypatch, tmp_path):
    fake = FakeLxd(projects=("default",))
    monkeypatch.setattr(lxdmod.LxdProvider, "_session", lambda self: fake)
    h = host(tmp_path)
    h.compose(request(name="vm-a"))
    h.compose(request(name="vm-b"))
    assert fake.calls.count(("POST", "/1.0/projects")) == 1
    assert fake.calls.count(("GET", "/1.0/projects/vmhost")) == 1
    assert {n for _, n in fake.instances} == {"vm-a", "vm-b"}


def test_list_vms_is_the_connection_resources_and_one_listing(lxd, tmp_path):
    host(tmp_path).compose(request(name="vm-a"))
    lxd.calls.clear()
    assert [v.name for v in lxdmod.LxdProvider().list_vms()] == ["vm-a"]
    assert len(lxd.calls) <= 3 and set(lxd.calls) <= {
        ("GET", "/1.0"),
        ("GET", "/1.0/instances"),
        ("GET", "/1.0/resources"),
    }


def test_failed_create_undoes_the_volumes_with_one_delete_each(lxd, tmp_path):
    lxd.fail[("POST", "/1.0/instances")] = 400
    with pytest.raises(ComposeError) as err:
        host(tmp_path).compose(request(name="vm-c", storage="root:10,data:2,logs:1"))
    assert err.value.step == "create VM vm-c"
    assert lxd.instances == {} and lxd.volumes == {}
    after_create = lxd.calls[lxd.calls.index(("POST", "/1.0/instances")) + 1 :]
    # One delete each: the half-made record a failed create may leave (404 here) and each volume.
    assert sorted(after_create) == [
        ("DELETE", "/1.0/instances/vm-c"),
        ("DELETE", "/1.0/storage-pools/default/volumes/custom/vm-c-data"),
        ("DELETE", "/1.0/storage-pools/default/volumes/custom/vm-c-logs"),
    ]


def test_failed_start_removes_the_vm_and_its_volume(lxd, tmp_path):
    lxd.fail[("PUT", "/1.0/instances/vm-d/state")] = 400
    with pytest.raises(ComposeError) as err:
        host(tmp_path).compose(request(name="vm-d", storage="root:10,data:2"), start=True)
    assert err.value.step == "start VM vm-d"
    assert lxd.instances == {} and lxd.volumes == {}


def test_a_vm_with_interfaces_gets_exactly_them_the_profiles_nic_masked_for_one_more_read(lxd, tmp_path):
    vm = host(tmp_path).compose(request(name="vm-n", interfaces="net0:name=lxdbr0"))
    profile_reads = [c for c in lxd.calls if c[1].startswith("/1.0/profiles/")]
    assert len(profile_reads) <= 2 and set(profile_reads) == {
        ("GET", "/1.0/profiles/vmhost"),
        ("GET", "/1.0/profiles/default"),
    }
    devices = lxd.instances[("vmhost", "vm-n")]["devices"]
    assert {k: v for k, v in devices.items() if v["type"] != "disk"} == {
        "net0": {"type": "nic", "nictype": "bridged", "parent": "lxdbr0", "boot.priority": "10"},
        "eth0": {"type": "none"},
    }
    assert [n.label for n in vm.allocation.nics] == ["net0"]


def test_the_vmhost_profile_is_read_once_for_its_name_and_its_nics(lxd, tmp_path):
    lxd.profiles["vmhost"] = {
        "name": "vmhost",
        "devices": {"lan": {"type": "nic", "nictype": "bridged", "parent": "br0"}},
    }
    host(tmp_path).compose(request(name="vm-p", interfaces="net0:name=lxdbr0"))
    assert [c for c in lxd.calls if c[1].startswith("/1.0/profiles/")] == [("GET", "/1.0/profiles/vmhost")]
    assert lxd.instances[("vmhost", "vm-p")]["devices"]["lan"] == {"type": "none"}
    assert "eth0" not in lxd.instances[("vmhost", "vm-p")]["devices"]  # default's NIC: not this VM's profile


def test_image_compose_keeps_waiting_while_lxd_is_still_creating(lxd, tmp_path):
    """A slow image download: the first two waits time out with the operation Running; the compose still succeeds."""
    lxd.running["op-1"] = 2
    vm = host(tmp_path).compose(request(name="vm-i"), boot="image", image="noble")
    assert vm.name == "vm-i" and vm.managed
    assert lxd.calls.count(("GET", "/1.0/operations/op-1/wait")) == 3
    assert not [c for c in lxd.calls if c[0] == "DELETE"]
    assert lxd.instances[("vmhost", "vm-i")]["config"][cfg.STATE_KEY] == STATE_READY


def test_an_image_alias_lxd_does_not_have_is_one_sentence_before_anything_is_made(lxd, tmp_path):
    with pytest.raises(
        ProviderError, match=r"LXD has no image alias 'jammy' for project 'vmhost' \(lxc image alias list\)"
    ):
        host(tmp_path).compose(request(name="vm-a", storage="root:1G,data:1G"), boot="image", image="jammy")
    assert not [c for c in lxd.calls if c[0] in ("POST", "PUT", "PATCH", "DELETE") and "projects" not in c[1]]
    assert not lxd.instances and not lxd.volumes


def test_a_wait_that_times_out_with_an_error_answer_reads_the_operation_and_keeps_waiting(lxd, tmp_path):
    lxd.running["op-1"] = 2
    lxd.wait_timeout_is_an_error = True
    vm = host(tmp_path).compose(request(name="vm-j"), boot="image", image="noble")
    assert vm.name == "vm-j"
    assert ("GET", "/1.0/operations/op-1") in lxd.calls
    assert not [c for c in lxd.calls if c[0] == "DELETE"]


@pytest.mark.parametrize(
    ("boot", "bound"), [("image", lxdmod.IMAGE_CREATE_TIMEOUT), ("network", lxdmod.OPERATION_TIMEOUT)]
)
def test_an_operation_past_its_bound_is_cancelled_before_the_vm_is_undone(lxd, tmp_path, monkeypatch, boot, bound):
    monkeypatch.setattr(lxdmod, "_clock", lambda: lxd.clock)
    lxd.running["op-1"] = float("inf")
    with pytest.raises(ComposeError) as err:
        host(tmp_path).compose(request(name="vm-s"), boot=boot, image="noble" if boot == "image" else None)
    assert err.value.step == "create VM vm-s"
    assert f"did not finish 'Creating instance' within {bound} s; cancelled it" in str(err.value)
    waits = lxd.wait_timeouts["op-1"]
    assert sum(waits) == bound and max(waits) <= lxdmod.OPERATION_TIMEOUT
    after_create = lxd.calls[lxd.calls.index(("POST", "/1.0/instances")) + 1 :]
    # Budget: the bounded waits, the cancel, the delete and its wait; nothing else.
    assert len(after_create) <= len(waits) + 3
    # Safety: cancelled first, so LXD stops making what is undone next.
    assert after_create.index(("DELETE", "/1.0/operations/op-1")) < after_create.index(
        ("DELETE", "/1.0/instances/vm-s")
    )
    assert lxd.instances == {}


# ---------------------------------------------------------------------------------------------
# The standard-library transport to the local socket (what the fake above stands in for)


def test_no_daemon_on_the_socket_is_one_clear_error_after_bounded_retries(tmp_path, monkeypatch):

    slept: list[float] = []
    monkeypatch.setattr("time.sleep", slept.append)  # ours and tenacity's waits
    p = lxdmod.LxdProvider(uri=str(tmp_path / "missing.socket"))
    with pytest.raises(ProviderError, match=r"cannot reach LXD at .*missing\.socket"):
        p.list_vms()
    assert len(slept) == base.RETRY_ATTEMPTS - 1  # five attempts, four waits
    assert slept == sorted(slept) and max(slept) <= 2
