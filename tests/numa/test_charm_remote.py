"""The charm's actions (ops.testing; only Juju is simulated) on a real 2-node host over qemu+ssh.

The charm builds its provider from `libvirt-uri` as in production, so its parameter path meets a
multi-node host; each result is checked against the guest's own kernel.
"""

from __future__ import annotations

import json

import pytest
from ops import testing

from tests.numa.inside import SMALL_ROOT, probe
from tests.unit.juju_cli import charm_context


def _run(guest, action: str, params: dict) -> dict:
    ctx = charm_context()
    ctx.run(
        ctx.on.action(action, params=params), testing.State(config={"backend": "libvirt", "libvirt-uri": guest.uri})
    )
    return ctx.action_results


def test_resources_action_describes_the_remote_nodes(guest_two):
    res = json.loads(_run(guest_two, "resources", {})["json"])
    assert [(n["id"], n["threads"]["total"], n["hugepages"]["2M"]["total"]) for n in res["nodes"]] == [
        (0, 2, 128),
        (1, 2, 128),
    ]


def test_compose_action_spans_both_nodes_and_decompose_returns_the_pages(guest_two, vm_names):
    before = probe(guest_two).free
    name = vm_names()
    params = {"cores": 2, "memory": "384M", "pinned_cores": "auto", "hugepages_backed": True, "start": True}
    params["storage"] = SMALL_ROOT
    results = _run(guest_two, "compose", {**params, "hostname": name})
    assert results["name"] == name and results["state"] == "running"
    per_node = {int(k): v for k, v in json.loads(results["hugepages"])["per_node"].items()}
    assert per_node == {0: 96, 1: 96}
    inside = probe(guest_two, name)
    assert inside.huge == per_node
    assert inside.free == {n: before[n] - per_node[n] for n in before}
    assert _run(guest_two, "decompose", {"name": name}) == {"name": name, "decomposed": "true"}
    assert probe(guest_two).free == before


def test_compose_action_that_fits_nowhere_fails_with_one_sentence(guest_two, vm_names):
    domains = guest_two.ssh("virsh list --all --name").split()
    ctx = charm_context()
    config = {"backend": "libvirt", "libvirt-uri": guest_two.uri}
    params = {"cores": 1, "memory": "1G", "pinned_cores": "auto", "hugepages_backed": True, "hostname": vm_names()}
    params["storage"] = SMALL_ROOT
    with pytest.raises(testing.ActionFailed) as exc:
        ctx.run(ctx.on.action("compose", params=params), testing.State(config=config))
    assert exc.value.message.startswith("hugepages 2M: need 512, node 0 has 128 free, node 1 has 128"), (
        exc.value.message
    )
    assert "\n" not in exc.value.message
    assert guest_two.ssh("virsh list --all --name").split() == domains
