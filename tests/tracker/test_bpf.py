"""The eBPF backend on the host kernel: loop devices (request-based), a partition, zram
(bio-based, like device-mapper), ext4 and xfs, concurrency, restart, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdsink.tracker import bpf
from nbdsink.tracker.base import Tracker, TrackerError, TrackingLost
from tracker import bpf_faults
from tracker import conformance as conf

pytestmark = pytest.mark.root
CS = 64 << 10
MiB = 1 << 20


def start(device: str, chunk_size: int) -> Tracker:
    return bpf.start_bpf(device, chunk_size)


def test_direct_io_loop(make_loop: Callable[..., str], record_ratio: Callable[[float], None]) -> None:
    report = conf.check_direct_io(start, make_loop(128 * MiB), CS)
    assert report.changed > 0
    record_ratio(report.over_reporting)


def test_direct_io_small_chunks(make_loop: Callable[..., str], record_ratio: Callable[[float], None]) -> None:
    report = conf.check_direct_io(start, make_loop(64 * MiB), 4096, rounds=2)
    record_ratio(report.over_reporting)


def test_direct_io_partition(make_loop: Callable[..., str], record_ratio: Callable[[float], None]) -> None:
    # Partition 2 starts at an odd sector on purpose: chunks are relative to the partition.
    loop = make_loop(160 * MiB, partitions=[(2048, 40960), (43011, 200000)])
    report = conf.check_direct_io(start, f"{loop}p2", CS)
    record_ratio(report.over_reporting)


def test_partition_ignores_other_partition(make_loop: Callable[..., str]) -> None:
    loop = make_loop(96 * MiB, partitions=[(2048, 40960), (43008, 100000)])
    tracker = bpf.start_bpf(f"{loop}p2", CS)
    try:
        for dev in (f"{loop}p1", loop):  # partition 1, and the disk below partition 2
            fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
            conf.write_direct(fd, 4096, os.urandom(8192))
            os.close(fd)
        assert tracker.checkpoint().extents == []
    finally:
        tracker.stop()


def test_direct_io_zram_bio_based(zram: Callable[[int], str], record_ratio: Callable[[float], None]) -> None:
    report = conf.check_direct_io(start, zram(64 * MiB), CS)
    record_ratio(report.over_reporting)


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem(fstype: str, make_loop: Callable[..., str], mountpoint: Path,
                    record_ratio: Callable[[float], None]) -> None:
    size = 320 * MiB if fstype == "xfs" else 128 * MiB  # xfs refuses to make less than 300M
    report = conf.check_filesystem(start, make_loop(size), CS, fstype, mountpoint)
    record_ratio(report.over_reporting)


def test_filesystem_zram_bio_based(zram: Callable[[int], str], mountpoint: Path,
                                   record_ratio: Callable[[float], None]) -> None:
    report = conf.check_filesystem(start, zram(128 * MiB), CS, "ext4", mountpoint)
    record_ratio(report.over_reporting)


def test_concurrent_loop(make_loop: Callable[..., str]) -> None:
    conf.check_concurrent(start, make_loop(64 * MiB), CS)


def test_concurrent_zram(zram: Callable[[int], str]) -> None:
    conf.check_concurrent(start, zram(64 * MiB), CS)


def test_restart(make_loop: Callable[..., str]) -> None:
    loop = make_loop(64 * MiB)
    conf.check_restart("bpf", bpf.open_bpf, loop, CS)


def test_ack_semantics(make_loop: Callable[..., str]) -> None:
    conf.check_ack_semantics(start, make_loop(64 * MiB), CS)


def test_bad_input(make_loop: Callable[..., str]) -> None:
    conf.check_bad_input(start, make_loop(64 * MiB), CS)


def test_no_btf_is_a_clear_error(make_loop: Callable[..., str]) -> None:
    loop = make_loop(64 * MiB)
    with pytest.raises(TrackerError, match="no BTF"):
        bpf.start_bpf(loop, CS, btf="/nonexistent/vmlinux")
    assert not (bpf.PIN_ROOT / Path(loop).name).exists()


def test_crash_after_flip_loses_nothing(make_loop: Callable[..., str]) -> None:
    """A checkpoint that died after flipping the generation, before saving it: the next
    checkpoint still reports the writes of the lost one."""
    loop = make_loop(64 * MiB)
    tracker = bpf.start_bpf(loop, CS)
    try:
        fd = os.open(loop, os.O_RDWR | os.O_DIRECT)
        conf.write_direct(fd, 5 * CS, os.urandom(4096))
        tracker._flip_and_wait()  # what a killed checkpoint did before dying
        conf.write_direct(fd, 9 * CS, os.urandom(4096))
        os.close(fd)
        got = conf.reported_chunks(tracker.checkpoint())
        assert {5, 9} <= got
    finally:
        tracker.stop()


def nbdsink(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdsink.cli.main", *args],
                          capture_output=True, text=True)


def test_cli(make_loop: Callable[..., str]) -> None:
    loop = make_loop(64 * MiB)
    run = nbdsink("track", "start", loop, "--chunk-size", "64K", "--backend", "bpf")
    assert run.returncode == 0, run.stderr
    again = nbdsink("track", "start", loop)
    assert again.returncode == 1 and again.stderr.startswith("nbdsink: error:")
    assert "already tracked" in again.stderr
    fd = os.open(loop, os.O_RDWR | os.O_DIRECT)
    conf.write_direct(fd, 3 * CS + 4096, os.urandom(4096))
    os.close(fd)
    status = json.loads(nbdsink("track", "status", "--json").stdout)
    mine = [s for s in status if s["device"] == loop]
    assert mine and mine[0]["backend"] == "bpf" and mine[0]["dirty_bytes"] == CS
    out = nbdsink("track", "checkpoint", loop, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"generation": 1, "chunk_size": CS, "extents": [[3 * CS, CS]]}
    assert nbdsink("track", "ack", loop, "1").returncode == 0
    assert json.loads(nbdsink("track", "checkpoint", loop, "--json").stdout)["extents"] == []
    assert nbdsink("track", "stop", loop).returncode == 0
    assert not (bpf.PIN_ROOT / Path(loop).name).exists()
    for args, words in [
        (["track", "start", "/dev/nbdsink-missing"], "no such device"),
        (["track", "start", loop, "--chunk-size", "3000"], "power of two"),
        (["track", "checkpoint", loop], "not tracked"),
    ]:
        run = nbdsink(*args)
        assert run.returncode != 0 and words in run.stderr, run.stderr
    env = dict(os.environ, NBDSINK_BTF="/nonexistent/vmlinux")
    run = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "track", "start", loop,
                          "--backend", "bpf"], capture_output=True, text=True, env=env)
    assert run.returncode == 1 and "no BTF" in run.stderr, run.stderr


def test_skipped_program_run_marks_everything(make_loop: Callable[..., str]) -> None:
    """When the kernel reports a skipped (nested) run of the tracker's programs, the closed
    generation and the next one are reported whole: an unseen write cannot be lost."""
    loop = make_loop(16 * MiB)
    tracker = bpf.start_bpf(loop, CS)
    try:
        state_path = bpf.STATE_DIR / f"{tracker.name}.json"
        state = json.loads(state_path.read_text())
        state["misses"] -= 1  # as if the counters had moved since the last checkpoint
        state_path.write_text(json.dumps(state))
        whole = [(0, 16 * MiB)]
        assert tracker.checkpoint().extents == whole
        tracker.acknowledge(1)
        assert tracker.checkpoint().extents == whole  # the write may have landed after the flip
        tracker.acknowledge(2)
        assert tracker.checkpoint().extents == []
    finally:
        tracker.stop()

def assert_fresh_start_tracks(device: str, chunk: int) -> None:
    """A new ``start`` on ``device`` tracks again: a write to ``chunk`` is reported alone."""
    tracker = bpf.start_bpf(device, CS)
    try:
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        conf.write_direct(fd, chunk * CS, os.urandom(4096))
        os.close(fd)
        assert conf.reported_chunks(tracker.checkpoint()) == {chunk}
    finally:
        tracker.stop()


def test_lost_pins_are_reported_and_tracking_can_restart(make_loop: Callable[..., str]) -> None:
    loop = make_loop(16 * MiB)
    bpf.start_bpf(loop, CS).close()
    pins = bpf.PIN_ROOT / Path(loop).name
    for p in sorted(pins.iterdir(), key=lambda p: not p.name.startswith("link_")):
        p.unlink()  # what unmounting bpffs or a careless rm does
    with pytest.raises(TrackerError):
        bpf.open_bpf(loop).checkpoint()
    assert_fresh_start_tracks(loop, chunk=2)


@pytest.mark.parametrize("kind", ["loop", "zram"])
def test_copy_b_alone_tracks_everything(kind: str, make_loop: Callable[..., str],
                                        zram: Callable[[int], str],
                                        record_ratio: Callable[[float], None]) -> None:
    """Copy b handles every event that copy a did not claim: what a nested completion (which
    the kernel skips for a, already running on the CPU) relies on. With the a copies
    detached, b must see every write alone."""
    device = make_loop(64 * MiB) if kind == "loop" else zram(64 * MiB)

    def start_b_only(dev: str, chunk_size: int) -> Tracker:
        tracker = bpf.start_bpf(dev, chunk_size)
        links = sorted((bpf.PIN_ROOT / tracker.name).glob("link_*_a"))
        assert links, "no copy a attached"
        for link in links:
            link.unlink()  # detaches copy a
        return tracker

    report = conf.check_direct_io(start_b_only, device, CS, rounds=2, seed=7)
    assert report.changed > 0
    record_ratio(report.over_reporting)


def test_tracking_of_another_version_is_lost_and_replaced(make_loop: Callable[..., str]) -> None:
    """A tracking started by another nbdsink version (other map layouts) is reported lost to
    its users, and a new start replaces it instead of refusing."""
    loop = make_loop(16 * MiB)
    bpf.start_bpf(loop, CS).close()
    state_path = bpf.STATE_DIR / f"{Path(loop).name}.json"
    state = json.loads(state_path.read_text())
    state["version"] = 1
    state_path.write_text(json.dumps(state))
    with pytest.raises(TrackingLost, match="another version"):
        bpf.open_bpf(loop)
    assert_fresh_start_tracks(loop, chunk=4)


def _skip_hooks(tracker: bpf.BpfTracker, hooks: list[str], probe_chunk: int) -> list[Path]:
    """Detach ``hooks`` (see :func:`tracker.bpf_faults.detach`) and wait until writes to
    ``probe_chunk`` show that the completion programs stopped counting (a link is released
    from a workqueue a moment after its pin goes)."""
    links = bpf_faults.detach(tracker.name, hooks)
    deadline = time.monotonic() + 10
    while True:
        before = tracker._program_sectors()[0]
        _write_chunks(tracker.device, [probe_chunk])
        if tracker._program_sectors()[0] == before:
            return links
        assert time.monotonic() < deadline, "the programs stayed attached"
        time.sleep(0.01)


_reattach = bpf_faults.reattach


def _write_chunks(device: str, chunks: list[int]) -> None:
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        for c in chunks:
            conf.write_direct(fd, c * CS, os.urandom(8192))
    finally:
        os.close(fd)


def test_completions_the_programs_never_saw_are_reported(make_loop: Callable[..., str]) -> None:
    """The kernel skips the completion programs for some writes without a trace in their
    counters: the checkpoint finds the shortfall against the kernel's I/O accounting and
    reports the chunks issued meanwhile, so nothing is under-reported."""
    loop = make_loop(64 * MiB)
    tracker = bpf.start_bpf(loop, CS)
    try:
        _write_chunks(loop, [1])
        first = tracker.checkpoint()
        assert conf.reported_chunks(first) == {1}
        tracker.acknowledge(first.generation)
        links = _skip_hooks(tracker, ["on_rq_complete"], probe_chunk=5)
        _write_chunks(loop, [5, 6, 300])
        _reattach(links)
        _write_chunks(loop, [9])
        got = conf.reported_chunks(tracker.checkpoint())
        assert {5, 6, 9, 300} <= got, f"reported {sorted(got)}"
        assert len(got) < 64, "answered with the issued chunks, not the whole device"
        state = json.loads((bpf.STATE_DIR / f"{tracker.name}.json").read_text())
        assert state["unseen_sectors"] >= 3 * 16 and state["unseen_events"] == 1
        # Answered once: the next generation is exact again.
        tracker.acknowledge(tracker.checkpoint().generation)
        _write_chunks(loop, [12])
        assert conf.reported_chunks(tracker.checkpoint()) == {12}
    finally:
        tracker.stop()


def test_unseen_at_issue_and_completion_reports_the_whole_device(make_loop: Callable[..., str]) -> None:
    loop = make_loop(64 * MiB)
    tracker = bpf.start_bpf(loop, CS)
    try:
        tracker.acknowledge(tracker.checkpoint().generation)
        links = _skip_hooks(tracker, ["on_rq_issue", "on_rq_complete"], probe_chunk=7)
        _write_chunks(loop, [7])
        _reattach(links)
        got = conf.reported_chunks(tracker.checkpoint())
        assert got == set(range(64 * MiB // CS))
    finally:
        tracker.stop()
