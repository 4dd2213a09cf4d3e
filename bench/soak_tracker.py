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
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

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


def describe(what: str, exc: UnderReport, r: Round, device: str, fstype: str, chunk_size: int,
             tracker: bpf.BpfTracker, log: list[Op]) -> str:
    missing = sorted(exc.chunks)
    lines = [f"UNDER-REPORT: {exc}",
             f"  generation {r.generation}; device counters (writes, discards, in flight) "
             f"before the checkpoint {r.counters[0]}, after the snapshot {r.counters[1]}; "
             f"quiet={r.quiet}; truth {len(r.truth)} chunks, reported {len(r.reported)}"]
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        for c in missing[:10]:
            buf = mmap.mmap(-1, chunk_size)
            os.preadv(fd, [buf], c * chunk_size)
            data = bytes(buf)
            buf.close()
            kind = "all zeros (discarded or zeroed)" if data.count(0) == len(data) else "data"
            lines.append(f"  chunk {c} (bytes {c * chunk_size}..{(c + 1) * chunk_size}): digest "
                         f"{r.before[c].hex()[:12]} -> {r.after[c].hex()[:12]}, now {kind}, "
                         f"sha256 {hashlib.sha256(data).hexdigest()[:12]}")
            if fstype == "ext4":
                inodes, paths = owners_ext4(device, c, chunk_size)
                lines.append(f"    owners: inodes {inodes}, paths {paths}")
                for name in sorted({Path(p).name for p in paths}):
                    lines.extend(f"    {o}" for o in [o for o in log if o.file == name][-6:])
    finally:
        os.close(fd)
    nxt = reported_chunks(tracker.checkpoint())
    lines.append(f"  a checkpoint taken now reports {sorted(set(missing) & nxt)[:20]} of them")
    return "\n".join(lines)


def session(n: int, fstype: str, rng: random.Random, backing: str, rounds: int,
            totals: Totals) -> None:
    chunk_size = rng.choice([4096, 64 << 10, 64 << 10])
    size = 320 * MiB if fstype == "xfs" else 128 * MiB
    with tempfile.TemporaryDirectory(dir=backing, prefix="nbdsink-soak-") as tmp:
        img = Path(tmp) / "disk.img"
        with open(img, "wb") as f:
            f.truncate(size)
        mnt = Path(tmp) / "mnt"
        mnt.mkdir()
        loop = run(["losetup", "-f", "--show", str(img)]).stdout.strip()
        tracker: bpf.BpfTracker | None = None
        mounted = False
        log: list[Op] = []
        report = Report()
        try:
            run({"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}[fstype] + [loop])
            tracker = bpf.start_bpf(loop, chunk_size)
            checker = Checker(tracker, loop, chunk_size, report)
            run(["mount", "-o", "discard", loop, str(mnt)])
            mounted = True
            main = Workload(mnt, "f", rng, log, size // 3)
            side = Workload(mnt, "w", random.Random(rng.random()), log, size // 4)
            for r in range(1, rounds + 1):
                also: set[int] = set()
                if r % 2:
                    for _ in range(rng.randint(5, 30)):
                        main.step(r)
                else:
                    stop = threading.Event()
                    errors: list[BaseException] = []

                    def writer(stop: threading.Event = stop, errors: list[BaseException] = errors,
                               r: int = r) -> None:
                        try:
                            while not stop.is_set():
                                side.step(r)
                        except BaseException as exc:
                            errors.append(exc)

                    t = threading.Thread(target=writer, daemon=True)
                    t.start()
                    try:
                        for _ in range(rng.randint(3, 8)):
                            time.sleep(rng.uniform(0.01, 0.08))
                            dirty = tracker.checkpoint()
                            also |= reported_chunks(dirty)
                            acknowledge_as_sender(tracker, dirty, loop)
                    finally:
                        stop.set()
                        t.join()
                    if errors:
                        raise errors[0]
                os.sync()
                run(["fsfreeze", "-f", str(mnt)])
                try:
                    check(checker, f"session {n} {fstype} round {r}", also, loop, fstype,
                          chunk_size, tracker, log, totals)
                finally:
                    run(["fsfreeze", "-u", str(mnt)])
            run(["umount", str(mnt)])
            mounted = False
            check(checker, f"session {n} {fstype} umount", set(), loop, fstype, chunk_size,
                  tracker, log, totals)
            if checker.owed:
                check(checker, f"session {n} {fstype} after umount", set(), loop, fstype,
                      chunk_size, tracker, log, totals)
            fsck = {"ext4": ["e2fsck", "-fn"], "xfs": ["xfs_repair", "-n"]}[fstype]
            run([*fsck, loop])
            ma, mb = misses(loop)
            totals.misses_a += ma
            totals.misses_b += mb
        finally:
            if mounted:
                subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
                subprocess.run(["umount", str(mnt)], check=False)
            if tracker is not None:
                tracker.stop()
            subprocess.run(["losetup", "-d", loop], check=False)
    totals.sessions += 1
    totals.changed += report.changed
    totals.reported += report.reported
    totals.late += report.late
    print(f"session {n}: {fstype}, chunk {chunk_size >> 10}K, {rounds} rounds, "
          f"changed {report.changed} chunks, reported {report.reported}, "
          f"late {report.late}, nested runs (a misses) {ma}, b misses {mb}", flush=True)


def check(checker: Checker, what: str, also: set[int], loop: str, fstype: str, chunk_size: int,
          tracker: bpf.BpfTracker, log: list[Op], totals: Totals) -> None:
    rounds_before = len(checker.rounds)
    try:
        r = checker.round(what, also_reported=also)
    except UnderReport as exc:
        r = checker.rounds[-1]
        text = describe(what, exc, r, loop, fstype, chunk_size, tracker, log)
        print(text, flush=True)
        totals.under.append(text)
        # Carry on from what the device holds now; the unacknowledged generation is simply
        # reported again.
        checker.before = r.after
        checker.owed = set()
    assert len(checker.rounds) == rounds_before + 1
    totals.rounds += 1
    totals.compared += len(r.after)
    totals.unquiet += not r.quiet


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--fs", default="ext4,xfs", help="comma-separated: ext4, xfs")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per session")
    ap.add_argument("--backing-dir", default="/tmp")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"soak: seed {seed}, {args.minutes} minutes, filesystems {args.fs}", flush=True)
    fstypes = args.fs.split(",")
    totals = Totals()
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    n = 0
    while time.monotonic() < deadline:
        n += 1
        session(n, fstypes[(n - 1) % len(fstypes)], rng, args.backing_dir, args.rounds, totals)
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
