"""Soak test of the bpf change tracker against ground truth, through real filesystems.

Runs, until ``--minutes`` have passed, sessions of the conformance suite's filesystem workload,
longer and more varied: each session makes a fresh loop device, ext4 or xfs on it (in turn),
starts the bpf tracker, mounts with online discard and runs rounds of random file creates,
overwrites, appends, truncates, hole punches (discards), deletes and fsyncs. Every round ends
with a checkpoint compared, chunk by chunk, with the device's O_DIRECT snapshots
(``tests/tracker/conformance.py``, class ``Checker``): reported must include every chunk that
truly changed. Odd rounds run a second writer during several checkpoints (each acknowledged,
like the sender does) and compare the union of their reports with the truth. Rounds are
quiesced with fsfreeze but, unlike the test suite, not let settle afterwards, so that I/O a
filesystem completes after the freeze is exercised too (the checker then holds the next
generation to account for it).

Prints a line per session and a summary: rounds, chunks compared, over-reporting ratio,
changes that landed while a checkpoint ran, nested completions (recursion misses of copy a,
handled by copy b) and any under-report, in detail: chunks, generation, device counters,
content before and after, the files that own the blocks (ext4) and what the workload did to
them. Exit status 1 if anything was under-reported.

    .venv/bin/python bench/soak_tracker.py --minutes 30 [--fs ext4,xfs] [--backing-dir /tmp]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import mmap
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tracker.conformance import (  # noqa: E402
    Checker,
    Report,
    Round,
    UnderReport,
    acknowledge_as_sender,
    reported_chunks,
)

from nbdsink.tracker import bpf, libbpf  # noqa: E402
from nbdsink.tracker.base import DirtySet, Tracker  # noqa: E402

MiB = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


@dataclass
class Op:
    round: int
    what: str
    file: str
    offset: int
    length: int


class Workload:
    """Random file operations under ``root``; every operation is logged for failure reports."""

    def __init__(self, root: Path, prefix: str, rng: random.Random, log: list[Op],
                 max_bytes: int) -> None:
        self.root = root
        self.prefix = prefix
        self.rng = rng
        self.log = log
        self.max_bytes = max_bytes
        self.files: dict[str, int] = {}
        self.count = 0

    def _size_total(self) -> int:
        return sum(self.files.values())

    def step(self, rnd: int) -> None:
        rng = self.rng
        ops = ["create", "overwrite", "append", "truncate", "punch", "delete", "fsync"]
        weights = [4, 4, 2, 1, 2, 3, 1]
        if not self.files or self._size_total() > self.max_bytes:
            op = "delete" if self.files else "create"
        else:
            op = rng.choices(ops, weights)[0]
        if op == "create":
            self.count += 1
            name = f"{self.prefix}{self.count}"
            size = rng.choice([rng.randrange(1, 64 << 10), rng.randrange(1, 4 * MiB)])
            with open(self.root / name, "wb") as f:
                f.write(rng.randbytes(size))
                if rng.random() < 0.3:
                    os.fsync(f.fileno())
            self.files[name] = size
            self.log.append(Op(rnd, "create", name, 0, size))
            return
        name = rng.choice(sorted(self.files))
        path = self.root / name
        size = self.files[name]
        if op == "overwrite":
            length = rng.randrange(1, 512 << 10)
            off = rng.randrange(0, size + 1)
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(rng.randbytes(length))
            self.files[name] = max(size, off + length)
            self.log.append(Op(rnd, op, name, off, length))
        elif op == "append":
            length = rng.randrange(1, 1 * MiB)
            with open(path, "ab") as f:
                f.write(rng.randbytes(length))
            self.files[name] = size + length
            self.log.append(Op(rnd, op, name, size, length))
        elif op == "truncate":
            new = rng.randrange(0, size + 1)
            os.truncate(path, new)
            self.files[name] = new
            self.log.append(Op(rnd, op, name, new, size - new))
        elif op == "punch":
            off = rng.randrange(0, size + 1)
            length = rng.randrange(4096, 2 * MiB)
            fd = os.open(path, os.O_RDWR)
            try:
                if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length):
                    raise OSError(ctypes.get_errno(), f"fallocate punch {path}")
            finally:
                os.close(fd)
            self.log.append(Op(rnd, op, name, off, length))
        elif op == "delete":
            path.unlink()
            del self.files[name]
            self.log.append(Op(rnd, op, name, 0, size))
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.log.append(Op(rnd, op, name, 0, 0))


class BlockTrace:
    """The kernel's own block tracepoints (tracefs), kept in a ring buffer, so that an
    under-report can be shown next to every request that touched the chunk, and the
    checkpoints (written into the trace as markers)."""

    ROOT = Path("/sys/kernel/tracing")
    EVENTS = ("block_bio_queue", "block_rq_issue", "block_rq_complete")

    def __init__(self) -> None:
        if not (self.ROOT / "events").exists():
            run(["mount", "-t", "tracefs", "tracefs", str(self.ROOT)])
        (self.ROOT / "tracing_on").write_text("0")
        (self.ROOT / "buffer_size_kb").write_text("65536")
        (self.ROOT / "trace_clock").write_text("mono")
        for e in self.EVENTS:
            (self.ROOT / "events" / "block" / e / "enable").write_text("1")
        (self.ROOT / "trace").write_text("")
        (self.ROOT / "tracing_on").write_text("1")

    def mark(self, text: str) -> None:
        (self.ROOT / "trace_marker").write_text(text)

    def touching(self, device: str, first: int, last: int) -> list[str]:
        """Trace lines of ``device`` whose sectors overlap [first, last], and the markers."""
        (self.ROOT / "tracing_on").write_text("0")
        try:
            st = os.stat(os.path.realpath(device)).st_rdev
            dev = f" {os.major(st)},{os.minor(st)} "
            out = []
            for line in (self.ROOT / "trace").read_text(errors="replace").splitlines():
                if "tracing_mark_write" in line:
                    out.append(line)
                    continue
                if dev not in line:
                    continue
                # "<dev> <rwbs> ... <sector> + <sectors> ..." in every block event.
                tokens = line.split(dev, 1)[1].split()
                if tokens[0].startswith("R") or "+" not in tokens:
                    continue  # reads (the snapshots) change nothing
                i = tokens.index("+")
                try:
                    sector, n = int(tokens[i - 1]), int(tokens[i + 1])
                except (IndexError, ValueError):
                    continue
                if sector <= last and sector + max(n, 1) > first:
                    out.append(line)
            return out
        finally:
            (self.ROOT / "tracing_on").write_text("1")

    def close(self) -> None:
        (self.ROOT / "tracing_on").write_text("0")
        for e in self.EVENTS:
            (self.ROOT / "events" / "block" / e / "enable").write_text("0")
        (self.ROOT / "trace").write_text("")


class TracedTracker:
    """A tracker whose checkpoints are marked in the block trace."""

    def __init__(self, tracker: bpf.BpfTracker, trace: BlockTrace | None) -> None:
        self.tracker = tracker
        self.trace = trace
        self.backend = tracker.backend

    def checkpoint(self) -> DirtySet:
        if self.trace:
            self.trace.mark(f"checkpoint begins (generation {self.tracker._seq() + 1} closes)")
        d = self.tracker.checkpoint()
        if self.trace:
            self.trace.mark(f"checkpoint of generation {d.generation} done")
        return d

    def acknowledge(self, generation: int) -> None:
        self.tracker.acknowledge(generation)


@dataclass
class Totals:
    sessions: int = 0
    rounds: int = 0
    compared: int = 0
    changed: int = 0
    reported: int = 0
    late: int = 0
    unquiet: int = 0
    misses_a: int = 0
    misses_b: int = 0
    under: list[str] = field(default_factory=list)


def run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def misses(loop: str) -> tuple[int, int]:
    """Recursion misses of the a and b copies of the tracker's programs on ``loop``."""
    out = [0, 0]
    for p in (bpf.PIN_ROOT / Path(loop).name).glob("prog_*"):
        with libbpf.opened(str(p)) as fd:
            out[p.name.endswith("_b")] += libbpf.recursion_misses(fd)
    return out[0], out[1]


