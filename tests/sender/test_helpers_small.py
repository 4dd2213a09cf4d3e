"""Rate limiter, hooks and progress reporting."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from nbdsink.sender.errors import HookError
from nbdsink.sender.hooks import run_hook
from nbdsink.sender.progress import Progress
from nbdsink.sender.ratelimit import RateLimiter
from nbdsink.sender.units import format_duration, parse_rate


async def test_rate_limit_holds_the_average(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(10_000_000)
    start = trio.current_time()

    async def sender(n: int) -> None:
        for _ in range(n):
            await limiter.acquire(1_000_000)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(sender, 10)
    elapsed = trio.current_time() - start
    # 40 MB at 10 MB/s, less the initial bucket (a quarter second).
    assert 3.7 <= elapsed <= 4.1


async def test_unlimited_does_not_wait(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(0)
    start = trio.current_time()
    await limiter.acquire(10**12)
    assert trio.current_time() == start


async def test_hooks_run_with_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    await run_hook(f'echo "$NBDSINK_HOOK $X" > {out}', phase="pre", timeout=10, env={"X": "1"})
    assert out.read_text() == "pre 1\n"
    with pytest.raises(HookError, match="exited with status 3"):
        await run_hook("exit 3", phase="post", timeout=10, env={})
    with pytest.raises(HookError, match="did not finish"):
        await run_hook("sleep 5", phase="pre", timeout=0.2, env={})


def test_progress_logs_structured_lines_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "nbdsink.sender.progress")
    p = Progress("full sync", 1000, stream=io.StringIO(), log_every=0)
    p.advance(250)
    p.advance(250)
    p.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[-1].startswith("progress full sync done=500 total=1000 rate=")
    assert "eta=" in lines[-1]


def test_units() -> None:
    assert parse_rate("50M") == parse_rate("50M/s") == 50 << 20
    assert format_duration(0.25) == "250ms"
    assert format_duration(125) == "2m05s"
