"""Restore writes what differs: a version that differs from DEST in 1% of its chunks, restored
by ``nbdsink restore`` against a full ``nbdcopy`` of the same version, in one run.

    .venv/bin/python bench/bench_restore.py [--size 1G] [--dir /var/tmp] [--differ 0.01]
                                            [--rounds 3]

Lines (time of ours / time of ``nbdcopy --flush`` of the whole version; target <= 0.03 for the
first; both end with DEST durable; the median of --rounds runs, each after a sync):
  restore --assume   the store knows which blocks differ (the failback case): DEST is not read
  restore (compare)  over NBD: DEST hashed, only digests and the differing blocks cross
and the command's fixed start-up time (Python and its imports), which dominates below a few
GiB: the ratio that matters for a real disk is the one at its size (--size 16G, say).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbdsink.testing import ServerProcess, run_cli
from nbdsink.units import format_size, parse_size

BS = 64 << 10
# The command as users run it: the console script installed beside this Python (python -m
# would add runpy's imports to every start).
_SCRIPT = Path(sys.executable).parent / "nbdsink"
NBDSINK = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "nbdsink.cli.main"]
# Python may cache compiled modules, as an installed nbdsink's are (the first round writes
# them; each line is the median of its rounds).
_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(*cmd: str) -> float:
    # Each side starts with nothing dirty in the page cache: the bench's own gigabytes of
    # set-up writes, still being written back, would otherwise slow whichever ran first.
    os.sync()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=_ENV)
    return time.perf_counter() - start


def same(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (in pieces: they may be larger than memory)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--differ", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each (median)")
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="nbdsink-bench-restore-", dir=args.dir) as tmp:
        work = Path(tmp)
        image = work / "v2.img"
        with open(image, "wb") as f:
            for _ in range(args.size // (4 << 20)):
                f.write(os.urandom(4 << 20))
        srv = ServerProcess(work / "store", work / "nbd.sock")
        srv.create_volume("vol", args.size, BS)
        with srv:
            # Version 1: what DEST holds; version 2: the image (differs in --differ of chunks).
            v1 = work / "v1.img"
            subprocess.run(["cp", str(image), str(v1)], check=True)
            chunks = args.size // BS
            changed = rng.sample(range(chunks), max(1, int(chunks * args.differ)))
            with open(v1, "r+b") as f:
                for c in changed:
                    f.seek(c * BS)
                    f.write(os.urandom(BS))
            subprocess.run(["nbdcopy", "--flush", str(v1), srv.uri("vol")], check=True)
            subprocess.run(["nbdcopy", "--flush", str(image), srv.uri("vol")], check=True)
            # Durable, as the restore is (it fsyncs DEST before it reports success).
            full = statistics.median(
                # Onto the image the version was made from (no third copy on disk): every
                # byte written, the same bytes.
                timed("nbdcopy", "--flush", srv.uri("vol@2"), str(image))
                for _ in range(args.rounds))
            compare = timed(*NBDSINK, "restore", srv.uri("vol@2"),
                            str(v1))
            assert same(v1, image)
        # --assume reads the store directly (on the backup host): the server is stopped.
        with open(v1, "r+b") as f:
            for c in changed:
                f.seek(c * BS)
                f.write(os.urandom(BS))
        run_cli("pin", "vol@1", "--store", str(srv.store))
        # Run again, it writes the same blocks (what differs between the two versions).
        assume = statistics.median(
            timed(*NBDSINK, "restore", "vol@2", str(v1),
                  "--assume", "vol@1", "--store", str(srv.store))
            for _ in range(args.rounds))
        assert same(v1, image)
        # What every run of the command costs whatever the size: starting Python, imports.
        start_up = statistics.median(
            timed(*NBDSINK, "restore", "--help")
            for _ in range(args.rounds))
    print(f"{format_size(args.size)} version, {len(changed)} of {chunks} chunks differ")
    print(f"restore --assume   {assume:.2f}s vs nbdcopy {full:.2f}s = {assume / full:.3f}  "
          f"(target <= 0.03)")
    print(f"restore (compare)  {compare:.2f}s vs nbdcopy {full:.2f}s = {compare / full:.3f}")
    print(f"of which the command's start-up (nbdsink restore --help): {start_up:.2f}s; "
          f"--assume without it: {(assume - start_up) / full:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
