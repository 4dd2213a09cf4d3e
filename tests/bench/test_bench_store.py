"""The store benchmark still runs end to end (on a small size: its figures mean nothing here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_store.py"


def test_bench_store_prints_a_ratio_for_every_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--size", "16M", "--rounds", "1", "--dir", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    summary = out.split("median of 1 rounds")[1]
    for label in ("new data", "duplicate", "read", "commits"):
        match = re.search(rf"{label}\s+(\d+\.\d+)x", summary)
        assert match, f"no ratio for {label!r} in:\n{out}"
        assert float(match.group(1)) > 0
    # Every temporary file and server is gone afterwards.
    assert list(tmp_path.iterdir()) == []
