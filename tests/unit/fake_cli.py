"""`python -m tests.unit.fake_cli ARGS...`: the real `vmhost` command in its own process, on the fake provider.

For tests of what only a real process shows (exit codes, stderr, a closed stdout pipe). FAKE_RUNNING
names VMs that exist and run; FAKE_IGNORES_STOP=1 makes guests ignore a shutdown request.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from tests.unit.fakes import FakeProvider
from vmhost import cli
from vmhost.model import Allocation, VmInfo

provider = FakeProvider()
for name in filter(None, os.environ.get("FAKE_RUNNING", "").split(",")):
    provider.vms[name] = VmInfo(name=name, state="running", allocation=Allocation(name=name, vcpus=1, memory=1024**3))
if os.environ.get("FAKE_IGNORES_STOP") == "1":
    provider.stop = lambda name, force=False: (
        None if not force else provider.vms.update({name: replace(provider.vms[name], state="stopped")})
    )
cli.make_provider = lambda settings: provider
sys.exit(cli.main(sys.argv[1:]))