def owners_ext4(device: str, chunk: int, chunk_size: int) -> tuple[list[str], list[str]]:
    """Inodes and paths owning the chunk's blocks (ext4, read from the frozen device)."""
    head = subprocess.run(["dumpe2fs", "-h", device], capture_output=True, text=True).stdout
    bs = next(int(ln.split(":")[1]) for ln in head.splitlines() if ln.startswith("Block size:"))
    first, last = chunk * chunk_size // bs, ((chunk + 1) * chunk_size - 1) // bs
    blocks = " ".join(str(b) for b in range(first, last + 1))
    icheck = subprocess.run(["debugfs", "-R", f"icheck {blocks}", device],
                            capture_output=True, text=True).stdout
    inodes = sorted({ln.split()[1] for ln in icheck.splitlines()[1:]
                     if len(ln.split()) == 2 and ln.split()[1].isdigit()})
    if not inodes:
        return [], []  # free blocks now, or metadata
    ncheck = subprocess.run(["debugfs", "-R", "ncheck " + " ".join(inodes), device],
                            capture_output=True, text=True).stdout
    return inodes, [ln.split(None, 1)[1] for ln in ncheck.splitlines()[1:] if len(ln.split(None, 1)) == 2]


class Session:
    """One loop device, one filesystem, one tracking: rounds checked against the truth."""

    def __init__(self, n: int, fstype: str, rng: random.Random, totals: Totals,
                 trace: BlockTrace | None) -> None:
        self.n = n
        self.fstype = fstype
        self.rng = rng
        self.totals = totals
        self.trace = trace
        self.chunk_size = rng.choice([4096, 64 << 10, 64 << 10])
        self.size = 320 * MiB if fstype == "xfs" else 128 * MiB
        self.log: list[Op] = []
        self.report = Report()
        self.late_rounds: list[str] = []

    def run(self, backing: str, rounds: int) -> None:
        with tempfile.TemporaryDirectory(dir=backing, prefix="nbdsink-soak-") as tmp:
            img = Path(tmp) / "disk.img"
            with open(img, "wb") as f:
                f.truncate(self.size)
            mnt = Path(tmp) / "mnt"
            mnt.mkdir()
            self.loop = run(["losetup", "-f", "--show", str(img)]).stdout.strip()
            self.tracker: bpf.BpfTracker | None = None
            mounted = False
            try:
                mkfs = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}
                run([*mkfs[self.fstype], self.loop])
                self.tracker = bpf.start_bpf(self.loop, self.chunk_size)
                self.traced = TracedTracker(self.tracker, self.trace)
                self.checker = Checker(cast(Tracker, self.traced), self.loop, self.chunk_size,
                                       self.report)
                run(["mount", "-o", "discard", self.loop, str(mnt)])
                mounted = True
                for r in range(1, rounds + 1):
                    also = self.files(mnt, r) if r % 2 else self.racing_checkpoints(mnt, r)
                    os.sync()
                    run(["fsfreeze", "-f", str(mnt)])
                    try:
                        self.check(f"round {r}", also)
                    finally:
                        run(["fsfreeze", "-u", str(mnt)])
                run(["umount", str(mnt)])
                mounted = False
                self.check("umount", set())
                if self.checker.owed:
                    self.check("after umount", set())
                fsck = {"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"]}[self.fstype]
                run([*fsck, self.loop])
                ma, mb = misses(self.loop)
            finally:
                if mounted:
                    subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
                    subprocess.run(["umount", str(mnt)], check=False)
                if self.tracker is not None:
                    self.tracker.stop()
                subprocess.run(["losetup", "-d", self.loop], check=False)
        t, rep = self.totals, self.report
        t.sessions += 1
        t.changed += rep.changed
        t.reported += rep.reported
        t.late += rep.late
        t.misses_a += ma
        t.misses_b += mb
        late = f" (in {', '.join(self.late_rounds)})" if self.late_rounds else ""
        print(f"session {self.n}: {self.fstype}, chunk {self.chunk_size >> 10}K, {rounds} rounds, "
              f"changed {rep.changed} chunks, reported {rep.reported}, late {rep.late}{late}, "
              f"nested runs (a misses) {ma}, b misses {mb}", flush=True)

    def files(self, mnt: Path, r: int) -> set[int]:
        if not hasattr(self, "main"):
            self.main = Workload(mnt, "f", self.rng, self.log, self.size // 3)
        for _ in range(self.rng.randint(5, 30)):
            self.main.step(r)
        return set()

    def racing_checkpoints(self, mnt: Path, r: int) -> set[int]:
        """A writer runs while checkpoints are taken (and acknowledged, as the sender does);
        returns the union of what they reported."""
        if not hasattr(self, "side"):
            self.side = Workload(mnt, "w", random.Random(self.rng.random()), self.log,
                                 self.size // 4)
        stop = threading.Event()
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                while not stop.is_set():
                    self.side.step(r)
            except BaseException as exc:
                errors.append(exc)

        also: set[int] = set()
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        try:
            for _ in range(self.rng.randint(3, 8)):
                time.sleep(self.rng.uniform(0.01, 0.08))
                dirty = self.traced.checkpoint()
                also |= reported_chunks(dirty)
                acknowledge_as_sender(cast(Tracker, self.traced), dirty, self.loop)
        finally:
            stop.set()
            t.join()
        if errors:
            raise errors[0]
        return also

    def check(self, what: str, also: set[int]) -> None:
        what = f"session {self.n} {self.fstype} {what}"
        late = self.report.late
        try:
            r = self.checker.round(what, also_reported=also)
        except UnderReport as exc:
            r = self.checker.rounds[-1]
            text = self.describe(exc, r)
            print(text, flush=True)
            self.totals.under.append(text)
            # Carry on from what the device holds now; the unacknowledged generation is
            # simply reported again.
            self.checker.before = r.after
            self.checker.owed = set()
        if self.report.late > late:
            self.late_rounds.append(what.rsplit(" ", 2)[-2] + " " + what.rsplit(" ", 1)[-1])
        self.totals.rounds += 1
        self.totals.compared += len(r.after)
        self.totals.unquiet += not r.quiet

    def bitmap_bits(self, chunk: int) -> str:
        """The chunk's bit and its word in both bitmaps of the kernel."""
        t = self.tracker
        assert t is not None
        w = chunk // 64
        out = [f"seq {t._seq()}"]
        with memoryview(t._bits) as raw, raw.cast("Q") as words:
            for idx in (0, 1):
                word = words[idx * t._geo.words + w]
                out.append(f"bitmap {idx}: chunk bit {word >> (chunk % 64) & 1}, word {word:#x}")
        return "; ".join(out)

    def describe(self, exc: UnderReport, r: Round) -> str:
        cs = self.chunk_size
        missing = sorted(exc.chunks)
        lines = [f"UNDER-REPORT: {exc}",
                 f"  generation {r.generation}, chunk size {cs}; device counters (writes, "
                 f"discards, in flight) before the checkpoint {r.counters[0]}, after the snapshot "
                 f"{r.counters[1]}; quiet={r.quiet}; truth {len(r.truth)} chunks, reported "
                 f"{len(r.reported)}"]
        fd = os.open(self.loop, os.O_RDONLY | os.O_DIRECT)
        try:
            for c in missing[:10]:
                buf = mmap.mmap(-1, cs)
                os.preadv(fd, [buf], c * cs)
                data = bytes(buf)
                buf.close()
                kind = "all zeros (discarded or zeroed)" if data.count(0) == len(data) else "data"
                lines.append(f"  chunk {c} (bytes {c * cs}..{(c + 1) * cs}, sectors "
                             f"{c * cs // 512}..{(c + 1) * cs // 512 - 1}): digest "
                             f"{r.before[c].hex()[:12]} -> {r.after[c].hex()[:12]}, now {kind}, "
                             f"sha256 {hashlib.sha256(data).hexdigest()[:12]}")
                lines.append(f"    tracker bitmaps now: {self.bitmap_bits(c)}")
                if self.fstype == "ext4":
                    inodes, paths = owners_ext4(self.loop, c, cs)
                    lines.append(f"    owners: inodes {inodes}, paths {paths}")
                    for name in sorted({Path(p).name for p in paths}):
                        lines.extend(f"    {o}" for o in [o for o in self.log if o.file == name][-6:])
                if self.trace is not None:
                    first, last = c * cs // 512, (c + 1) * cs // 512 - 1
                    hits = self.trace.touching(self.loop, first, last)
                    lines.append("    block trace (requests touching it, and checkpoints):")
                    lines.extend(f"      {h.strip()}" for h in hits[-60:])
        finally:
            os.close(fd)
        assert self.tracker is not None
        nxt = reported_chunks(self.tracker.checkpoint())
        lines.append(f"  a checkpoint taken now reports {sorted(set(missing) & nxt)[:20]} of them")
        return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fs", default="ext4,xfs", help="comma-separated: ext4, xfs")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per session")
    ap.add_argument("--backing-dir", default="/tmp")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--trace", action="store_true",
                    help="record the block tracepoints (tracefs) to show, for an under-reported "
                         "chunk, every request that touched it")
    args = ap.parse_args()
    # Stopped with SIGTERM (kill, a timeout), still unmount, stop the tracker, detach.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"soak: seed {seed}, {args.minutes} minutes, filesystems {args.fs}", flush=True)
    fstypes = args.fs.split(",")
    totals = Totals()
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    n = 0
    trace = BlockTrace() if args.trace else None
    try:
        while time.monotonic() < deadline:
            n += 1
            Session(n, fstypes[(n - 1) % len(fstypes)], rng, totals, trace).run(
                args.backing_dir, args.rounds)
    finally:
        if trace is not None:
            trace.close()
    minutes = (time.monotonic() - t0) / 60
    print(f"\nsoak done: {minutes:.1f} minutes, {totals.sessions} sessions, {totals.rounds} rounds, "
          f"{totals.compared} chunks compared, {totals.changed} truly changed, "
          f"{totals.reported} reported (over-reporting {totals.reported / max(totals.changed, 1):.2f}), "
          f"{totals.unquiet} rounds with I/O completing during the checkpoint, "
          f"{totals.late} chunks late (reported by the next generation), "
          f"{totals.misses_a} nested runs handled by copy b, {totals.misses_b} misses of copy b")
    print(f"under-reports: {len(totals.under)}")
    return 1 if totals.under else 0


if __name__ == "__main__":
    sys.exit(main())
