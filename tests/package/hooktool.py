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
    "relation-ids": lambda: "[]",
    "status-get": lambda: json.dumps({"status": "unknown", "message": "", "status-data": {}}),
    "goal-state": lambda: json.dumps({"units": {}, "relations": {}}),
    "opened-ports": lambda: "[]",
}
if tool in ANSWERS:
    print(ANSWERS[tool]())
