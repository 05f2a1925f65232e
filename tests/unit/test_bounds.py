"""Every size, count, ratio and string a VM request or policy carries has a floor and a ceiling.

Whoever asks (CLI, action, relation), the same VmRequest.from_dict / Policy.from_dict check it, and
the refusal is one ParseError sentence in human sizes, before anything is planned or created.
"""

from __future__ import annotations

import pytest

from tests.unit import test_charm
from tests.unit.hosts import GiB, MiB, synthetic_host
from vmhost.model import Policy, VmRequest
from vmhost.parse import (
    MAX_DISKS,
    MAX_INTERFACES,
    MAX_VM_CORES,
    ParseError,
    human_size,
    parse_storage,
)
from vmhost.placement import PlacementError, place
from vmhost.relation_policy import RelationSettings, RequestRejected, build_request

TiB = 1024**4


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"memory": "1M"}, "memory '1M' is too small (1M); allowed: 64M to 16T"),
        ({"memory": 1024**2}, "memory 1048576 is too small (1M); allowed: 64M to 16T"),
        ({"memory": "17T"}, "memory '17T' is too large (17T); allowed: 64M to 16T"),
        ({"memory": "9" * 400}, "memory '9999"),
        ({"cores": MAX_VM_CORES + 1}, f"cores 1025 must be a whole number from 1 to {MAX_VM_CORES}"),
        ({"cores": 0}, "cores 0 must be a whole number from 1"),
        ({"storage": "root:1K"}, "storage size '1K' in 'root:1K' is too small (1K); allowed: 64M to 64T"),
        ({"storage": "root:65T"}, "storage size '65T' in 'root:65T' is too large (65T); allowed: 64M to 64T"),
        ({"storage": "root:" + "9" * 400}, "is too large (over 1024T); allowed: 64M to 64T"),
        ({"storage": ",".join(f"d{i}:1" for i in range(30))}, f"storage lists 30 disks; at most {MAX_DISKS}"),
        ({"storage": "root:1(" + "a," * 3000 + "a)"}, "storage is 6009 characters long; at most 4096"),
        (
            {"interfaces": ";".join(f"e{i}:space=a" for i in range(17))},
            f"interfaces lists 17 interfaces; at most {MAX_INTERFACES}",
        ),
        ({"pinned_cores": "0," * 3000, "cores": 1}, "cpu set is 6000 characters long"),
        ({"pool": "bad pool!"}, "pool 'bad pool!' is not a pool name"),
    ],
)
def test_vm_request_bounds_refuse_in_one_sentence(fields, says):
    with pytest.raises(ParseError) as e:
        VmRequest.from_dict({"cores": 1, "memory": "1G", **fields})
    message = str(e.value)
    assert says in message
    assert "\n" not in message and len(message) < 400


def test_vm_request_bounds_are_inclusive():
    r = VmRequest.from_dict({"cores": MAX_VM_CORES, "memory": "64M", "storage": "root:64M,data:64T"})
    assert r.memory == 64 * MiB and [d.size for d in r.storage] == [64 * MiB, 64 * TiB]
    assert len(parse_storage(",".join(f"d{i}:1" for i in range(MAX_DISKS)))) == MAX_DISKS
    many = ";".join(f"e{i}:space=a" for i in range(MAX_INTERFACES))
    assert len(VmRequest.from_dict({"interfaces": many}).interfaces) == MAX_INTERFACES


def test_built_specs_are_counted_too():
    """The relation builds its disks and interfaces in code; from_dict counts them the same way."""
    disks = parse_storage(",".join(f"d{i}:1" for i in range(MAX_DISKS)))
    with pytest.raises(ParseError, match="storage lists 27 disks"):
        VmRequest.from_dict({"storage": (*disks, disks[0])})


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ({"memory": "1M"}, "memory '1M' is too small"),
        ({"storage": "root:1K"}, "is too small (1K)"),
        ({"storage": "root:" + "9" * 400}, "is too large"),
        ({"cores": 5000}, "cores 5000 must be a whole number from 1 to 1024"),
    ],
)
def test_relation_requests_meet_the_same_bounds(spec, says):
    with pytest.raises(RequestRejected) as e:
        build_request(spec, owner="model/app/req-1", settings=RelationSettings())
    assert says in str(e.value)


