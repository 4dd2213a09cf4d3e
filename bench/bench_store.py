"""Ingest and read throughput of the nbdsink server against nbdkit's file plugin.

    .venv/bin/python bench/bench_store.py [--size 1G] [--dir /var/tmp]

Same data, same disk, same client (nbdcopy --flush), same run:
  new data   1 GiB of random data into a fresh volume  vs  into a fresh file
  duplicate  the same 1 GiB into a second volume       vs  into a second file
  read       a full read of the version                vs  a full read of the file
Prints each time and the ratio reference_time / nbdsink_time (>1 means nbdsink is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdsink.testing import ServerProcess, _accepts
from nbdsink.units import format_size, parse_size


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def file_server(target: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["nbdkit", "--foreground", "--unix", str(sock), "file",
                             str(target)])
    while not _accepts(sock):
        time.sleep(0.02)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--dir", default="/var/tmp", help="where the data goes (a real disk)")
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
        results = {}
        # reference: nbdkit file
        for name in ("new", "dup"):
            target = work / f"ref-{name}.img"
            target.write_bytes(b"")
            os.truncate(target, args.size)
            sock = work / f"ref-{name}.sock"
            proc = file_server(target, sock)
            try:
                results[("ref", name)] = timed(["nbdcopy", "--flush", str(src),
                                                f"nbd+unix:///?socket={sock}"])
                if name == "new":
                    results[("ref", "read")] = timed(["nbdcopy", f"nbd+unix:///?socket={sock}",
                                                      "null:"])
            finally:
                proc.terminate()
                proc.wait()
        # nbdsink
        srv = ServerProcess(work / "store", work / "nbdsink.sock")
        srv.create_volume("new", args.size)
        srv.create_volume("dup", args.size)
        with srv:
            results[("ours", "new")] = timed(["nbdcopy", "--flush", str(src), srv.uri("new")])
            results[("ours", "dup")] = timed(["nbdcopy", "--flush", str(src), srv.uri("dup")])
            results[("ours", "read")] = timed(["nbdcopy", srv.uri("new@1"), "null:"])
        print(f"data: {format_size(args.size)} random, nbdcopy --flush, disk {args.dir}")
        print(f"{'':10} {'nbdkit file':>12} {'nbdsink':>12} {'ratio':>8}")
        for name, label in (("new", "new data"), ("dup", "duplicate"), ("read", "read")):
            ref, ours = results[("ref", name)], results[("ours", name)]
            print(f"{label:10} {ref:>11.2f}s {ours:>11.2f}s {ref / ours:>7.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
