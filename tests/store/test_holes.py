"""Punching dead chunks out of sealed segments: the disk space comes back without copying
live data, never while a reader may still read the chunk, and never for a chunk that came
back to life in the segment."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbdsink.server.session import Heads, Session
from nbdsink.store import Store, check, holes, reclaim
from nbdsink.store.chunks import digest
from nbdsink.store.head import Head
from nbdsink.store.retention import Policy

BS = 65536
BLOCKS = 64


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


READER = """
import hashlib, sys
from nbdsink.store import Store
from nbdsink.store.store import Location
store = Store(sys.argv[1])
txn = store.env.begin(buffers=True)
where = [(bytes.fromhex(d), Location.decode(txn.get(bytes.fromhex(d), db=store._index)))
         for d in sys.argv[2:]]
print("looked up", flush=True)
sys.stdin.readline()
out = ""
for d, loc in where:
    whole = store.segments.read(loc.segment, d)
    out += hashlib.sha256(whole[-65536:]).hexdigest()[:8]
print(out, flush=True)
txn.abort()
"""


def _write_all(store: Store, datas: list[bytes]) -> int:
    head = Head(store, store.volume("vol"))
    for b, data in enumerate(datas):
        head.write(memoryview(data), b * BS)
    info = head.commit()
    assert info is not None
    return info.version


def _read(store: Store, name: str, blocks: int = BLOCKS) -> bytes:
    buf = bytearray(blocks * BS)
    Session(store, Heads(store), name, readonly=True).pread(memoryview(buf), 0)
    return bytes(buf)


def _prune_to_latest(store: Store) -> None:
    reclaim.prune(store, store.volume("vol"), Policy(keep_last=1))
    reclaim.sweep(store, grace=0)


def test_punching_gives_the_space_of_dead_chunks_back_without_copying(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", create=True, segment_bytes=2 << 20)
    store.create_volume("vol", BLOCKS * BS, BS)
    _write_all(store, [os.urandom(BS) for _ in range(BLOCKS)])
    new = [os.urandom(BS) for _ in range(BLOCKS)]
    latest = _write_all(store, new)
    _prune_to_latest(store)
    reclaim.seal_dirty(store, min_dead=0.0)
    segments = tmp_path / "store" / "segments"
    files_before = sorted(p.name for p in segments.iterdir())
    before = _du(segments)
    punched = reclaim.punch_holes(store)
    after = _du(segments)
    assert punched.chunks == BLOCKS, punched
    # Each dead 64 KiB chunk took 17 pages; all of them come back.
    assert before - after >= 0.95 * BLOCKS * BS, (before, after)
    assert sorted(p.name for p in segments.iterdir()) == files_before, "nothing was copied"
    assert _read(store, f"vol@{latest}") == b"".join(new)
    assert check.verify(store, full=True).clean
    # Compaction copies nothing now: it only deletes the files left with no live chunk.
    empty = {u.id for u in reclaim.segment_usage(store) if u.live == 0}
    assert set(reclaim.compact(store, min_dead=0.25)) <= empty
    # Punching again finds nothing left to do.
    assert reclaim.punch_holes(store).chunks == 0
    store.close()
    store = Store(tmp_path / "store")
    assert _read(store, f"vol@{latest}") == b"".join(new)
    assert check.verify(store, full=True).clean
    store.close()


def test_a_reader_older_than_the_sweep_keeps_the_pages_until_it_ends(tmp_path: Path) -> None:
    store = Store(tmp_path / "store", create=True, segment_bytes=2 << 20)
    store.create_volume("vol", BLOCKS * BS, BS)
    first = [os.urandom(BS) for _ in range(BLOCKS)]
    _write_all(store, first)
    # Another process's read snapshot from before the sweep (a server's read in flight):
    # it looked version 1's chunks up and may still read them.
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path / "store"),
                               *(digest(d).hex() for d in first[:4])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdin is not None
    assert reader.stdout.readline().strip() == "looked up"
    _write_all(store, [os.urandom(BS) for _ in range(BLOCKS)])
    _prune_to_latest(store)
    reclaim.seal_dirty(store, min_dead=0.0)
    assert reclaim.punch_holes(store).chunks == 0
    assert store.read(lambda r: r.txn.stat(store._holes)["entries"]) == BLOCKS  # deferred
    reader.stdin.write("read\n")
    reader.stdin.flush()
    # The chunks it looked up before the sweep are still whole when it reads them.
    assert reader.stdout.readline().strip() == "".join(hashlib.sha256(d).hexdigest()[:8]
                                                       for d in first[:4])
    assert reader.wait(30) == 0
    assert reclaim.punch_holes(store).chunks == BLOCKS
    assert check.verify(store, full=True).clean
    store.close()


def test_a_chunk_that_came_back_to_its_segment_is_not_punched(tmp_path: Path) -> None:
    """A chunk dies while its segment is active, then the same content is written again
    before the segment is sealed: the segment already holds it, so the index points back to
    those very pages. Punching them would destroy live data."""
    store = Store(tmp_path / "store", create=True)  # one big active segment
    store.create_volume("vol", BLOCKS * BS, BS)
    a = [os.urandom(BS) for _ in range(BLOCKS)]
    _write_all(store, a)
    _write_all(store, [os.urandom(BS) for _ in range(BLOCKS)])
    _prune_to_latest(store)
    assert store.read(lambda r: r.txn.stat(store._holes)["entries"]) == BLOCKS
    latest = _write_all(store, a)  # the old content again, in the same (active) segment
    reclaim.seal_dirty(store, min_dead=0.0)
    assert reclaim.punch_holes(store).chunks == 0
    assert _read(store, f"vol@{latest}") == b"".join(a)
    assert check.verify(store, full=True).clean
    store.close()


def test_the_sweep_is_durable_before_any_page_is_punched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main environment syncs its meta page per version, not per sweep: a power cut
    during punching must not be able to undo the sweep that made the chunks dead (the index
    would then hold chunks whose data are zeros, and a write of the same content would be
    taken as stored). tests/vm/test_power_cut.py cuts the power after punching; this pins
    the order the narrower window relies on."""
    store = Store(tmp_path / "store", create=True, segment_bytes=2 << 20)
    store.create_volume("vol", BLOCKS * BS, BS)
    _write_all(store, [os.urandom(BS) for _ in range(BLOCKS)])
    _write_all(store, [os.urandom(BS) for _ in range(BLOCKS)])
    _prune_to_latest(store)
    reclaim.seal_dirty(store, min_dead=0.0)
    events: list[str] = []
    real_sync, real_punch = store.sync, holes.punch

    def sync() -> None:
        events.append("sync")
        real_sync()

    def punch(fd: int, offset: int, length: int) -> bool:
        events.append("punch")
        return real_punch(fd, offset, length)

    monkeypatch.setattr(store, "sync", sync)
    monkeypatch.setattr(holes, "punch", punch)
    assert reclaim.punch_holes(store).chunks == BLOCKS
    assert "punch" in events and events[0] == "sync", events
    store.close()
