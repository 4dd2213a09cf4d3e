"""Every frozen version equals the device as it was at its freeze, chunk for chunk, under a
heavy filesystem load, and while the kernel is made to skip the tracker's completion
programs now and then (as it was measured doing on a busy host)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .ground_truth import run_ground_truth

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_frozen_versions_equal_the_device_at_their_freeze(tmp_path: Path) -> None:
    outcome = run_ground_truth(tmp_path, seconds=45, inject=True)
    assert outcome.checked >= 8, f"only {outcome.checked} of {outcome.versions} versions checked"
    assert outcome.skips_injected > 0
    # The skips were noticed (by the audit against the kernel's accounting) ...
    assert outcome.unseen_events > 0
    # ... and answered: no version misses a write.
    assert outcome.mismatched == [], (
        f"{len(outcome.mismatched)} chunks differ from the device at the freeze "
        f"(first: version {outcome.mismatched[0][0]}, chunk {outcome.mismatched[0][1]})"
    )
