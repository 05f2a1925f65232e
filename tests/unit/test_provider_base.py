"""What both providers share lives once in providers/base.py: state names, volume naming, MACs, the plan check."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from vmhost.model import Allocation, ComposePlan
from vmhost.providers import base, lxd_config
from vmhost.providers.base import LXD_OUI, QEMU_OUI, ProviderError, check_plan, random_mac, volume_name


def test_volume_names_libvirt_prefixed_lxd_in_its_own_project():
    assert volume_name("vm-a", "data") == "vmhost-vm-a-data"  # libvirt: shared pools, gc tells ours by prefix
    assert volume_name("vm-a", "data", prefix="") == "vm-a-data"  # LXD: vm-host's own project
    disks = [{"label": label, "size": 10**9, "pool": "default"} for label in ("root", "data")]
    alloc = Allocation.from_dict({"name": "vm-a", "vcpus": 1, "memory": 1 << 30, "disks": disks})
    assert [name for _, body in lxd_config.volume_bodies(alloc) for name in [body["name"]]] == ["vm-a-data"]


@pytest.mark.parametrize("oui", [QEMU_OUI, LXD_OUI])
def test_random_macs_keep_the_hypervisors_prefix_and_vary(oui):
    macs = {random_mac(oui) for _ in range(50)}
    assert all(re.fullmatch(re.escape(oui) + r"(:[0-9a-f]{2}){3}", m) for m in macs) and len(macs) > 40


def test_one_set_of_state_names():
    assert base.UNFINISHED == (base.STATE_COMPOSING, base.STATE_DECOMPOSING) and base.STATE_READY == "ready"
    providers = Path(base.__file__).parent
    for path in providers.glob("*.py"):
        if path.name != "base.py":
            names = {
                t.id
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Assign)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            assert not {"STATE_COMPOSING", "STATE_READY", "STATE_DECOMPOSING", "UNFINISHED"} & names, path.name


def test_the_plan_check_refuses_an_unknown_boot_mode():
    plan = ComposePlan(Allocation(name="vm-a", vcpus=1, memory=1 << 30), boot="cdrom")  # type: ignore[arg-type]
    with pytest.raises(ProviderError, match="boot 'cdrom' is not a boot mode; allowed: network, image"):
        check_plan(plan)
