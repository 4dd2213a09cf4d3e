"""Ingest and read throughput of the nbdsink server against nbdkit's file plugin.

    .venv/bin/python bench/bench_store.py [--size 1G] [--dir /var/tmp] [--rounds 3]

Same data, same disk, same client (nbdcopy --flush), same run:
  new data   1 GiB of random data into a fresh volume  vs  into a fresh file
  duplicate  the same 1 GiB into a second volume       vs  into a second file
  read       a full read of the version                vs  a full read of the file
  read, cold the same, after the kernel dropped its page cache (as root only: the store
             of a replica is mostly not in memory when an old version is read)
A fourth line, "commits", times only the store's durable LMDB commits of the same new data,
in this process: 64 MiB batches, hashed and encoded before the clock runs, each saved with
Store.stage_blocks and committed as the server does (no NBD, no nbdkit, no hashing). It is
what the store's commits cost by themselves, a floor for the new-data line.
Each round measures both sides on fresh targets; the disk's speed drifts between rounds (and
a reference file's flush can take twice as long in one round as in the next), so every round's
ratio is printed and the median ratio is the figure to quote. Ratios are reference_time /
nbdsink_time: above 1 means nbdsink is faster.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdsink.store import Store
from nbdsink.store.chunks import digest, encode_chunk
from nbdsink.store.head import DEFAULT_BATCH_BYTES
from nbdsink.testing import ServerProcess
from nbdsink.units import format_size, parse_size

KINDS = (("new", "new data"), ("dup", "duplicate"), ("read", "read"), ("cold", "read, cold"),
         ("commits", "commits"))
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    """Write dirty pages out, then drop the clean ones (what a read finds cold)."""
    subprocess.run(["sync"], check=True)
    DROP_CACHES.write_text("3\n")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def file_server(target: Path, sock: Path) -> subprocess.Popen[bytes]:
    sock.unlink(missing_ok=True)
    # nbdkit writes its pid file once it listens: waiting for it needs no probe connection
    # (which nbdkit would log as a broken handshake).
    pidfile = sock.with_suffix(".pid")
    pidfile.unlink(missing_ok=True)
    proc = subprocess.Popen(["nbdkit", "--foreground", "--pidfile", str(pidfile),
                             "--unix", str(sock), "file", str(target)])
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None:
            raise RuntimeError(f"nbdkit file exited with {proc.returncode}")
        time.sleep(0.02)
    return proc


def reference_round(work: Path, src: Path, size: int) -> dict[str, float]:
    times = {}
    for name in ("new", "dup"):
        target = work / f"ref-{name}.img"
        target.write_bytes(b"")
        os.truncate(target, size)
        sock = work / f"ref-{name}.sock"
        proc = file_server(target, sock)
        try:
            times[name] = timed(["nbdcopy", "--flush", str(src), f"nbd+unix:///?socket={sock}"])
            if name == "new":
                times["read"] = timed(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"])
                if can_drop_caches():
                    drop_caches()
                    times["cold"] = timed(["nbdcopy", f"nbd+unix:///?socket={sock}", "null:"])
        finally:
            proc.terminate()
            proc.wait()
    for name in ("new", "dup"):
        (work / f"ref-{name}.img").unlink()
    return times


def nbdsink_round(work: Path, src: Path, size: int) -> dict[str, float]:
    times = {}
    srv = ServerProcess(work / "store", work / "nbdsink.sock")
    srv.create_volume("new", size)
    srv.create_volume("dup", size)
    with srv:
        times["new"] = timed(["nbdcopy", "--flush", str(src), srv.uri("new")])
        times["dup"] = timed(["nbdcopy", "--flush", str(src), srv.uri("dup")])
        times["read"] = timed(["nbdcopy", srv.uri("new@1"), "null:"])
        if can_drop_caches():
            # The server has read every page through its maps; pages a process maps are
            # not dropped. A server started afresh has mapped none.
            srv.stop()
            drop_caches()
            srv.start()
            times["cold"] = timed(["nbdcopy", srv.uri("new@1"), "null:"])
    shutil.rmtree(work / "store")
    (work / "nbdsink.sock").unlink(missing_ok=True)
    times["commits"] = commits_only(work / "commits-only", src, size)
    return times


def commits_only(path: Path, src: Path, size: int) -> float:
    """Seconds spent in the store's durable commits of ``src`` as new data."""
    elapsed = 0.0
    with Store(path, create=True) as store:
        volume = store.create_volume("vol", size)
        bs = volume.block_size
        counters = store.write(lambda txn: store.pending_counters(txn, volume))
        with open(src, "rb") as f:
            block = 0
            while data := f.read(DEFAULT_BATCH_BYTES):
                chunks = {digest(data[o : o + bs]): encode_chunk(data[o : o + bs])
                          for o in range(0, len(data), bs)}
                staged = [(block + i, d) for i, d in enumerate(chunks)]
                block += len(staged)
                start = time.perf_counter()
                located = store.save_chunks(chunks)
                store.write(functools.partial(store.stage_blocks, volume=volume,
                                              counters=counters, blocks=staged,
                                              located=located))
                elapsed += time.perf_counter() - start
        start = time.perf_counter()
        store.sync()
        elapsed += time.perf_counter() - start
    shutil.rmtree(path)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--dir", default="/var/tmp", help="where the data goes (a real disk)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nbdsink-bench-", dir=args.dir))
    try:
        src = work / "src.img"
        with open(src, "wb") as f:
            left = args.size
            while left:
                n = min(left, 16 << 20)
                f.write(os.urandom(n))
                left -= n
        kinds = [(name, label) for name, label in KINDS if name != "cold" or can_drop_caches()]
        ratios: dict[str, list[float]] = {name: [] for name, _ in kinds}
        print(f"data: {format_size(args.size)} random, nbdcopy --flush, disk {args.dir}")
        print(f"{'round':6} {'':10} {'nbdkit file':>12} {'nbdsink':>12} {'ratio':>8}")
        for n in range(1, args.rounds + 1):
            ref = reference_round(work, src, args.size)
            ours = nbdsink_round(work, src, args.size)
            for name, label in kinds:
                reference = ref["new" if name == "commits" else name]
                ratio = reference / ours[name]
                ratios[name].append(ratio)
                print(f"{n:<6} {label:10} {reference:>11.2f}s {ours[name]:>11.2f}s "
                      f"{ratio:>7.2f}x", flush=True)
        print(f"median of {args.rounds} rounds (min-max):")
        for name, label in kinds:
            values = ratios[name]
            print(f"       {label:10} {statistics.median(values):>7.2f}x "
                  f"({min(values):.2f}-{max(values):.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
