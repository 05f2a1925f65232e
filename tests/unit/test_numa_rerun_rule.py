"""The numa tier's rerun rule (tests/numa/conftest.py, design §9.1), without booting anything.

A numa test is rerun only when its nested guest stopped answering ssh, never when it failed on a guest
that answers, and a profile gets a bounded number of fresh boots. Proved end to end by hand (a guest's
QEMU stopped with SIGSTOP mid-test); these keep the decision itself from drifting.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.numa import conftest as numa


class FakeGuest:
    """Stands in for tests.numa.guest.Guest: boots instantly; `silent` says whether ssh still answers."""

    booted: list[FakeGuest] = []

    def __init__(self, profile, image, workdir) -> None:
        self.profile = profile
        self.hung = False
        self.silent = False
        self.stopped = False
        FakeGuest.booted.append(self)

    def boot(self) -> None:
        pass

    def stalled(self) -> str | None:
        return None

    def answers(self) -> bool:
        return not self.silent

    def console_tail(self, chars: int = 1500) -> str:
        return "rcu: INFO: rcu_preempt detected stalls on CPUs/tasks"

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def guests(pytestconfig, monkeypatch):
    FakeGuest.booted = []
    monkeypatch.setattr(numa, "Guest", FakeGuest)
    monkeypatch.setattr(numa, "build_guest", lambda: Path("/nonexistent/guest-image"))
    g = numa.Guests(pytestconfig)
    g.said = []
    monkeypatch.setattr(g, "say", g.said.append)
    monkeypatch.setattr(numa, "_running", [g])
    yield g
    shutil.rmtree(g.dir, ignore_errors=True)


def test_a_failure_on_a_guest_that_answers_is_never_rerun(guests):
    guest = guests.get("two")
    assert guests.current_hung() is False
    assert numa._guest_stopped_answering(AssertionError("vm-host's own failure")) is False
    assert guests.get("two") is guest and len(FakeGuest.booted) == 1


def test_a_guest_that_stopped_answering_asks_for_a_rerun_on_a_fresh_boot(guests):
    first = guests.get("igb")
    first.silent = True
    assert guests.current_hung() is True and first.hung
    assert "igb guest stopped answering ssh; the test runs again on a fresh boot" in guests.said[-1]
    assert "rcu_preempt detected stalls" in guests.said[-1]  # the console tail goes with it
    guests.rerun_wanted = True  # what pytest_runtest_makereport sets on that verdict
    assert numa._guest_stopped_answering(RuntimeError("Connection timed out during banner exchange")) is True
    assert numa._guest_stopped_answering(None) is False  # no failure, no rerun
    second = guests.get("igb")
    assert second is not first and first.stopped and not second.hung
    numa.pytest_runtest_setup(item=None)  # the rerun's own attempt starts with nothing asked
    assert numa._guest_stopped_answering(RuntimeError("anything")) is False


def test_fresh_boots_for_hangs_are_bounded_per_profile(guests):
    for _ in range(numa.MAX_HANG_REBOOTS):
        guests.get("two").silent = True
        assert guests.current_hung() is True
    guests.get("two").silent = True
    assert guests.current_hung() is False  # the cap: this one fails its test
    assert "no more fresh boots" in guests.said[-1]
    assert len(FakeGuest.booted) == numa.MAX_HANG_REBOOTS + 1
    guests.get("four").silent = True  # another profile has its own count
    assert guests.current_hung() is True


def test_every_numa_test_carries_the_rule_and_no_other_test_does():
    class Item:
        def __init__(self, nodeid: str, fixtures: tuple[str, ...]) -> None:
            self.nodeid, self.fixturenames, self.marks = nodeid, fixtures, []

        def add_marker(self, mark) -> None:
            self.marks.append(mark)

    items = [
        Item("tests/unit/test_x.py::t", ()),
        Item("tests/numa/test_sriov.py::t", ("guest_igb",)),
        Item("tests/numa/test_two_nodes.py::t", ("guest_two",)),
    ]
    numa.pytest_collection_modifyitems(None, None, items)
    assert [it.nodeid for it in items][1:] == ["tests/numa/test_two_nodes.py::t", "tests/numa/test_sriov.py::t"]
    assert items[0].marks == []
    for it in items[1:]:
        (mark,) = it.marks
        assert mark.name == "flaky"
        assert mark.kwargs == {"reruns": numa.HANG_RERUNS, "condition": numa._guest_stopped_answering}
