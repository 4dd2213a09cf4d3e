"""Backend-independent conformance checks for change trackers.

Every backend (``bpf``, ``scan`` here; ``dm`` inside the VM) must pass them. Each check takes a
*factory* ``(device, chunk_size) -> Tracker`` that starts a tracker on a device, drives real
I/O (O_DIRECT writes, discards, write-zeroes, filesystems) and compares what the tracker
reported with the ground truth: the chunks whose content differs between O_DIRECT snapshots of
the device taken at each checkpoint. Reported must be a superset (over-reporting is allowed,
under-reporting never); the returned :class:`Report` gives the over-reporting ratio.

Import from a test module with ``from tracker.conformance import ...`` (``tests/`` is on
``sys.path`` because ``tests/tracker`` is a package) and stop the tracker in a ``finally``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nbdsink.tracker.base import DirtySet, Tracker, TrackerError
from nbdsink.tracker.scan import DIGEST_SIZE, device_digests

Factory = Callable[[str, int], Tracker]
Opener = Callable[[str], Tracker]

BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Report:
    """What a check observed: chunks truly changed and chunks reported, over all rounds;
    ``late``: changed chunks that completed while a checkpoint ran, so that the next
    generation had to report them (and did)."""

    changed: int = 0
    reported: int = 0
    late: int = 0

    @property
    def over_reporting(self) -> float:
        """Reported / truly changed chunks (1.0 is exact)."""
        return self.reported / max(self.changed, 1)


# -- device helpers ------------------------------------------------------------------------


def device_size(device: str) -> int:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def snapshot(device: str, chunk_size: int) -> list[bytes]:
    """Per-chunk digests of the device, read with O_DIRECT."""
    raw = device_digests(device, chunk_size, device_size(device))
    return [raw[i : i + DIGEST_SIZE] for i in range(0, len(raw), DIGEST_SIZE)]


def changed_chunks(before: list[bytes], after: list[bytes]) -> set[int]:
    return {c for c, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}


def io_counters(device: str) -> tuple[int, int, int]:
    """(writes completed, discards completed, requests in flight) of a block device, from
    its sysfs stat file. The counters move after the completion tracepoint has fired."""
    # By device number: a device-mapper node made by dmsetup without udev (as in the VM) is
    # not a symlink to its dm-N name.
    rdev = os.stat(device).st_rdev
    f = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/stat").read_text().split()
    return int(f[4]), int(f[11]), int(f[8])


def settle(device: str, quiet_for: float = 0.1, timeout: float = 3.0) -> None:
    """Wait until the device completed no write or discard for ``quiet_for`` seconds and has
    nothing in flight (a filesystem may still finish work after fsfreeze returned)."""
    deadline = time.monotonic() + timeout
    last = io_counters(device)
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = io_counters(device)
        if now != last or now[2]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            return


def reported_chunks(dirty: DirtySet) -> set[int]:
    out: set[int] = set()
    for off, length in dirty.extents:
        assert off % dirty.chunk_size == 0, f"extent {off} is not chunk-aligned"
        out.update(range(off // dirty.chunk_size, -(-(off + length) // dirty.chunk_size)))
    return out


def chunks_of(off: int, length: int, chunk_size: int) -> set[int]:
    return set(range(off // chunk_size, (off + length - 1) // chunk_size + 1))


def write_direct(fd: int, off: int, data: bytes) -> None:
    """One O_DIRECT write of ``data`` (length a multiple of 4096) at ``off``."""
    buf = mmap.mmap(-1, len(data))
    try:
        buf.write(data)
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        buf.close()


def discard(fd: int, off: int, length: int, zeroout: bool = False) -> None:
    fcntl.ioctl(fd, BLKZEROOUT if zeroout else BLKDISCARD, struct.pack("QQ", off, length))


def acknowledge_as_sender(tracker: Tracker, dirty: DirtySet, device: str) -> None:
    """Acknowledge like the sender: read what was reported and, if the backend wants to know
    what was pushed (scan), tell it; then acknowledge."""
    note = getattr(tracker, "note_sent", None)
    if note is not None:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        try:
            for off, length in dirty.extents:
                buf = mmap.mmap(-1, -(-length // 4096) * 4096)
                n = os.preadv(fd, [buf], off)
                note(dirty.generation, off, buf[: min(n, length)])
                buf.close()
        finally:
            os.close(fd)
    tracker.acknowledge(dirty.generation)


class UnderReport(AssertionError):
    """The tracker missed chunks that truly changed: the one thing a tracker must not do."""

    def __init__(self, message: str, chunks: set[int]) -> None:
        super().__init__(message)
        self.chunks = chunks


@dataclass
class Round:
    """One checkpoint compared with the ground truth."""

    generation: int
    truth: set[int]
    reported: set[int]
    missing: set[int]
    quiet: bool
    counters: tuple[tuple[int, int, int], tuple[int, int, int]]
    before: list[bytes]
    after: list[bytes]


class Checker:
    """Compares each checkpoint of ``tracker`` with the ground truth: the chunks whose O_DIRECT
    snapshot differs from the previous round's.

    The truth is exact only if the device was quiescent from the start of the checkpoint to
    the end of the snapshot: a write completing in between changes the snapshot but may
    belong to the next generation (it completed after the flip). So the device's own
    counters are read before the checkpoint and after the snapshot; if they moved, chunks
    missing from this generation are owed by the next one, which the next round checks.
    If they did not move, a missing chunk is an under-report (:class:`UnderReport`).
    """

    def __init__(self, tracker: Tracker, device: str, chunk_size: int, report: Report) -> None:
        self.tracker = tracker
        self.device = device
        self.chunk_size = chunk_size
        self.report = report
        self.before = snapshot(device, chunk_size)
        self.owed: set[int] = set()
        self.rounds: list[Round] = []

    def round(self, what: str, also_reported: set[int] | None = None, ack: bool = True) -> Round:
        """Checkpoint, snapshot, compare; ``also_reported``: chunks reported by checkpoints
        taken since the last round (already acknowledged)."""
        c0 = io_counters(self.device)
        dirty = self.tracker.checkpoint()
        after = snapshot(self.device, self.chunk_size)
        time.sleep(0.02)  # a completion whose data the snapshot saw has surely been counted
        c1 = io_counters(self.device)
        quiet = c0[:2] == c1[:2] and c0[2] == 0 and c1[2] == 0
        got = reported_chunks(dirty) | (also_reported or set())
        truth = changed_chunks(self.before, after)
        r = Round(dirty.generation, truth, got, truth - got, quiet, (c0, c1), self.before, after)
        self.rounds.append(r)
        owed = self.owed - got
        if owed:
            raise UnderReport(
                f"{what}: chunks {sorted(owed)[:20]} changed while generation "
                f"{dirty.generation - 1} was being closed, and generation {dirty.generation} "
                "does not report them either",
                owed,
            )
        if r.missing and quiet:
            raise UnderReport(
                f"{what}: generation {dirty.generation} misses chunks {sorted(r.missing)[:20]} "
                f"(the device was quiescent: counters {c0} -> {c1})",
                r.missing,
            )
        self.owed = r.missing
        self.report.late += len(r.missing)
        self.report.changed += len(truth)
        self.report.reported += len(got)
        if ack:
            acknowledge_as_sender(self.tracker, dirty, self.device)
        self.before = after
        return r

    def finish(self, what: str) -> None:
        """One more round if the last one left chunks owed by the next generation."""
        if self.owed:
            self.round(f"{what} (owed by the last round)")


# -- checks --------------------------------------------------------------------------------


def check_direct_io(factory: Factory, device: str, chunk_size: int, rounds: int = 4,
                    seed: int = 1) -> Report:
    """Random O_DIRECT writes of random sizes, discards and write-zeroes, in rounds."""
    rng = random.Random(seed)
    size = device_size(device)
    report = Report()
    tracker = factory(device, chunk_size)
    try:
        checker = Checker(tracker, device, chunk_size, report)
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            for r in range(rounds):
                for _ in range(rng.randint(5, 40)):
                    length = rng.choice([4096, 8192, rng.randrange(4096, 1 << 20, 4096)])
                    off = rng.randrange(0, size - length + 1, 4096)
                    write_direct(fd, off, rng.randbytes(length))
                # The very first and last sectors of the device (clipping, partition edges).
                write_direct(fd, 0, rng.randbytes(4096))
                write_direct(fd, size - 4096, rng.randbytes(4096))
                for _ in range(rng.randint(1, 4)):
                    length = rng.randrange(4096, 2 << 20, 4096)
                    off = rng.randrange(0, size - length + 1, 4096)
                    discard(fd, off, length, zeroout=rng.random() < 0.5)
                checker.round(f"round {r}")
            checker.finish("direct I/O")
        finally:
            os.close(fd)
    finally:
        tracker.stop()
    return report


def check_filesystem(factory: Factory, device: str, chunk_size: int, fstype: str,
                     mountpoint: Path, rounds: int = 3, seed: int = 2) -> Report:
    """Files written, appended, deleted through a mounted filesystem (with online discard).

    The filesystem is made before tracking starts and mounted after, as a user would; each
    round ends with ``fsfreeze`` so that the device is quiescent for the checkpoint and the
    snapshot (and the device is let settle: work a filesystem queued before the freeze may
    still complete after it). Finally the filesystem must check clean.
    """
    rng = random.Random(seed)
    mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}[fstype]
    subprocess.run([*mkfs, device], check=True, capture_output=True)
    report = Report()
    tracker = factory(device, chunk_size)
    mounted = False
    try:
        checker = Checker(tracker, device, chunk_size, report)
        subprocess.run(["mount", "-o", "discard", device, str(mountpoint)], check=True)
        mounted = True
        files: list[Path] = []
        for r in range(rounds + 1):
            if r > 0:
                for i in range(rng.randint(3, 12)):
                    p = mountpoint / f"r{r}-{i}"
                    p.write_bytes(rng.randbytes(rng.randrange(1, 3 << 20)))
                    files.append(p)
                for p in rng.sample(files, k=min(len(files) // 3, len(files))):
                    if rng.random() < 0.5:
                        p.unlink()
                        files.remove(p)
                    else:
                        with open(p, "ab") as f:
                            f.write(rng.randbytes(rng.randrange(1, 256 << 10)))
            os.sync()
            subprocess.run(["fsfreeze", "-f", str(mountpoint)], check=True)
            try:
                settle(device)
                checker.round(f"{fstype} round {r}")
            finally:
                subprocess.run(["fsfreeze", "-u", str(mountpoint)], check=True)
        subprocess.run(["umount", str(mountpoint)], check=True)
        mounted = False
        checker.round(f"{fstype} umount")
        checker.finish(f"{fstype} umount")
        fsck = {"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"]}[fstype]
        run = subprocess.run([*fsck, device], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    finally:
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=False)
        tracker.stop()
    return report


@dataclass
class _Write:
    start: float
    end: float
    chunks: set[int]


def check_concurrent(factory: Factory, device: str, chunk_size: int, checkpoints: int = 12,
                     seed: int = 3) -> Report:
    """A writer runs during checkpoints: every completed write is in a generation.

    A write that completed before a checkpoint began must be reported by that checkpoint or
    by one that ran while the write was in flight; nothing may be missing from every one.
    """
    size = device_size(device)
    writes: list[_Write] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(seed)
        fd = os.open(device, os.O_RDWR | os.O_DIRECT)
        try:
            while not stop.is_set():
                length = rng.choice([4096, 4096, 16384, 65536, 262144])
                off = rng.randrange(0, size - length + 1, 4096)
                data = rng.randbytes(length)
                t0 = time.monotonic()
                write_direct(fd, off, data)
                writes.append(_Write(t0, time.monotonic(), chunks_of(off, length, chunk_size)))
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    tracker = factory(device, chunk_size)
    calls: list[tuple[float, float, set[int]]] = []
    report = Report()
    try:
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            for _ in range(checkpoints):
                time.sleep(0.02)
                a = time.monotonic()
                dirty = tracker.checkpoint()
                calls.append((a, time.monotonic(), reported_chunks(dirty)))
                tracker.acknowledge(dirty.generation)
        finally:
            stop.set()
            thread.join()
        assert not errors, errors
        a = time.monotonic()
        dirty = tracker.checkpoint()
        calls.append((a, time.monotonic(), reported_chunks(dirty)))
    finally:
        tracker.stop()
    assert len(writes) > 50, f"the writer only completed {len(writes)} writes"
    for w in writes:
        # Checkpoints that may have closed the generation the write completed in: those that
        # ended after it started, up to the first that began after it completed.
        window: set[int] = set()
        for a, b, got in calls:
            if b > w.start:
                window |= got
            if a > w.end:
                break
        missing = w.chunks - window
        assert not missing, f"a write completed at {w.end:.6f} is missing chunks {sorted(missing)}"
    report.changed = len(set().union(*(w.chunks for w in writes)))
    report.reported = sum(len(got) for _, _, got in calls)
    return report


_RESTART_CHILD = """
import mmap, os, sys, time
from nbdsink.tracker import start_tracker
device, chunk_size, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def write(chunk):
    buf = mmap.mmap(-1, 4096); buf.write(os.urandom(4096))
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    os.pwritev(fd, [buf], chunk * chunk_size); os.close(fd)
def ack(d):
    note = t.note_sent if t.learns_from_sent_data else None   # the scan backend wants what was sent
    if note is not None:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
        for off, length in d.extents:
            buf = mmap.mmap(-1, length); n = os.preadv(fd, [buf], off)
            note(d.generation, off, buf[:n])
        os.close(fd)
    t.acknowledge(d.generation)
