"""The state directory: atomic saves, the single-sender lock, the freeze marker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbdsink.sender.errors import StateError
from nbdsink.sender.state import CycleRecord, SenderState, StateDir


def _state() -> SenderState:
    return SenderState(
        device="/dev/loop0", uri="nbd+unix:///vol?socket=/s", volume="vol", size=1 << 30,
        chunk_size=65536, tracker="scan",
    )


def test_round_trip(tmp_path: Path) -> None:
    sd = StateDir(tmp_path / "st")
    assert sd.load() is None
    st = _state()
    st.pending = [(0, 65536), (131072, 65536)]
    st.last_cycle = CycleRecord("2026-01-01T00:00:00.000Z", 3, 10, 20, 1.5, 0.05, 2.0)
    sd.save(st)
    assert sd.load() == st
    assert not (tmp_path / "st" / "state.json.tmp").exists()


def test_a_torn_temporary_file_leaves_the_old_state(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    st = _state()
    sd.save(st)
    # A crash in the middle of the next save leaves only a partial temporary file behind.
    (tmp_path / "state.json.tmp").write_text('{"format": 1, "dev')
    assert sd.load() == st
    st.last_version = 4
    sd.save(st)
    assert sd.load() == st


def test_garbage_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text("not json")
    with pytest.raises(StateError, match="not a valid state file"):
        StateDir(tmp_path).load()


def test_second_sender_is_refused_with_the_holder_pid(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from nbdsink.sender.state import StateDir; "
         f"StateDir({str(tmp_path)!r}).lock(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StateError, match=f"pid {holder.pid}"):
            StateDir(tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder.
    with StateDir(tmp_path).locked():
        pass


def test_frozen_marker(tmp_path: Path) -> None:
    sd = StateDir(tmp_path)
    assert sd.frozen_mountpoint() is None
    sd.mark_frozen("/mnt/x y")
    assert StateDir(tmp_path).frozen_mountpoint() == "/mnt/x y"
    sd.clear_frozen()
    sd.clear_frozen()
    assert sd.frozen_mountpoint() is None
