"""Cost of eBPF change tracking on write IOPS: fio random 4K writes, tracked vs untracked.

Makes a loop device over a file in /tmp (a real disk, not tmpfs), then alternates fio runs
(randwrite, 4 KiB, iodepth 32, libaio, O_DIRECT) without and with the bpf tracker on that
device, ``--pairs`` times, so drift in the machine's speed hits both sides alike. Prints the
median IOPS of each side and their ratio (tracked / untracked; 1.0 = free, target >= 0.97),
then the program's own run time per request as the kernel measures it (bpf_stats), which
does not depend on how busy the machine is, and the cost of one checkpoint.

    .venv/bin/python bench/bench_tracker.py [--size-mib 1024] [--seconds 4] [--pairs 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nbdsink.tracker import bpf, libbpf

MiB = 1 << 20


def fio_iops(device: str, seconds: int) -> float:
    run = subprocess.run(
        ["fio", "--name=randwrite", f"--filename={device}", "--rw=randwrite", "--bs=4k",
         "--iodepth=32", "--ioengine=libaio", "--direct=1", "--time_based",
         f"--runtime={seconds}", "--ramp_time=1", "--norandommap", "--randrepeat=0",
         "--output-format=json"],
        check=True, capture_output=True, text=True,
    )
    return float(json.loads(run.stdout)["jobs"][0]["write"]["iops"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--chunk-size", type=int, default=64 << 10)
    ap.add_argument("--backing-dir", default="/tmp",
                    help="where the loop device's file lives (/dev/shm takes the disk out of "
                         "the measurement)")
    args = ap.parse_args()

    stats_sysctl = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_before = stats_sysctl.read_text().strip()
    with tempfile.TemporaryDirectory(dir=args.backing_dir) as tmp:
        img = Path(tmp) / "bench.img"
        with open(img, "wb") as f:
            f.truncate(args.size_mib * MiB)
        loop = subprocess.run(["losetup", "-f", "--show", str(img)], check=True,
                              capture_output=True, text=True).stdout.strip()
        tracker = None
        try:
            # Allocate the file once so that neither side pays for first writes.
            subprocess.run(["dd", "if=/dev/zero", f"of={loop}", "bs=4M", "oflag=direct",
                            "status=none"], check=False, stderr=subprocess.DEVNULL)
            plain: list[float] = []
            tracked: list[float] = []
            for i in range(args.pairs):
                # Alternate which side runs first, so a trend in the machine's speed cancels.
                for side in ("plain", "tracked") if i % 2 == 0 else ("tracked", "plain"):
                    if side == "plain":
                        if tracker is not None:
                            tracker.stop()
                            tracker = None
                        plain.append(fio_iops(loop, args.seconds))
                    else:
                        if tracker is None:
                            tracker = bpf.start_bpf(loop, args.chunk_size)
                        tracked.append(fio_iops(loop, args.seconds))
                print(f"pair {i + 1}: untracked {plain[-1]:.0f} IOPS, tracked {tracked[-1]:.0f} IOPS, "
                      f"ratio {tracked[-1] / plain[-1]:.3f}", flush=True)
            if tracker is None:
                tracker = bpf.start_bpf(loop, args.chunk_size)
                fio_iops(loop, 1)
            assert tracker is not None
            # The program's own cost per completed request, measured by the kernel: a figure
            # that, unlike IOPS, does not move with the load of the machine.
            stats_sysctl.write_text("1")
            try:
                fio_iops(loop, args.seconds)
                run_ns = runs_ = 0
                for copy in "ab":
                    pin = bpf.PIN_ROOT / Path(loop).name / f"prog_on_rq_complete_{copy}"
                    with libbpf.opened(str(pin)) as fd:
                        ns, n = libbpf.run_stats(fd)
                    run_ns += ns
                    runs_ = max(runs_, n)  # both copies run once per request
            finally:
                stats_sysctl.write_text(stats_before)
            t0 = time.perf_counter()
            dirty = tracker.checkpoint()
            elapsed = time.perf_counter() - t0
        finally:
            if tracker is not None:
                tracker.stop()
            subprocess.run(["losetup", "-d", loop], check=False)
    p, t = statistics.median(plain), statistics.median(tracked)
    pair_ratio = statistics.median(b / a for a, b in zip(plain, tracked, strict=True))
    print(f"untracked median: {p:.0f} IOPS")
    print(f"tracked median:   {t:.0f} IOPS")
    print(f"ratio tracked/untracked: {t / p:.3f} (median of pair ratios {pair_ratio:.3f}; "
          "target >= 0.97)")
    per_run = run_ns / max(runs_, 1)
    print(f"program cost (both copies): {per_run:.0f} ns per completed request over {runs_} requests = "
          f"{per_run * p / 1e9 * 100:.2f}% of one CPU at the untracked IOPS")
    print(f"checkpoint after the last run: {elapsed * 1000:.1f} ms, "
          f"{dirty.dirty_bytes // MiB} MiB dirty in {len(dirty.extents)} extents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
