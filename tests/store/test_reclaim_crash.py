"""kill -9 at random moments of pruning, sweeping and compaction (what ``nbdsink prune``,
``nbdsink gc`` and the server's background upkeep run): every version that is still listed
reads back byte for byte, the newest is never lost, the store always opens, and a later gc
finishes what the killed one started."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from nbdsink.server.session import Heads, Session
from nbdsink.store import Store, reclaim
from nbdsink.store.head import Head

BS = 16384
BLOCKS = 2048
SIZE = BS * BLOCKS
KILLS = 24
WORKER = """
import sys
from nbdsink.store import Store, reclaim
from nbdsink.store.retention import Policy
store = Store(sys.argv[1])
print("ready", flush=True)
reclaim.prune(store, store.volume("vol"), Policy(keep_last=int(sys.argv[2])))
reclaim.sweep(store, grace=0)
reclaim.compact(store, min_dead=0.1, seal_active=True)
"""


def _read(store: Store, name: str) -> bytes:
    buf = bytearray(SIZE)
    Session(store, Heads(store), name, readonly=True).pread(memoryview(buf), 0)
    return bytes(buf)


def _check(store: Store, images: dict[int, bytes]) -> list[int]:
    volume = store.volume("vol")
    listed = [v.version for v in store.versions(volume)]
    assert listed, "every version is gone"
    assert max(listed) == max(images), "the newest version was lost"
    for v in listed:
        assert _read(store, f"vol@{v}") == images[v], f"version {v} differs after a kill"
    return listed


def test_kill9_during_prune_and_gc(tmp_path: Path) -> None:
    rng = random.Random(99)
    path = tmp_path / "store"
    store = Store(path, create=True, segment_bytes=2 << 20)
    volume = store.create_volume("vol", SIZE, BS)
    image = bytearray(SIZE)
    images: dict[int, bytes] = {}
    pool = [rng.randbytes(BS) for _ in range(8)]
    killed_mid_work = 0
    work_seconds = 0.3
    for _ in range(KILLS):
        head = Head(store, volume)
        for _ in range(3):
            for _ in range(rng.randint(200, 1200)):
                b = rng.randrange(BLOCKS)
                data = rng.choice(pool) if rng.random() < 0.3 else rng.randbytes(BS)
                head.write(memoryview(data), b * BS)
                image[b * BS : (b + 1) * BS] = data
            info = head.commit()
            assert info is not None
            images[info.version] = bytes(image)
        store.close()
        keep = rng.randint(1, 4)
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(path), str(keep)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"  # imported, store open: work starts
        started = time.monotonic()
        # A moment inside the work, whose length the runs that were not killed tell.
        time.sleep(rng.uniform(0.0, 0.9) * work_seconds)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_mid_work += 1
        proc.wait()
        if proc.returncode == 0:
            work_seconds = max(0.05, time.monotonic() - started)
        if proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(proc.stderr.read() if proc.stderr else "")
        store = Store(path)
        volume = store.volume("vol")
        _check(store, images)
    assert killed_mid_work >= KILLS // 3, f"only {killed_mid_work} kills landed mid-work"
    # A full gc afterwards finishes every interrupted step and leaves the versions whole.
    reclaim.finish_pruning(store)
    reclaim.sweep(store, grace=0)
    reclaim.compact(store, min_dead=0.1, seal_active=True)
    listed = _check(store, images)
    store.close()
    store = Store(path)
    assert _check(store, images) == listed
    store.close()
