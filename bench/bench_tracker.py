"""Cost of eBPF change tracking on write IOPS: fio random 4K writes, tracked vs untracked.

Makes a loop device over a file (``--backing-dir``, by default in /dev/shm), fills it once,
then runs the same fio job (randwrite, 4 KiB, iodepth 32, libaio, O_DIRECT, on that device)
alternately without and with the bpf tracker, ``--pairs`` times, after an untimed warm-up run
of each side. Pairs alternate
their order (untracked first, then tracked first), so a drift in the machine's speed hits
both sides alike. On a small, shared machine single runs vary by several percent, so the
figure to read is the median of the per-pair ratios (tracked / untracked; 1.0 = free, target
>= 0.97), with the spread of those ratios (quartiles, min, max); the ratio of the two sides'
median IOPS is printed too.

Why the file is in memory by default: the tracker's cost is per completed request, so the
faster the device, the larger its share; and the machine's disk is shared with whatever else
runs (its writeback made single runs vary by 20% here). ``--backing-dir /tmp`` measures on
the disk instead.

Then the program's own cost per completed request as the kernel measures it (bpf_stats), per
copy of the hook, which does not depend on how busy the machine is. The kernel's timing adds
its own overhead to each measured run; an empty program attached to the same tracepoint
during that run measures it, and the net figures are given too. Finally the cost of one
checkpoint.

    .venv/bin/python bench/bench_tracker.py [--pairs 12] [--seconds 3] [--backing-dir /tmp]
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
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")

# An empty program on the same hook: what the kernel's timing alone costs per measured run.
_NOP_SOURCE = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
char LICENSE[] SEC("license") = "GPL";
SEC("tp_btf/block_rq_complete")
int BPF_PROG(nop, struct request *rq, blk_status_t error, unsigned int nr_bytes) { return 0; }
"""


def fio_iops(device: str, seconds: float, cpus: str | None) -> float:
    args = ["fio", "--name=randwrite", f"--filename={device}", "--rw=randwrite", "--bs=4k",
            "--iodepth=32", "--ioengine=libaio", "--direct=1", "--time_based",
            f"--runtime={seconds}", "--ramp_time=1", "--norandommap", "--randrepeat=0",
            "--output-format=json"]
    if cpus is not None:
        args.append(f"--cpus_allowed={cpus}")
    run = subprocess.run(args, check=True, capture_output=True, text=True)
    return float(json.loads(run.stdout)["jobs"][0]["write"]["iops"])


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


class Bench:
    """The loop device and the tracker that is started and stopped on it."""

    def __init__(self, loop: str, chunk_size: int, seconds: float, cpus: str | None) -> None:
        self.loop = loop
        self.chunk_size = chunk_size
        self.seconds = seconds
        self.cpus = cpus
        self.tracker: bpf.BpfTracker | None = None

    def run(self, tracked: bool, seconds: float | None = None) -> float:
        if tracked and self.tracker is None:
            self.tracker = bpf.start_bpf(self.loop, self.chunk_size)
        if not tracked and self.tracker is not None:
            self.tracker.stop()
            self.tracker = None
        return fio_iops(self.loop, seconds or self.seconds, self.cpus)

    def stop(self) -> None:
        if self.tracker is not None:
            self.tracker.stop()
            self.tracker = None


def program_cost(b: Bench, tmp: Path) -> tuple[dict[str, float], float | None, int]:
    """ns per run of each copy of the hook and of an empty program, over one fio run."""
    b.run(True, 1)
    nop = _nop_object(tmp)
    pins = Path(f"/sys/fs/bpf/nbdsink-bench-nop-{Path(b.loop).name}")
    if nop is not None:
        pins.mkdir(exist_ok=True)
        obj = libbpf.BpfObject(str(nop))
        try:
            obj.load()
            obj.pin_program("nop", str(pins / "prog"))
            obj.attach_and_pin("nop", str(pins / "link"))
        finally:
            obj.close()
    before = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    try:
        fio_iops(b.loop, b.seconds, b.cpus)
        per: dict[str, float] = {}
        runs = 0
        for copy in "ab":
            pin = bpf.PIN_ROOT / Path(b.loop).name / f"prog_on_rq_complete_{copy}"
            with libbpf.opened(str(pin)) as fd:
                ns, n = libbpf.run_stats(fd)
            per[copy] = ns / max(n, 1)
            runs = max(runs, n)
        nop_ns = None
        if nop is not None:
            with libbpf.opened(str(pins / "prog")) as fd:
                ns, n = libbpf.run_stats(fd)
            nop_ns = ns / max(n, 1)
    finally:
        STATS_SYSCTL.write_text(before)
        if pins.exists():
            for p in ("link", "prog"):  # the link first: unpinning it detaches the program
                (pins / p).unlink(missing_ok=True)
            pins.rmdir()
    return per, nop_ns, runs


