"""The sender: full sync, incremental cycles and freeze windows, against references run here.

    .venv/bin/python bench/bench_sender.py [--size 4G] [--fill 0.25] [--dir /var/tmp]

1. Full sync: a loop device of --size, --fill of it random data (the rest zeros), copied to a
   fresh volume by ``nbdcopy --flush`` (reference) and by ``nbdsink replicate --once``, each
   into a volume of its own store (same server code, same disk; separate stores so that
   deduplication does not favour the second copy). Ratio: sender time / nbdcopy time.
2. Incremental cycles with 0 %, 0.1 %, 1 % and 10 % of the chunks rewritten: the cycle time
   (as the sender logs it, and as the whole process takes) as a fraction of the full sync time
   (target: at most 3 % at 1 %).
3. Freeze windows: ext4 on a second loop device under a steady fio write load, the sender
   running continuously with --freeze; the distribution of the freeze windows it logs, next to
   bare ``fsfreeze -f; fsfreeze -u`` pairs under the same load (the reference: what any freeze
   costs there). Target: p99 at most 100 ms.
Needs root (loop devices, eBPF tracker, mounts).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdsink.testing import ServerProcess
from nbdsink.units import format_size, parse_size

CHUNK = 64 << 10
NBDSINK = [sys.executable, "-m", "nbdsink.cli.main"]


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, out.stderr


def fill(dev: str, size: int, fraction: float, seed: int) -> None:
    """Random data in ``fraction`` of the device, in 1 MiB pieces spread over it."""
    rnd = random.Random(seed)
    pieces = int(size * fraction) // (1 << 20)
    slots = rnd.sample(range(size // (1 << 20)), pieces)
    fd = os.open(dev, os.O_WRONLY)
    try:
        for slot in slots:
            os.pwrite(fd, rnd.randbytes(1 << 20), slot << 20)
        os.fsync(fd)
    finally:
        os.close(fd)


def dirty(dev: str, size: int, fraction: float, seed: int) -> int:
    """Rewrite ``fraction`` of the chunks (random ones) with new random data."""
    rnd = random.Random(seed)
    n = int(size // CHUNK * fraction)
    fd = os.open(dev, os.O_WRONLY)
    try:
        for c in rnd.sample(range(size // CHUNK), n):
            os.pwrite(fd, rnd.randbytes(CHUNK), c * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)
    return n * CHUNK


def logged_duration(stderr: str) -> float:
    m = re.findall(r"cycle version=\S+ .*?duration=([\d.]+)s", stderr)
    return float(m[-1]) if m else float("nan")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def stop_tracker(dev: str) -> None:
    subprocess.run([*NBDSINK, "track", "stop", dev], capture_output=True)


def bench_sync(work: Path, size: int, fraction: float) -> None:
    img = work / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size)
    dev = sh("losetup", "-f", "--show", str(img))
    try:
        # Two stores: the store deduplicates, so a second copy of the same data into one
        # store would be unfairly cheap for whichever ran second.
        with ServerProcess(work / "store-ref", work / "ref.sock") as ref_srv, \
                ServerProcess(work / "store", work / "nbd.sock") as srv:
            ref_srv.create_volume("ref", size)
            srv.create_volume("vol", size)
            fill(dev, size, fraction, seed=1)
            print(f"device {format_size(size)}, {fraction:.0%} random data, chunks of "
                  f"{format_size(CHUNK)}")
            ref, _ = timed(["nbdcopy", "--flush", dev, ref_srv.uri("ref")])
            state = work / "state"
            cmd = [*NBDSINK, "replicate", dev, srv.uri("vol"), "--state", str(state), "--once"]
            full, err = timed(cmd)
            print(f"full sync      nbdcopy {ref:7.2f}s   replicate {full:7.2f}s "
                  f"(cycle {logged_duration(err):.2f}s)   ratio replicate/nbdcopy "
                  f"{full / ref:.2f}")
            for i, frac in enumerate([0.0, 0.001, 0.01, 0.1]):
                nbytes = dirty(dev, size, frac, seed=10 + i)
                wall, err = timed(cmd)
                cyc = logged_duration(err)
                print(f"cycle {frac:6.1%} dirty ({format_size(nbytes):>10}): cycle {cyc:6.3f}s "
                      f"= {cyc / full:6.2%} of full sync; process {wall:6.2f}s "
                      f"= {wall / full:6.2%}")
    finally:
        stop_tracker(dev)
        subprocess.run(["losetup", "-d", dev])


def bench_freeze(work: Path, cycles: int) -> None:
    img = work / "fs.img"
    with open(img, "wb") as f:
        f.truncate(1 << 30)
    dev = sh("losetup", "-f", "--show", str(img))
    mnt = work / "mnt"
    mnt.mkdir()
    fio: subprocess.Popen[bytes] | None = None
    sender: subprocess.Popen[bytes] | None = None
    try:
        sh("mkfs.ext4", "-q", "-F", dev)
        sh("mount", dev, str(mnt))
        with ServerProcess(work / "store2", work / "nbd2.sock") as srv:
            srv.create_volume("fs", 1 << 30)
            fio = subprocess.Popen(
                ["fio", "--name=steady", f"--directory={mnt}", "--rw=randwrite", "--bs=16k",
                 "--size=256m", "--rate=20m", "--time_based", "--runtime=3600",
                 "--ioengine=psync", "--fsync=32"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            time.sleep(3)
            # Reference: a bare freeze/thaw pair under the same load.
            bare = []
            for _ in range(cycles):
                t = time.perf_counter()
                sh("fsfreeze", "-f", str(mnt))
                sh("fsfreeze", "-u", str(mnt))
                bare.append(time.perf_counter() - t)
                time.sleep(1)
            log = work / "sender.log"
            with open(log, "wb") as out:
                sender = subprocess.Popen(
                    [*NBDSINK, "replicate", dev, srv.uri("fs"), "--state", str(work / "st2"),
                     "--interval", "1s", "--freeze", str(mnt), "--max-freeze", "500ms"],
                    stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + cycles * 3 + 120
            while log.read_text().count("freeze=") < cycles + 1 and time.monotonic() < deadline:
                time.sleep(0.5)
            sender.send_signal(signal.SIGTERM)
            sender.wait(30)
            sender = None
            windows = [float(x) / 1000 for x in re.findall(r"freeze=([\d.]+)ms", log.read_text())]
            windows = windows[1:]  # the first follows the full sync
            for name, vals in (("bare fsfreeze", bare), ("replicate", windows)):
                print(f"freeze windows {name:14} n={len(vals):3}  p50 {pct(vals, 50) * 1000:6.1f}ms"
                      f"  p90 {pct(vals, 90) * 1000:6.1f}ms  p99 {pct(vals, 99) * 1000:6.1f}ms"
                      f"  max {max(vals, default=float('nan')) * 1000:6.1f}ms"
                  f"  mean {statistics.fmean(vals or [float('nan')]) * 1000:6.1f}ms")
            print(f"freeze p99 ratio replicate/bare {pct(windows, 99) / pct(bare, 99):.2f}  "
                  f"(target p99 <= 100ms: {'met' if pct(windows, 99) <= 0.1 else 'NOT met'})")
    finally:
        if sender is not None:
            sender.kill()
        if fio is not None:
            os.killpg(fio.pid, signal.SIGTERM)
            fio.wait()
        subprocess.run(["fsfreeze", "-u", str(mnt)], capture_output=True)
        subprocess.run(["umount", str(mnt)])
        stop_tracker(dev)
        subprocess.run(["losetup", "-d", dev])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=4 << 30)
    parser.add_argument("--fill", type=float, default=1.0,
                        help="fraction of the device holding random data (default: all)")
    parser.add_argument("--dir", default="/var/tmp", help="where images and stores go")
    parser.add_argument("--freeze-cycles", type=int, default=30,
                        help="freeze windows to measure (0: skip the freeze part)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbdsink-bench-sender-", dir=args.dir))
    try:
        bench_sync(work, args.size, args.fill)
        if args.freeze_cycles > 0:
            bench_freeze(work, args.freeze_cycles)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