t = start_tracker(device, chunk_size, backend, consumer=None)   # the backend itself
write(1); write(2)
ack(t.checkpoint())                                  # chunks 1, 2: sent and acknowledged
write(5); write(6)
t.checkpoint()                                       # chunks 5, 6: read, never acknowledged
write(9)                                             # chunk 9: not even checkpointed
print("ready", flush=True)
time.sleep(3600)
"""


def check_restart(backend: str, opener: Opener, device: str, chunk_size: int) -> DirtySet:
    """The process that started tracking is killed between checkpoints; nothing is lost.

    A child process starts tracking (through :func:`nbdsink.tracker.start_tracker`), writes,
    checkpoints, acknowledges, writes, checkpoints without acknowledging, writes again and is
    SIGKILLed. More writes follow while no process holds the tracker. A new handle from
    ``opener`` must report every unacknowledged write.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _RESTART_CHILD, device, str(chunk_size), backend],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "ready", f"child failed (exit {child.poll()})"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        write_direct(fd, 12 * chunk_size, os.urandom(4096))
    finally:
        os.close(fd)
    tracker = opener(device)
    try:
        dirty = tracker.checkpoint()
        got = reported_chunks(dirty)
        assert {5, 6, 9, 12} <= got, f"after the restart the tracker reports {sorted(got)}"
        acknowledge_as_sender(tracker, dirty, device)
        assert reported_chunks(tracker.checkpoint()) == set()
    finally:
        tracker.stop()
    return dirty


