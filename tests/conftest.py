"""Shared pytest configuration.

With ``NBDSINK_REQUIRE_ALL=1`` (set by ``.ci/run``) a skipped test is reported as a failure:
CI must run every test that needs root, loop devices, eBPF or the VM, never skip it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Generator

import pytest

REQUIRE_ALL = os.environ.get("NBDSINK_REQUIRE_ALL") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped with NBDSINK_REQUIRE_ALL=1 (every test must run): {reason}"


# Debian's libnbd bindings (python3-libnbd) live outside the virtualenv; appended last so
# nothing in the venv is shadowed.
if "/usr/lib/python3/dist-packages" not in sys.path:
    sys.path.append("/usr/lib/python3/dist-packages")