@pytest.mark.parametrize(
    ("key", "raw", "says"),
    [
        ("cpu_overcommit_ratio", 1e308, "cpu_overcommit_ratio 1e+308 must be a number from 0.1 to 64"),
        ("cpu_overcommit_ratio", "inf", "cpu_overcommit_ratio 'inf' must be a number from 0.1 to 64"),
        ("cpu_overcommit_ratio", "abc", "cpu_overcommit_ratio 'abc' must be a number from 0.1 to 64"),
        ("cpu_overcommit_ratio", 0.05, "from 0.1 to 64"),
        ("memory_overcommit_ratio", 5, "memory_overcommit_ratio 5 must be a number from 0.1 to 4"),
        ("memory_overcommit_ratio", "nan", "memory_overcommit_ratio 'nan' must be"),
        ("reserved_memory", "9" * 400, "reserved_memory '9999"),
    ],
)
def test_policy_bounds(key, raw, says):
    with pytest.raises(ParseError) as e:
        Policy.from_dict({key: raw})
    assert says in str(e.value)


def test_policy_bounds_are_inclusive_and_usable_by_placement():
    policy = Policy.from_dict({"cpu_overcommit_ratio": 64, "memory_overcommit_ratio": 4})
    host = synthetic_host(nodes=1, cores_per_node=2, threads_per_core=1, memory_per_node=16 * GiB)
    a = place(host, [], VmRequest.from_dict({"cores": 128, "memory": "1G"}), policy)
    assert a.vcpus == 128
    assert Policy.from_dict({"cpu_overcommit_ratio": "0.1"}).cpu_overcommit_ratio == 0.1


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0B"), (512, "512B"), (1536, "1.5K"), (5194375168, "4.8G"), (8 * GiB, "8G"), (10**400, None)],
)
def test_human_size_is_short_and_never_overflows(n, text):
    shown = human_size(n)
    if text is not None:
        assert shown == text
    else:
        assert shown.endswith("T")


def test_placement_messages_use_one_unit_system():
    """Issue 10: "need 8G, the host has 5194375168 bytes" mixed units; both sides are now human sizes."""
    host = synthetic_host(nodes=1, memory_per_node=5194375168)
    with pytest.raises(PlacementError) as e:
        place(host, [], VmRequest.from_dict({"cores": 1, "memory": "8G"}), Policy())
    assert str(e.value).startswith("memory: need 8G, the host has 4.8G of general memory free (0B of 4.8G in use")
    assert "bytes" not in str(e.value)


# --- the compose action: the same bounds, one sentence, nothing created ---------------------------------

# The charm tier's in-memory hypervisor and temp-dir machine.
fake, machine = test_charm.fake, test_charm.machine


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"storage": "root:" + "9" * 400}, "is too large (over 1024T); allowed: 64M to 64T"),
        ({"storage": "root:1K"}, "storage size '1K' in 'root:1K' is too small (1K)"),
        ({"storage": ",".join(f"d{i}:1" for i in range(30))}, "storage lists 30 disks; at most 26 are allowed"),
        ({"memory": "1M"}, "memory '1M' is too small (1M); allowed: 64M to 16T"),
        ({"cores": 5000}, "parameter cores: 5000 is not allowed: input should be less than or equal to 1024"),
        ({"interfaces": "e:ip=10.0.0.1"}, "ip 10.0.0.1 is an address of this host (br0)"),
        ({"interfaces": "e:ip=10.0.0.255"}, "ip 10.0.0.255 is the broadcast address of 10.0.0.0/24"),
    ],
)
def test_compose_action_bounds(fake, machine, params, says):
    message = test_charm.fail_action("compose", params)
    assert says in message and "\n" not in message
    assert fake.vms == {} and fake.composed == []
