"""Suite-wide guard: where /dev/kvm works, the functional tier must really run (CI sets the env var)."""

import os

import pytest

_skipped_functional: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and report.nodeid.startswith("tests/functional"):
        _skipped_functional.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("VMHOST_REQUIRE_FUNCTIONAL") == "1" and _skipped_functional:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if os.environ.get("VMHOST_REQUIRE_FUNCTIONAL") == "1" and _skipped_functional:
        terminalreporter.write_line(
            f"FAILED: /dev/kvm is usable but {len(_skipped_functional)} functional test(s) skipped: "
            + ", ".join(_skipped_functional[:5]),
            red=True,
        )
