"""``nbdsink status`` exit codes, for monitors."""

from __future__ import annotations

from nbdsink.cli.replicate import health


def test_exit_codes() -> None:
    ok = {"running": True, "behind_seconds": 12.0, "verify": None}
    assert health(ok, None) == 0
    assert health(ok, 60.0) == 0
    assert health({**ok, "behind_seconds": 120.0}, 60.0) == 3
    assert health({**ok, "behind_seconds": None}, 60.0) == 3  # nothing replicated yet
    assert health({**ok, "running": False}, None) == 1
    assert health({**ok, "verify": {"chunks_differed": 2}}, None) == 4
