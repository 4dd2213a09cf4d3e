"""What integrity costs: ``verify --full`` against bare blake3, and the checked read path
against an unchecked one, over the same bytes, in one run.

    .venv/bin/python bench/bench_verify.py [--size 1G] [--dir /var/tmp] [--rounds 3]

A store is filled with --size of random data (64 KiB blocks). Then, with the data in the
page cache (both sides read the same cached segment files):
  verify --full   store.check.verify(full=True)   vs  blake3 of every chunk's bytes, read
                                                      straight from the segment (target >= 0.8)
  the command     check.verify_store(full=True),  vs  the same: what `nbdsink verify --full`
                  LMDB's pages walked first           runs, the walk that keeps damaged pages
                                                      from crashing it included
  read path       every chunk read through Store.copy_chunk (checked against its xxh3)
                                                  vs  the same copies without the check:
                                                      the check's cost per GiB, to set
                                                      against a whole NBD read (target <= 10%)
Ratios are reference_time / nbdsink_time (above 1: nbdsink faster); the median of --rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3

from nbdsink.store import Store, check
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
        command_ratios = []
        for _ in range(args.rounds):
            # The command opens the store itself (one process may not open it twice).
            with Store(Path(tmp) / "store") as store:
                ref = bare_blake3(store, chunks)
            start = time.perf_counter()
            assert check.verify_store(Path(tmp) / "store", full=True).clean
            command_ratios.append(ref / (time.perf_counter() - start))
    print(f"verify --full / bare blake3: {statistics.median(verify_ratios):.2f}x "
          f"(median of {args.rounds}; target >= 0.8)")
    print(f"the command (pages walked first) / bare blake3: "
          f"{statistics.median(command_ratios):.2f}x (median of {args.rounds})")
    per_gib = statistics.median(read_costs)
    print(f"read path, cost of the check: {1000 * per_gib:.1f} ms per GiB read (median): "
          f"against a whole NBD read of a version (bench_store.py's read line, about 1 s per "
          f"GiB here) that is {100 * per_gib:.1f}% (target <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
