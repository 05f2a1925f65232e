"""Typed charm config and action params: every option parses, every bad value names itself."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import pytest
import yaml

from charm_config import (
    AddTrustedClientParams,
    CharmConfig,
    ClientTokenParams,
    ComposeParams,
    ListVmsParams,
    NameParams,
    error_message,
    parse_hugepages_setting,
    relation_settings,
    vm_results,
)
from tests.unit.juju_cli import actions_spec, juju_run_params, param_types
from vmhost.model import HugepageSetting, Policy, Quota, VmRequest
from vmhost.parse import ParseError
from vmhost.relation_policy import Binding, RelationSettings


def test_defaults_are_a_working_lxd_host():
    c = CharmConfig()
    assert c.backend == "lxd"
    assert c.lxd_snap_channel == "5.21/stable"
    assert c.libvirt_uri == "qemu:///system"
    assert c.policy() == Policy()
    assert c.relation_quota == Quota()


def test_strings_parse_into_typed_values():
    c = CharmConfig(
        backend="libvirt",
        cpu_overcommit_ratio=4.0,
        memory_overcommit_ratio=1.5,
        reserved_cores="0-1,64",
        reserved_memory="4G",
        hugepages="0:1G:8,1:1G:8 2M:4096",
        default_storage_pool="ssd",
        space_bridges="public=br0 storage=br1",
        allowed_networks="public, 10.20.0.5/24",
        relation_quota="vms=20,cores=64,memory=256G",
        lxd_listen_address="[::]:8443",
    )
    assert c.reserved_cores == (0, 1, 64)
    assert c.reserved_memory == 4 * 1024**3
    assert c.hugepages == (
        HugepageSetting("1G", 8, 0),
        HugepageSetting("1G", 8, 1),
        HugepageSetting("2M", 4096, None),
    )
    assert c.space_bridges == {"public": "br0", "storage": "br1"}
    assert c.allowed_networks == ("public", "10.20.0.0/24")
    assert c.relation_quota == Quota(vms=20, cores=64, memory=256 * 1024**3)
    p = c.policy()
    assert (p.cpu_overcommit_ratio, p.reserved_cores, p.default_storage_pool) == (4.0, (0, 1, 64), "ssd")
    assert p.reserved_memory == 4 * 1024**3


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("backend", "xen", "config backend: 'xen' is not allowed: input should be 'lxd' or 'libvirt'"),
        ("cpu_overcommit_ratio", 0.0, "config cpu-overcommit-ratio: 0 is not allowed; use a number from 0.1 to 64"),
        (
            "memory_overcommit_ratio",
            -1.0,
            "config memory-overcommit-ratio: -1 is not allowed; use a number from 0.1 to 4",
        ),
        ("lxd_storage_driver", "ceph", "config lxd-storage-driver: 'ceph' is not allowed"),
        ("reserved_cores", "0-x", "config reserved-cores: cpu set token '0-x'"),
        ("reserved_memory", "lots", "config reserved-memory: size 'lots' is not a size"),
        ("hugepages", "3M:10", "config hugepages: hugepage size '3M' is not supported; allowed: 2M, 1G"),
        ("hugepages", "2M", "config hugepages: entry '2M' is not size:count or node:size:count"),
        ("hugepages", "2M:8,0:2M:4", "config hugepages: 2M pages are given twice"),
        ("space_bridges", "public:br0", "config space-bridges: entry 'public:br0' is not space=bridge"),
        ("allowed_networks", "10.0.0.0/33", "config allowed-networks: '10.0.0.0/33' is not a CIDR"),
        ("relation_quota", "vms=lots", "config relation-quota: vms 'lots' is not a whole number"),
        ("relation_quota", "disks=3", "config relation-quota: entry 'disks=3' is not vms=N"),
        ("relation_quota", "storage=lots", "config relation-quota: size 'lots'"),
        (
            "relation_quota",
            "storage=2000T",
            "config relation-quota: storage is too large (over 1024T); allowed: 0B to 1024T",
        ),
        ("lxd_listen_address", "10.0.0.5:99999", "config lxd-listen-address: port 99999"),
        ("lxd_snap_channel", "5.21/stabel", "config lxd-snap-channel: '5.21/stabel' is not a snap channel"),
        ("libvirt_uri", "/var/run/libvirt", "config libvirt-uri: '/var/run/libvirt' is not a libvirt URI"),
        ("bridge", "br 0", "config bridge: 'br 0' is not a name"),
    ],
)
def test_bad_values_name_the_option_and_what_is_allowed(option, value, says):
    with pytest.raises(pydantic.ValidationError) as exc:
        CharmConfig(**{option: value})
    assert error_message(exc.value, "config").startswith(says)


def test_hugepage_setting_forms():
    assert parse_hugepages_setting("") == ()
    assert parse_hugepages_setting("2M:4096,1G:8") == (HugepageSetting("2M", 4096), HugepageSetting("1G", 8))
    assert parse_hugepages_setting("0:2048K:16") == (HugepageSetting("2M", 16, 0),)


def test_compose_params_map_to_a_vm_request():
    p = ComposeParams(
        cores=2,
        memory="1G",
        pinned_cores="auto",
        hugepage_size="2M",
        storage="root:20(ssd)",
        interfaces="eth0:space=public",
        hostname="web-1",
        pool="tenant-a",
    )
    req = VmRequest.from_dict(p.request_dict())
    assert (req.cores, req.memory, req.pinned_cores, req.hugepages_backed) == (2, 1024**3, "auto", True)
    assert (req.name, req.pool) == ("web-1", "tenant-a")
    assert req.storage[0].label == "root" and req.storage[0].tags == ("ssd",)
    assert req.interfaces[0].space == ("public",)


def test_compose_params_numa_nodes_reach_the_request_with_its_bounds():
    assert VmRequest.from_dict(ComposeParams(cores=4, numa_nodes=2).request_dict()).numa_nodes == 2
    assert VmRequest.from_dict(ComposeParams(cores=4).request_dict()).numa_nodes is None
    with pytest.raises(ParseError, match="numa_nodes 3 needs at least 3 cores"):
        VmRequest.from_dict(ComposeParams(cores=2, numa_nodes=3).request_dict())


def test_compose_params_refuse_bad_hostname_and_cores():
    with pytest.raises(pydantic.ValidationError) as exc:
        ComposeParams(hostname="Web_1")
    assert error_message(exc.value, "parameter") == (
        "parameter hostname: 'Web_1' is not a valid host name; use lower-case letters, digits and '-' (at most 63)"
    )
    with pytest.raises(pydantic.ValidationError):
        ComposeParams(cores=0)


def test_trusted_client_needs_a_pem():
    with pytest.raises(pydantic.ValidationError) as exc:
        AddTrustedClientParams(cert="hello")
    assert "is not a PEM certificate" in error_message(exc.value, "parameter")


def test_vm_results_are_flat_strings_with_juju_safe_keys():
    vm = {
        "name": "vm-3f2a",
        "state": "running",
        "vcpus": 2,
        "pinned": [2, 3],
        "numa_nodes": [0],
        "memory": 1024**3,
        "hugepages": {"size": "2M", "per_node": {"0": 512}},
        "disks": [{"label": "root", "size": 20 * 10**9, "pool": "default", "tags": []}],
        "nics": [{"label": "eth0", "type": "bridge", "parent": "br0", "mac": "52:54:00:00:00:01"}],
        "mac_addresses": ["52:54:00:00:00:01"],
        "threads_per_core": 2,
        "pool": None,
        "managed": True,
    }
    r = vm_results(vm)
    assert all(isinstance(v, str) for v in r.values())
    assert all(k == k.lower() and "_" not in k for k in r)
    assert r["name"] == "vm-3f2a" and r["state"] == "running" and r["vcpus"] == "2"
    assert json.loads(r["pinned"]) == [2, 3]
    assert json.loads(r["nodes"]) == [0]
    assert json.loads(r["hugepages"])["per_node"] == {"0": 512}
    assert json.loads(r["disks"])[0]["pool"] == "default"
    assert json.loads(r["nics"])[0]["parent"] == "br0"
    assert json.loads(r["macs"]) == ["52:54:00:00:00:01"]
    assert r["threads"] == "2"
    assert "pool" not in r


# --- `juju run` typing: what people type as numbers arrives as numbers --------------------------------

# Parameters whose values are often all digits (sizes, CPU lists, names): each must take both.
TYPED_AS_TEXT = {
    "compose": ("memory", "pinned_cores", "storage", "interfaces", "hostname", "pool", "image"),
    "decompose": ("name",),
    "start-vm": ("name",),
    "stop-vm": ("name",),
    "list-vms": ("pool",),
    "add-trusted-client": ("name",),
    "get-client-token": ("name", "expiry"),
}


@pytest.mark.parametrize(("action", "param"), [(a, p) for a, ps in TYPED_AS_TEXT.items() for p in ps])
def test_text_params_accept_numbers_and_strings_in_actions_yaml(action, param):
    assert set(param_types(action, param)) == {"string", "integer"}


def test_every_string_param_is_typed_as_text_or_is_an_enum():
    """A new string parameter must be listed above (or have an enum), so `--string-args` is never needed."""
    never_digits = {("add-trusted-client", "cert"), ("compose", "user_data")}  # PEM text; cloud-init user-data
    for action, spec in actions_spec().items():
        for param, schema in (spec.get("params") or {}).items():
            if schema["type"] == "string" and (action, param) not in never_digits:
                assert "enum" in schema, f"{action} {param} is string-only: juju run {param}=123 would be refused"


def test_compose_reads_numbers_typed_on_the_command_line_as_strings():
    raw = juju_run_params("compose", "memory=2048", "pinned_cores=3", "hostname=123", "storage=20", "pool=7")
    assert raw["memory"] == 2048 and raw["pinned_cores"] == 3  # what Juju hands over: integers
    p = ComposeParams(**raw)
    assert (p.memory, p.pinned_cores, p.hostname, p.storage, p.pool) == ("2048", "3", "123", "20", "7")
    req = VmRequest.from_dict(p.request_dict())
    assert req.memory == 2048 * 1024**2  # a bare number is MiB, as in MAAS
    assert req.pinned_cores == (3,)
    assert req.storage[0].size == 20 * 10**9


def test_names_typed_as_numbers_are_read_as_strings():
    assert NameParams(**juju_run_params("decompose", "name=123")).name == "123"
    assert ListVmsParams(**juju_run_params("list-vms", "pool=42")).pool == "42"
    assert ClientTokenParams(**juju_run_params("get-client-token", "name=2024")).name == "2024"


def test_a_boolean_where_text_is_expected_is_refused_with_one_sentence():
    with pytest.raises(pydantic.ValidationError) as exc:
        ComposeParams(hostname=True)
    assert error_message(exc.value, "parameter") == (
        "parameter hostname: True is not allowed: input should be a valid string"
    )


def test_confine_foreign_vms_option_reaches_the_policy_and_config_yaml_declares_it():
    from pathlib import Path

    import yaml

    options = yaml.safe_load((Path(__file__).parents[2] / "config.yaml").read_text())["options"]
    assert options["confine-foreign-vms"]["type"] == "boolean" and options["confine-foreign-vms"]["default"] is True
    assert CharmConfig().policy().confine_foreign_vms is True
    assert CharmConfig(confine_foreign_vms=False).policy().confine_foreign_vms is False


def test_relation_settings_are_the_charm_config_parsed_plus_the_binding():
    config = CharmConfig.model_validate(
        {"relation_quota": "vms=2,memory=4G", "allowed_networks": "br0 public", "space_bridges": "public=br0"}
    )
    settings = relation_settings(config, Binding(("br5",)))
    assert settings.quota == Quota(vms=2, memory=4 * 1024**3)
    assert CharmConfig(relation_quota="storage=500,vms=1").relation_quota == Quota(vms=1, storage=500 * 10**9)
    assert CharmConfig(relation_quota="storage=2T").relation_quota == Quota(storage=2 * 1024**4)
    assert settings.allowed_networks == ("br0", "public") and dict(settings.space_bridges) == {"public": "br0"}
    assert settings.binding == Binding(("br5",))
    assert relation_settings(CharmConfig(), Binding()) == RelationSettings()
    with pytest.raises(ValueError):
        CharmConfig.model_validate({"relation_quota": "vms=lots"})


TEXT_OPTIONS = [
    option
    for option, spec in yaml.safe_load((Path(__file__).parents[2] / "config.yaml").read_text())["options"].items()
    if spec["type"] == "string"
]


@pytest.mark.parametrize("option", TEXT_OPTIONS)
@pytest.mark.parametrize("length", [300, 5000])
def test_a_long_text_option_is_refused_in_a_short_sentence(option, length):
    """The status line an operator reads never carries kilobytes of what they typed (a 5,000-character
    libvirt-uri was once echoed whole through the packed charm)."""
    value = "x" * (length - 1) + "\n"
    with pytest.raises(pydantic.ValidationError) as e:
        CharmConfig(**{option.replace("-", "_"): value})
    message = error_message(e.value)
    assert message.startswith(f"config {option}: ") and len(message) < 400 and "\n" not in message, message
