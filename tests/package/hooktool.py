#!/usr/bin/env python3
"""A recording stand-in for Juju's hook tools (config-get, status-set, action-set, ...).

Installed on PATH under each tool's name by tests/package. It records every call (tool, argv) as a
JSON line in $HOOKTOOL_LOG and answers the few questions the charm asks from files the test wrote.
It is a smoke test of the packed files, not of Juju: Juju's own agent is not here.
"""

import json
import os
import sys
from pathlib import Path

tool = Path(sys.argv[0]).name
args = sys.argv[1:]
state = Path(os.environ["HOOKTOOL_DIR"])
with open(state / "calls.jsonl", "a", encoding="utf-8") as log:
    log.write(json.dumps({"tool": tool, "args": args}) + "\n")

ANSWERS = {
    "config-get": lambda: (state / "config.json").read_text(),
    "action-get": lambda: (state / "params.json").read_text(),
    "is-leader": lambda: "true",
    "status-get": lambda: json.dumps({"status": "unknown", "message": "", "status-data": {}}),
    "goal-state": lambda: json.dumps({"units": {}, "relations": {}}),
    "opened-ports": lambda: "[]",
    "network-get": lambda: json.dumps(
        {
            "bind-addresses": [
                {"interface-name": "eth0", "addresses": [{"address": "10.0.0.5", "cidr": "10.0.0.0/24"}]}
            ],
            "egress-subnets": ["10.0.0.5/32"],
            "ingress-addresses": ["10.0.0.5"],
        }
    ),
}

# Relations, from $HOOKTOOL_DIR/relations.json when a test writes one:
# {"<endpoint>": {"<id>": {"app": "<remote app>", "units": [...], "data": {"<unit or app>": {...}}}}}
# relation-set writes into the same file, so a later relation-get (and the test) sees what was set.
RELATIONS = state / "relations.json"


def _relations() -> dict:
    return json.loads(RELATIONS.read_text()) if RELATIONS.exists() else {}


def _find(ref: str | None) -> tuple[str, str] | None:
    ref = ref or os.environ.get("JUJU_RELATION_ID", "")
    number = ref.rpartition(":")[2]
    for endpoint, rels in _relations().items():
        if number in rels:
            return endpoint, number
    return None


def _relation_tool() -> str | None:
    opts = [a for a in args if a.startswith("-") and a != "-"]
    words = [a for a in args if not (a.startswith("-") and a != "-")]
    ref = None
    if "-r" in args:
        ref = args[args.index("-r") + 1]
        words.remove(ref)
    if tool == "relation-ids":
        return json.dumps([f"{words[0]}:{n}" for n in _relations().get(words[0], {})])
    found = _find(ref)
    if found is None:
        return json.dumps([] if tool == "relation-list" else {})
    endpoint, number = found
    rel = _relations()[endpoint][number]
    if tool == "relation-list":
        return json.dumps(rel["app"] if "--app" in opts else rel["units"])
    if tool == "relation-model-get":
        return json.dumps({"uuid": "00000000-0000-4000-8000-000000000002"})
    if tool == "relation-get":
        key, owner = [*words, None, None][:2]
        owner = owner or os.environ.get("JUJU_REMOTE_UNIT", "")
        if "--app" in opts:
            owner = owner.split("/")[0]
        data = rel["data"].get(owner, {})
        return json.dumps(data if key in (None, "-") else data.get(key))
    if tool == "relation-set":
        owner = os.environ["JUJU_UNIT_NAME"]
        if "--app" in opts:
            owner = owner.split("/")[0]
        values = json.loads(sys.stdin.read() or "{}") if "--file" in opts else dict(w.split("=", 1) for w in words)
        everything = _relations()
        bag = everything[endpoint][number]["data"].setdefault(owner, {})
        bag.update(values)
        for k in [k for k, v in bag.items() if v == ""]:
            del bag[k]
        RELATIONS.write_text(json.dumps(everything))
        return None
    return None


if tool.startswith("relation-"):
    answer = _relation_tool()
    if answer is not None:
        print(answer)
elif tool in ANSWERS:
    print(ANSWERS[tool]())
