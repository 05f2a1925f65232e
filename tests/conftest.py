"""Suite-wide guard: a tier whose prerequisites CI provides must really run, never skip.

.ci/run names those tiers in VMHOST_REQUIRE_TIERS (comma-separated directory names under tests/:
`package` always, `functional` and `numa` where /dev/kvm works); a skipped test in one of them fails the run.
"""

import os

import pytest

_skipped: dict[str, list[str]] = {}


def _required() -> set[str]:
    return {t.strip() for t in os.environ.get("VMHOST_REQUIRE_TIERS", "").split(",") if t.strip()}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    parts = report.nodeid.split("/")
    if report.skipped and len(parts) > 2 and parts[0] == "tests" and parts[1] in _required():
        _skipped.setdefault(parts[1], []).append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    for tier, nodeids in sorted(_skipped.items()):
        terminalreporter.write_line(
            f"FAILED: the {tier} tier must run here (VMHOST_REQUIRE_TIERS) but {len(nodeids)} test(s) skipped: "
            + ", ".join(nodeids[:5]),
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
