"""What integrity costs: ``verify --full`` against bare blake3, and the checked read path
against an unchecked one, over the same bytes, in one run.

    .venv/bin/python bench/bench_verify.py [--size 1G] [--dir /var/tmp] [--rounds 3]

A store is filled with --size of random data (64 KiB blocks). Then, with the data in the
page cache (both sides read the same cached segment files):
  verify --full   store.check.verify(full=True)   vs  blake3 of every chunk's bytes, read
                  in one process, the store open      straight from the segment
                  already
  the command     check.verify_store(full=True),  vs  the same: what `nbdsink verify --full`
                  LMDB's pages walked first           runs, the walk that keeps damaged pages
                                                      from crashing it included; with its
                                                      default worker processes (one per
                                                      CPU; target >= 0.8) and in one process
                                                      (--jobs 1), with the CPU time each took
  read path       every chunk read through Store.copy_chunk (checked against its xxh3)
                                                  vs  the same copies without the check:
                                                      the check's cost per GiB, to set
                                                      against a whole NBD read (target <= 10%)
Ratios are reference_time / nbdsink_time (above 1: nbdsink faster); the median of --rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3

from nbdsink.store import Store, check, workers
from nbdsink.store.chunks import HEADER_SIZE
from nbdsink.store.head import Head
from nbdsink.store.segments import copy_stored
from nbdsink.store.store import Location, Reading
from nbdsink.units import format_size, parse_size

BS = 64 << 10


def fill(path: Path, size: int) -> Store:
    store = Store(path, create=True)
    head = Head(store, store.create_volume("vol", size, BS))
    step = 16 << 20
    for off in range(0, size, step):
        head.write(memoryview(os.urandom(min(step, size - off))), off)
    head.commit()
    return store


def listing(store: Store) -> list[tuple[bytes, Location]]:
    return store.read(lambda r: [(bytes(d), Location.decode(v))
                                 for d, v in r.txn.cursor(db=store._index)])


def bare_blake3(store: Store, chunks: list[tuple[bytes, Location]]) -> float:
    def run(r: Reading) -> None:
        for digest, loc in chunks:
            stored, _tail = r.segments.get(loc.segment, digest)
            assert stored is not None
            blake3.blake3(memoryview(stored)[HEADER_SIZE:]).digest()
    start = time.perf_counter()
    store.read(run)
    return time.perf_counter() - start


def verify_full(store: Store) -> float:
    start = time.perf_counter()
    report = check.verify(store, full=True)
    assert report.clean
    return time.perf_counter() - start


def reads(store: Store, chunks: list[tuple[bytes, Location]], checked: bool) -> float:
    buf = bytearray(BS)
    view = memoryview(buf)

    def run(r: Reading) -> None:
        for digest, loc in chunks:
            if checked:
                store.copy_chunk(r, digest, view[: loc.length], 0)
            else:
                stored, tail = r.segments.get(loc.segment, digest)
                assert stored is not None
                copy_stored(stored, tail, view[: loc.length], 0, "")
    start = time.perf_counter()
    store.read(run)
    return time.perf_counter() - start


_COMMAND = """
import json, resource, sys, time
from nbdsink.store import check

def cpu():
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                           resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

before, start = cpu(), time.perf_counter()
assert check.verify_store(sys.argv[1], full=True, jobs=int(sys.argv[2])).clean
print(json.dumps([time.perf_counter() - start, cpu() - before]))
"""


def _command(store: Path, jobs: int) -> tuple[float, float]:
    """Seconds and CPU seconds (workers included) of verify_store(full=True) in a process of
    its own, as `nbdsink verify --full` runs it (interpreter start-up left out): forked
    workers start from a small process, not from this one with a GiB of data behind it."""
    done = subprocess.run([sys.executable, "-c", _COMMAND, str(store), str(jobs)],
                          capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    elapsed, cpu = json.loads(done.stdout)
    return float(elapsed), float(cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbdsink-bench-verify-", dir=args.dir) as tmp:
        store = fill(Path(tmp) / "store", args.size)
        chunks = listing(store)
        reads(store, chunks, checked=False)  # warm the page cache
        gib = args.size / (1 << 30)
        verify_ratios, read_costs = [], []
        for _ in range(args.rounds):
            ref, ours = bare_blake3(store, chunks), verify_full(store)
            verify_ratios.append(ref / ours)
            plain, checked = reads(store, chunks, False), reads(store, chunks, True)
            read_costs.append((checked - plain) / (args.size / (1 << 30)))
            print(f"round: verify --full {format_size(args.size / ours)}/s vs bare blake3 "
                  f"{format_size(args.size / ref)}/s = {ref / ours:.2f}x; reads checked "
                  f"{checked:.3f}s vs unchecked {plain:.3f}s (+{100 * (checked / plain - 1):.1f}%)")
        store.close()
        jobs = workers.default_jobs()
        command: dict[int, list[tuple[float, float]]] = {jobs: [], 1: []}
        for _ in range(args.rounds):
            for n in command:
                # The command opens the store itself (one process may not open it twice).
                with Store(Path(tmp) / "store") as store:
                    ref = bare_blake3(store, chunks)
                elapsed, cpu = _command(Path(tmp) / "store", n)
                command[n].append((ref / elapsed, cpu / gib))
                print(f"round: the command, {n} job(s): {ref / elapsed:.2f}x")
    print(f"verify --full / bare blake3: {statistics.median(verify_ratios):.2f}x "
          f"(median of {args.rounds}; one process, the store open already)")
    for n, runs in command.items():
        how = f"{n} worker processes" if n > 1 else "in one process (--jobs 1)"
        print(f"the command (pages walked first), {how} / bare blake3 on one core: "
              f"{statistics.median(r[0] for r in runs):.2f}x, CPU "
              f"{statistics.median(r[1] for r in runs):.2f} s per GiB (median of "
              f"{args.rounds}{'; target >= 0.8' if n == jobs else ''})")
    per_gib = statistics.median(read_costs)
    print(f"read path, cost of the check: {1000 * per_gib:.1f} ms per GiB read (median): "
          f"against a whole NBD read of a version (bench_store.py's read line, about 1 s per "
          f"GiB here) that is {100 * per_gib:.1f}% (target <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
