"""The charm's actions through ops.testing against the REAL libvirtd: a pinned hugepage VM really runs.

Only Juju is simulated (ops.testing); the charm builds its VmHost the way it does in production
(backend=libvirt, libvirt-uri from config), and libvirt itself is asked what happened.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
from ops import testing

from tests.unit.juju_cli import charm_context


@pytest.fixture
def charm_config(libvirt_uri) -> dict:
    return {"backend": "libvirt", "libvirt-uri": libvirt_uri}


def _run(name: str, params: dict, config: dict) -> dict:
    ctx = charm_context()
    ctx.run(ctx.on.action(name, params=params), testing.State(config=config))
    return ctx.action_results


def _affinity(dom) -> list[set[int]]:
    """Host CPUs each vCPU may run on, as libvirt reports for the running domain."""
    _, cpumaps = dom.vcpus()
    return [{cpu for cpu, allowed in enumerate(m) if allowed} for m in cpumaps]


def test_compose_action_runs_a_pinned_hugepage_vm_and_decompose_removes_it(charm_config, libvirt_conn, vm_names):
    import libvirt

    name = vm_names("charm")
    results = _run(
        "compose",
        {
            "cores": 1,
            "memory": "128M",
            "pinned_cores": "auto",
            "hugepages_backed": True,
            "start": True,
            "hostname": name,
        },
        charm_config,
    )
    assert results["name"] == name
    assert results["state"] == "running"
    (thread,) = json.loads(results["pinned"])
    hugepages = json.loads(results["hugepages"])
    assert sum(hugepages["per_node"].values()) * {"2M": 2, "1G": 1024}[hugepages["size"]] == 128

    dom = libvirt_conn.lookupByName(name)
    assert dom.isActive() == 1
    assert _affinity(dom) == [{thread}]
    xml = ET.fromstring(dom.XMLDesc(0))
    assert xml.find("memoryBacking/hugepages") is not None
    assert xml.find("cputune/vcpupin").get("cpuset") == str(thread)

    listed = json.loads(_run("list-vms", {}, charm_config)["json"])
    assert name in {v["name"] for v in listed}

    assert _run("decompose", {"name": name}, charm_config) == {"name": name, "decomposed": "true"}
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(name)


def test_compose_action_refused_creates_nothing(charm_config, libvirt_conn, vm_names):
    name = vm_names("charm")
    before = {d.name() for d in libvirt_conn.listAllDomains()}
    ctx = charm_context()
    with pytest.raises(testing.ActionFailed) as exc:
        ctx.run(
            ctx.on.action("compose", params={"cores": 1, "memory": "64T", "hostname": name}),
            testing.State(config=charm_config),
        )
    assert "memory" in exc.value.message
    assert "\n" not in exc.value.message
    assert {d.name() for d in libvirt_conn.listAllDomains()} == before
