"""Churn: does the store stay small and fast when versions come and go for ever?

    .venv/bin/python bench/bench_churn.py [--size 1G] [--cycles 200] [--churn 0.02]
                                          [--keep-last 10] [--dir /var/tmp] [--reader]
                                          [--runs N]

A volume of --size is filled once; then each cycle rewrites --churn of its blocks (chosen at
random) with new random data and FLUSHes, through libnbd on one connection. The volume's
policy is keep-last --keep-last; the server prunes, sweeps and compacts by itself in the
background (as it does in production). With --reader, a client stays connected to version 1
for the whole run (so version 1 and its data must be kept), as an attached DR copy would.

Prints, at cycles 50, 100 and 200 (or the given fraction of --cycles):
  on-disk / referenced   du of the store over the bytes the kept versions reference (target <= 1.3)
and at the end:
  last 10 / first 10     time of the last 10 cycles over the first 10 (target <= 1.1)
  the disk itself        the same ratio for a cycle's worth of data written to a plain file
                         and fdatasync'ed 10 times, just before the first cycle and just
                         after the last: how much the disk's own speed drifted meanwhile
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.append("/usr/lib/python3/dist-packages")  # Debian's libnbd bindings

import nbd

from nbdsink.testing import ServerProcess, run_cli
from nbdsink.units import format_size, parse_size

BS = 64 << 10


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


def referenced(store: Path) -> int:
    report = json.loads(run_cli("df", "--json", "--store", str(store)).stdout)
    return int(report["total"]["referenced_bytes"])


def reference_write(work: Path, blocks: list[bytes]) -> float:
    """Seconds to write ``blocks`` to a new plain file on the store's disk and fdatasync it:
    what the disk alone takes for a cycle's data at that moment (this VM's disk speed drifts
    over minutes)."""
    path = work / "reference.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for data in blocks:
            os.write(fd, data)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--churn", type=float, default=0.02)
    parser.add_argument("--keep-last", type=int, default=10)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--reader", action="store_true",
                        help="keep a client attached to version 1 throughout")
    parser.add_argument("--runs", type=int, default=1,
                        help="whole runs, each on a new store; the median of their ratios "
                             "is printed last (on this VM one run's time ratio varies by "
                             "a quarter from run to run)")
    args = parser.parse_args()
    ratios, over_disk = [], []
    for run in range(args.runs):
        if args.runs > 1:
            print(f"run {run + 1} of {args.runs}")
        ratio, disk = one_run(args, random.Random(1 + run))
        ratios.append(ratio)
        over_disk.append(ratio / disk)
    if args.runs > 1:
        print(f"median of {args.runs} runs: last 10 / first 10 {statistics.median(ratios):.2f} "
              f"(each: {', '.join(f'{r:.2f}' for r in ratios)}; target <= 1.1); over the "
              f"disk's own drift {statistics.median(over_disk):.2f}")
    return 0


def one_run(args: argparse.Namespace, rng: random.Random) -> tuple[float, float]:
    """One run on a new store: prints its figures; returns its last 10 / first 10 ratio and
    the disk's own ratio over the same stretch."""
    blocks = args.size // BS
    per_cycle = max(1, int(blocks * args.churn))
    checkpoints = sorted({max(1, args.cycles * k // 4) for k in (1, 2, 4)})
    with tempfile.TemporaryDirectory(prefix="nbdsink-churn-", dir=args.dir) as tmp:
        work = Path(tmp)
        srv = ServerProcess(work / "store", work / "nbd.sock")
        srv.create_volume("vol", args.size, BS)
        run_cli("volume", "set", "vol", "--keep-last", str(args.keep_last),
                "--store", str(srv.store))
        with srv:
            img = work / "fill.img"
            with open(img, "wb") as f:
                for _ in range(args.size // (4 << 20)):
                    f.write(os.urandom(4 << 20))
            subprocess.run(["nbdcopy", "--flush", str(img), srv.uri("vol")], check=True)
            img.unlink()
            reader = None
            if args.reader:
                reader = nbd.NBD()
                reader.connect_uri(srv.uri("vol@1"))
            h = nbd.NBD()
            h.connect_uri(srv.uri("vol"))
            times: list[float] = []
            probe = [os.urandom(BS) for _ in range(per_cycle)]
            # The disk alone, just before the first cycle and just after the last: not
            # between cycles, where it would give the background upkeep time of its own.
            ref_first = sum(reference_write(work, probe) for _ in range(10))
            print(f"{format_size(args.size)} volume, {per_cycle} blocks "
                  f"({format_size(per_cycle * BS)}) rewritten per cycle, keep-last "
                  f"{args.keep_last}{', a reader on version 1' if reader else ''}")
            for cycle in range(1, args.cycles + 1):
                # The cycle's data are made before the clock starts: only the store's work
                # is timed (making 20 MiB of random data takes a quarter of a cycle here).
                writes = [(os.urandom(BS), b * BS) for b in rng.sample(range(blocks), per_cycle)]
                start = time.perf_counter()
                for data, offset in writes:
                    h.pwrite(data, offset)
                h.flush()
                times.append(time.perf_counter() - start)
                if reader is not None and cycle % 10 == 0:
                    reader.pread(BS, rng.randrange(blocks) * BS)  # still readable
                if cycle in checkpoints:
                    time.sleep(6)  # one background pass settles what this cycle left
                    on_disk, ref = du(srv.store), referenced(srv.store)
                    print(f"cycle {cycle:>4}: on-disk {format_size(on_disk)}, referenced "
                          f"{format_size(ref)}, on-disk / referenced {on_disk / ref:.2f}  "
                          f"(target <= 1.3)")
            time.sleep(6)  # the upkeep settles what the last cycles left: the disk alone
            ref_last = sum(reference_write(work, probe) for _ in range(10))
            h.shutdown()
            if reader is not None:
                reader.shutdown()
        first, last = sum(times[:10]), sum(times[-10:])
        print(f"last 10 / first 10 cycles: {last:.2f}s / {first:.2f}s = {last / first:.2f}  "
              f"(target <= 1.1)")
        print(f"the disk itself, a cycle's worth of writes to a plain file and fdatasync, 10 "
              f"times just before the first cycle and just after the last: "
              f"{ref_last:.2f}s / {ref_first:.2f}s = "
              f"{ref_last / ref_first:.2f}; the store's ratio over the disk's: "
              f"{(last / first) / (ref_last / ref_first):.2f}")
    return last / first, ref_last / ref_first


if __name__ == "__main__":
    sys.exit(main())