def _nop_object(tmp: Path) -> Path | None:
    src = tmp / "nop.bpf.c"
    src.write_text(_NOP_SOURCE)
    obj = tmp / "nop.bpf.o"
    run = subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I{bpf.REPO_BPF_DIR}",
                          "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"(no empty-program calibration: clang failed: {run.stderr.strip()[:200]})")
        return None
    return obj


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--chunk-size", type=int, default=64 << 10)
    ap.add_argument("--cpus-allowed", default=None,
                    help="fio's --cpus_allowed, e.g. 0 (keeps fio off the CPU the loop worker "
                         "happens to use; the same for both sides)")
    ap.add_argument("--backing-dir", default="/dev/shm" if Path("/dev/shm").is_dir() else "/tmp",
                    help="where the loop device's file lives (default /dev/shm: memory, the "
                         "fastest device and so the harshest case; /tmp puts a disk under it)")
    args = ap.parse_args()

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=args.backing_dir) as tmpdir:
        tmp = Path(tmpdir)
        img = tmp / "bench.img"
        with open(img, "wb") as f:
            f.truncate(args.size_mib * MiB)
        loop = subprocess.run(["losetup", "-f", "--show", str(img)], check=True,
                              capture_output=True, text=True).stdout.strip()
        b = Bench(loop, args.chunk_size, args.seconds, args.cpus_allowed)
        try:
            # Allocate the file once so that neither side pays for first writes.
            subprocess.run(["dd", "if=/dev/zero", f"of={loop}", "bs=4M", "oflag=direct",
                            "status=none"], check=False, stderr=subprocess.DEVNULL)
            # Warm-up, not counted: page cache of the backing file, fio itself, the loader.
            b.run(False, 2)
            b.run(True, 2)
            plain: list[float] = []
            tracked: list[float] = []
            for i in range(args.pairs):
                order = (False, True) if i % 2 == 0 else (True, False)
                for side in order:
                    (tracked if side else plain).append(b.run(side))
                print(f"pair {i + 1:2}: untracked {plain[-1]:7.0f} IOPS, tracked {tracked[-1]:7.0f} "
                      f"IOPS, ratio {tracked[-1] / plain[-1]:.3f}", flush=True)
            per, nop_ns, runs = program_cost(b, tmp)
            assert b.tracker is not None
            t0 = time.perf_counter()
            dirty = b.tracker.checkpoint()
            elapsed = time.perf_counter() - t0
        finally:
            b.stop()
            subprocess.run(["losetup", "-d", loop], check=False)
    ratios = sorted(t / p for p, t in zip(plain, tracked, strict=True))
    p_med, t_med = statistics.median(plain), statistics.median(tracked)
    q1, q3 = quartiles(ratios)
    print(f"untracked: median {p_med:.0f} IOPS (min {min(plain):.0f}, max {max(plain):.0f})")
    print(f"tracked:   median {t_med:.0f} IOPS (min {min(tracked):.0f}, max {max(tracked):.0f})")
    print(f"median of {len(ratios)} pair ratios tracked/untracked: {statistics.median(ratios):.3f} "
          f"(quartiles {q1:.3f}..{q3:.3f}, min {ratios[0]:.3f}, max {ratios[-1]:.3f}; target >= 0.97)")
    print(f"ratio of medians: {t_med / p_med:.3f}")
    total = per["a"] + per["b"]
    line = (f"program cost per completed request ({runs} requests): copy a {per['a']:.0f} ns, "
            f"copy b {per['b']:.0f} ns")
    if nop_ns is not None:
        net = [max(per[c] - nop_ns, 0.0) for c in "ab"]
        line += (f"; the kernel's timing alone (empty program) {nop_ns:.0f} ns per run, so net "
                 f"a {net[0]:.0f} ns + b {net[1]:.0f} ns = {sum(net):.0f} ns")
        total = sum(net)
    print(line)
    print(f"  = {total * p_med / 1e9 * 100:.2f}% of one CPU at the untracked IOPS")
    print(f"checkpoint after the last run: {elapsed * 1000:.1f} ms, "
          f"{dirty.dirty_bytes // MiB} MiB dirty in {len(dirty.extents)} extents")
    print(f"wall time {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