def check_ack_semantics(factory: Factory, device: str, chunk_size: int) -> None:
    """Unacknowledged generations are reported again; acknowledging an older generation
    forgets nothing a later checkpoint reported."""
    tracker = factory(device, chunk_size)
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        write_direct(fd, 3 * chunk_size, os.urandom(4096))
        g1 = tracker.checkpoint()
        assert 3 in reported_chunks(g1)
        write_direct(fd, 7 * chunk_size, os.urandom(4096))
        g2 = tracker.checkpoint()
        assert {3, 7} <= reported_chunks(g2), "an unacknowledged generation was not reported again"
        assert g2.generation > g1.generation
        tracker.acknowledge(g1.generation)
        write_direct(fd, 11 * chunk_size, os.urandom(4096))
        g3 = tracker.checkpoint()
        assert {7, 11} <= reported_chunks(g3), "acknowledging g1 forgot what g2 reported"
        tracker.acknowledge(g3.generation)
        tracker.acknowledge(g2.generation)  # older than the last acknowledged: a no-op
        assert reported_chunks(tracker.checkpoint()) <= {3, 7, 11}
        try:
            tracker.acknowledge(10**9)
        except TrackerError:
            pass
        else:
            raise AssertionError("acknowledging a generation never closed was accepted")
        assert tracker.status().backend == tracker.backend
    finally:
        os.close(fd)
        tracker.stop()


def check_bad_input(factory: Factory, device: str, chunk_size: int) -> None:
    """Missing device, chunk size not a power of two, second start: each a clear error."""
    for dev, cs, words in [
        ("/dev/nbdsink-no-such-device", chunk_size, "no such device"),
        (device, 3000, "power of two"),
    ]:
        try:
            factory(dev, cs).stop()
        except TrackerError as exc:
            assert words in str(exc), str(exc)
        else:
            raise AssertionError(f"starting on {dev} with chunk size {cs} was accepted")
    tracker = factory(device, chunk_size)
    try:
        try:
            factory(device, chunk_size).stop()
        except TrackerError as exc:
            assert "already tracked" in str(exc), str(exc)
        else:
            raise AssertionError("a second start on a tracked device was accepted")
    finally:
        tracker.stop()


__all__ = [
    "Checker",
    "Factory",
    "Report",
    "Round",
    "UnderReport",
    "check_ack_semantics",
    "check_bad_input",
    "check_concurrent",
    "check_direct_io",
    "check_filesystem",
    "check_restart",
    "io_counters",
    "settle",
]
