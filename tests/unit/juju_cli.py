"""`juju run unit action key=value ...` as Juju hands the parameters to the charm, for tests.

Juju's CLI parses each value as YAML unless --string-args is given (so memory=2048 is an integer),
then validates the whole set against the action's JSON schema from actions.yaml. This checks the
`type` keyword only, which is the one the numbers-versus-strings question turns on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
_JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool}


def actions_spec() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "actions.yaml").read_text())


def param_types(action: str, param: str) -> list[str]:
    declared = actions_spec()[action]["params"][param]["type"]
    return declared if isinstance(declared, list) else [declared]


def _is(value: Any, json_type: str) -> bool:
    if isinstance(value, bool) and json_type in ("integer", "number"):
        return False  # JSON Schema keeps booleans apart from numbers
    return isinstance(value, _JSON_TYPES[json_type])


def juju_run_params(action: str, *args: str) -> dict[str, Any]:
    """The params dict the charm receives; AssertionError where Juju itself would refuse the call."""
    out: dict[str, Any] = {}
    for arg in args:
        key, _, text = arg.partition("=")
        value = yaml.safe_load(text)
        types = param_types(action, key)
        assert any(_is(value, t) for t in types), f"Juju refuses {arg}: {value!r} is not of type {types}"
        out[key] = value
    return out


def charm_context(charm_type=None, **kwargs):
    """testing.Context for the vm-host charm with its real metadata, config and actions.

    ops.testing's consistency checker maps each action parameter's `type` to one Python type and
    fails on a list such as [string, integer] (canonical/operator testing/src/scenario/
    _consistency_checker.py, `to_python_type[value]`), so such parameters are shown to it as
    "string". Tests that hand the charm integers as Juju does set SCENARIO_SKIP_CONSISTENCY_CHECKS
    and check the call against the real schema with `juju_run_params` instead.
    """
    from ops import testing

    if charm_type is None:
        from charm import VmHostCharm as charm_type
    actions = actions_spec()
    for spec in actions.values():
        for schema in (spec.get("params") or {}).values():
            if isinstance(schema.get("type"), list):
                schema["type"] = "string"
    meta = yaml.safe_load((ROOT / "metadata.yaml").read_text())
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    return testing.Context(charm_type, meta=meta, actions=actions, config=config, **kwargs)
