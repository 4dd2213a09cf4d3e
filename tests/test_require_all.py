"""The CI rule itself: with NBDSINK_REQUIRE_ALL=1, a skip fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_skip_becomes_failure_under_require_all(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\ndef test_skipped():\n    pytest.skip('no device')\n"
    )
    env = dict(os.environ, NBDSINK_REQUIRE_ALL="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:trio", str(tmp_path)],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 1, run.stdout
    assert "1 failed" in run.stdout
    env["NBDSINK_REQUIRE_ALL"] = "0"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:trio", str(tmp_path)],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout
    assert "1 skipped" in run.stdout
