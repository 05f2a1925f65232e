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


# CI runs the property tests on a fixed example sequence, so a landing never depends on the draw;
# developers' runs (no CI variable) keep exploring new examples.
try:
    from hypothesis import settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
    if os.environ.get("CI"):
        _hsettings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass
