"""Ground truth for frozen versions: the device hashed while it was frozen, compared chunk by
chunk with the version committed from that freeze.

Run as a frozen hook (``replicate --frozen-hook``), this file hashes the device::

    python3 ground_truth.py DEVICE CHUNK_SIZE OUTDIR     # writes OUTDIR/<NBDSINK_FROZEN_AT>

and :func:`run_ground_truth` is the whole experiment: a filesystem on a loop device under a
heavy fio load (random small writes with fsyncs, large sequential overwrites with fdatasyncs),
continuous replication with ``--freeze``, optionally the kernel made to skip the tracker's
completion programs now and then, and at the end every frozen version checked against the
device as it was at its freeze. ``tests/sender/test_e2e_ground_truth.py`` runs it for a
minute; ``bench/soak_ground_truth.py`` for as long as you like.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import blake3

READ = 4 << 20


def device_digests(device: str, chunk_size: int) -> bytes:
    """blake3 of every chunk of ``device``, read with O_DIRECT (never the page cache)."""
    out = bytearray()
    buf = mmap.mmap(-1, READ)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        pos = 0
        while True:
            n = os.preadv(fd, [buf], pos)
            if n <= 0:
                break
            view = memoryview(buf)[:n]
            for i in range(0, n, chunk_size):
                out += blake3.blake3(view[i : i + chunk_size]).digest()
            view.release()
            pos += n
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def file_digests(path: Path, chunk_size: int) -> bytes:
    out = bytearray()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            out += blake3.blake3(chunk).digest()
    return bytes(out)


@dataclass
class Outcome:
    versions: int = 0
    checked: int = 0
    chunks_compared: int = 0
    mismatched: list[tuple[int, int]] = field(default_factory=list)  # (version, chunk)
    skips_injected: int = 0
    unseen_events: int = 0
    unseen_sectors: int = 0


def _fio(mnt: Path, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["fio", f"--directory={mnt}", "--time_based", f"--runtime={int(seconds)}",
         "--ioengine=psync", "--minimal",
         "--name=rand", "--size=48M", "--rw=randwrite", "--bsrange=4k-64k", "--fsync=8",
         "--numjobs=2",
         "--name=seq", "--size=40M", "--rw=write", "--bs=1M", "--fdatasync=4"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def run_ground_truth(tmp: Path, seconds: float, *, inject: bool, size: int = 256 << 20,
                     chunk_size: int = 64 << 10, interval: str = "1s") -> Outcome:
    """The experiment (root): returns what was compared and every mismatched chunk."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tracker.bpf_faults import SkipInjector

    from nbdsink.tracker import bpf
    from sender.helpers import loop_device, make_image, mkfs, mounted
    from sender.rig import Sender, Server, nbdsink, stop_tracker

    outcome = Outcome()
    truth = tmp / "truth"
    truth.mkdir()
    img = make_image(tmp / "img", size)
    srv = Server(tmp / "store", tmp / "nbd.sock")
    nbdsink("volume", "create", "vol", "--size", str(size), "--store", str(srv.store))
    srv.start()
    try:
        with loop_device(img) as dev:
            mkfs(dev, "ext4")
            try:
                with mounted(dev, tmp / "mnt") as mnt:
                    hook = f"{sys.executable} {Path(__file__).resolve()} {dev} {chunk_size} {truth}"
                    sender = Sender(tmp / "sender.log", dev, srv.uri("vol"), "--state",
                                    str(tmp / "state"), "--interval", interval, "--freeze",
                                    str(mnt), "--max-freeze", "5s", "--frozen-hook", hook)
                    fio = _fio(mnt, seconds)
                    try:
                        sender.wait_for("cycle version=", 120)
                        name = Path(os.path.realpath(dev)).name
                        injector = SkipInjector(name) if inject else None
                        if injector is not None:
                            injector.__enter__()
                        try:
                            fio.wait(seconds + 120)
                        finally:
                            if injector is not None:
                                injector.__exit__(None, None, None)
                                outcome.skips_injected = injector.skips
                        # Two more cycles after the load stopped.
                        done = sender.text().count("cycle version=")
                        sender.wait_for("cycle version=", 60, count=done + 2)
                        state = json.loads((bpf.STATE_DIR / f"{name}.json").read_text())
                        outcome.unseen_events = int(state.get("unseen_events", 0))
                        outcome.unseen_sectors = int(state.get("unseen_sectors", 0))
                    finally:
                        if fio.poll() is None:
                            fio.kill()
                            fio.wait()
                        code = sender.terminate()
                    if code != 0:
                        raise AssertionError(f"sender exited with {code}:\n{sender.text()[-3000:]}")
                    if fio.returncode != 0:
                        raise AssertionError(f"fio failed: {fio.stderr.read() if fio.stderr else ''}")
            finally:
                stop_tracker(dev)
        _compare(srv, truth, chunk_size, tmp, outcome)
    finally:
        srv.stop()
    return outcome


def _compare(srv: object, truth: Path, chunk_size: int, tmp: Path, outcome: Outcome) -> None:
    from sender.helpers import run

    versions = srv.versions("vol")  # type: ignore[attr-defined]
    outcome.versions = len(versions)
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp
    for v in versions:
        frozen_at = v["labels"].get("frozen_at")
        if v["consistency"] != "frozen" or frozen_at is None:
            continue
        expected_file = truth / frozen_at
        if not expected_file.exists():
            continue  # a freeze abandoned for over-running never made a version
        copy = scratch / f"nbdsink-gt-{os.getpid()}.img"
        try:
            run("nbdcopy", srv.uri(f"vol@{v['version']}"), str(copy))  # type: ignore[attr-defined]
            got = file_digests(copy, chunk_size)
        finally:
            copy.unlink(missing_ok=True)
        expected = expected_file.read_bytes()
        outcome.checked += 1
        outcome.chunks_compared += len(expected) // 32
        for c in range(len(expected) // 32):
            if got[c * 32 : (c + 1) * 32] != expected[c * 32 : (c + 1) * 32]:
                outcome.mismatched.append((int(v["version"]), c))


def _hook_main() -> int:
    device, chunk_size, outdir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    frozen_at = os.environ["NBDSINK_FROZEN_AT"]
    t0 = time.monotonic()
    digests = device_digests(device, chunk_size)
    tmp = outdir / f".{frozen_at}.tmp"
    tmp.write_bytes(digests)
    tmp.rename(outdir / frozen_at)
    print(f"ground truth of {device} at {frozen_at}: {len(digests) // 32} chunks in "
          f"{time.monotonic() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(_hook_main())
