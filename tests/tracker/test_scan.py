"""The scan backend: the conformance suite, plus the reference-update rule."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdsink.tracker import scan
from nbdsink.tracker.base import Tracker
from tracker import conformance as conf

pytestmark = pytest.mark.root
CS = 64 << 10
MiB = 1 << 20


def start(device: str, chunk_size: int) -> Tracker:
    return scan.start_scan(device, chunk_size)


def test_direct_io(make_loop: Callable[..., str], record_ratio: Callable[[float], None]) -> None:
    report = conf.check_direct_io(start, make_loop(64 * MiB), CS)
    record_ratio(report.over_reporting)


def test_filesystem_ext4(make_loop: Callable[..., str], mountpoint: Path,
                         record_ratio: Callable[[float], None]) -> None:
    report = conf.check_filesystem(start, make_loop(96 * MiB), CS, "ext4", mountpoint)
    record_ratio(report.over_reporting)


def test_concurrent(make_loop: Callable[..., str]) -> None:
    conf.check_concurrent(start, make_loop(32 * MiB), CS, checkpoints=6)


def test_restart(make_loop: Callable[..., str]) -> None:
    conf.check_restart("scan", scan.open_scan, make_loop(32 * MiB), CS)


def test_ack_semantics(make_loop: Callable[..., str]) -> None:
    conf.check_ack_semantics(start, make_loop(32 * MiB), CS)


def test_bad_input(make_loop: Callable[..., str]) -> None:
    conf.check_bad_input(start, make_loop(32 * MiB), CS)


def _write(device: str, chunk: int, data: bytes) -> None:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        conf.write_direct(fd, chunk * CS, data)
    finally:
        os.close(fd)


def test_chunk_that_changes_back_after_sending_is_reported(make_loop: Callable[..., str]) -> None:
    """Scan sees A, the sender then reads and pushes B, the chunk returns to A: the remote
    holds B, so the next scan must report the chunk (the reference is what was sent)."""
    loop = make_loop(32 * MiB)
    a, b = os.urandom(CS), os.urandom(CS)
    tracker = scan.start_scan(loop, CS)
    try:
        _write(loop, 4, a)
        dirty = tracker.checkpoint()
        assert conf.reported_chunks(dirty) == {4}
        _write(loop, 4, b)                        # changed between the scan and the read
        tracker.note_sent(dirty.generation, 4 * CS, b)
        tracker.acknowledge(dirty.generation)
        _write(loop, 4, a)                        # back to what the scan saw
        assert conf.reported_chunks(tracker.checkpoint()) == {4}
    finally:
        tracker.stop()


def test_reference_from_remote(make_loop: Callable[..., str]) -> None:
    """Started with the remote's digests: reports exactly the chunks that differ from them."""
    loop = make_loop(8 * MiB)
    remote = bytearray(scan.device_digests(loop, CS))
    remote[3 * 32 : 4 * 32] = scan.chunk_digest(b"x" * CS)    # the remote has other data there
    remote[7 * 32 : 8 * 32] = scan.UNKNOWN
    tracker = scan.start_scan(loop, CS, bytes(remote))
    try:
        assert conf.reported_chunks(tracker.checkpoint()) == {3, 7}
    finally:
        tracker.stop()
