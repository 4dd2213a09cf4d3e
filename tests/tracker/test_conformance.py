"""The conformance checker itself: a write that lands while a checkpoint runs is owed by the
next generation (and checked there); a chunk missing while the device was quiescent is an
under-report."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from nbdsink.tracker import bpf
from nbdsink.tracker.base import DirtySet, Tracker, TrackerStatus
from tracker import conformance as conf

pytestmark = pytest.mark.root
CS = 64 << 10
MiB = 1 << 20


class _Meddling(Tracker):
    """A real bpf tracker whose next checkpoint is followed by a write (``late``) or loses a
    chunk from its report (``drop``)."""

    backend = "bpf"

    def __init__(self, real: bpf.BpfTracker, device: str) -> None:
        self.real = real
        self.device = device
        self.late: int | None = None
        self.drop: int | None = None

    def checkpoint(self) -> DirtySet:
        dirty = self.real.checkpoint()
        if self.late is not None:
            fd = os.open(self.device, os.O_RDWR | os.O_DIRECT)
            try:
                conf.write_direct(fd, self.late * CS, os.urandom(4096))
            finally:
                os.close(fd)
            self.late = None
        if self.drop is not None:
            keep = [(o, n) for o, n in dirty.extents if not o <= self.drop * CS < o + n]
            dirty = DirtySet(dirty.generation, dirty.chunk_size, keep)
            self.drop = None
        return dirty

    def acknowledge(self, generation: int) -> None:
        self.real.acknowledge(generation)

    def tracking_id(self) -> str:
        return self.real.tracking_id()

    def status(self) -> TrackerStatus:
        return self.real.status()

    def stop(self) -> None:
        self.real.stop()


def _write(device: str, chunk: int) -> None:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        conf.write_direct(fd, chunk * CS, os.urandom(4096))
    finally:
        os.close(fd)


def test_write_during_checkpoint_is_owed_by_next_generation(make_loop: Callable[..., str]) -> None:
    loop = make_loop(16 * MiB)
    t = _Meddling(bpf.start_bpf(loop, CS), loop)
    try:
        checker = conf.Checker(t, loop, CS, conf.Report())
        _write(loop, 3)
        t.late = 9  # lands after the flip, before the snapshot
        r = checker.round("first")
        assert not r.quiet and r.missing == {9} and checker.owed == {9}
        r = checker.round("second")  # the next generation reports chunk 9: all good
        assert 9 in r.reported and checker.owed == set()
        # The owed chunk missing from the next generation too is an under-report.
        t.late = 11
        checker.round("third")
        t.drop = 11
        with pytest.raises(conf.UnderReport, match=r"chunks \[11\] changed while"):
            checker.round("fourth")
    finally:
        t.stop()


def test_missing_chunk_on_a_quiescent_device_is_an_under_report(
        make_loop: Callable[..., str]) -> None:
    loop = make_loop(16 * MiB)
    t = _Meddling(bpf.start_bpf(loop, CS), loop)
    try:
        checker = conf.Checker(t, loop, CS, conf.Report())
        _write(loop, 5)
        _write(loop, 8)
        t.drop = 8
        with pytest.raises(conf.UnderReport, match="misses chunks") as exc:
            checker.round("dropped")
        assert exc.value.chunks == {8}
    finally:
        t.stop()
