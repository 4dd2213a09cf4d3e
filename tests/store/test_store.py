"""The store, head and session without nbdkit: versions, dedup, crash resume, map growth."""

from __future__ import annotations

import errno
import json
import os
import random
from pathlib import Path

import lmdb
import pytest

from nbdsink.server.exports import ExportNameError, parse_export_name, parse_utc_time
from nbdsink.server.session import Heads, Session, SessionError
from nbdsink.store import Store, StoreError, StoreFormatError, VolumeExists
from nbdsink.store.head import Head

BS = 4096
SIZE = 64 * BS + 1536  # a partial last block on purpose


def read_all(store: Store, heads: Heads, name: str, size: int) -> bytes:
    buf = bytearray(size)
    Session(store, heads, name, readonly=True).pread(memoryview(buf), 0)
    return bytes(buf)


def random_round(rng: random.Random, session: Session, model: bytearray) -> None:
    for _ in range(rng.randint(1, 8)):
        op = rng.choice(["aligned", "unaligned", "zero", "trim", "same"])
        if op == "aligned":
            first = rng.randrange(0, SIZE // BS)
            n = rng.randint(1, 4)
            off, length = first * BS, min(n * BS, SIZE - first * BS)
        else:
            off = rng.randrange(0, SIZE - 1)
            length = rng.randint(1, min(3 * BS, SIZE - off))
        if op in ("aligned", "unaligned"):
            data = rng.randbytes(length)
            session.pwrite(memoryview(data), off)
            model[off : off + length] = data
        elif op == "same":
            session.pwrite(memoryview(bytes(model[off : off + length])), off)
        elif op == "zero":
            session.zero(length, off)
            model[off : off + length] = bytes(length)
        else:
            session.trim(length, off)
            model[off : off + length] = bytes(length)


@pytest.mark.parametrize("batch_bytes", [1 << 30, 3 * BS])
def test_random_rounds_every_version_reads_back(tmp_path: Path, batch_bytes: int) -> None:
    rng = random.Random(1234 + batch_bytes)
    store = Store(tmp_path / "s", create=True)
    store.create_volume("vol", SIZE, BS)
    heads = Heads(store)
    head = Session(store, heads, "vol", readonly=False)
    assert head.head is not None
    head.head.batch_bytes = batch_bytes
    model = bytearray(SIZE)
    expected: dict[int, bytes] = {}
    for _ in range(25):
        random_round(rng, head, model)
        # The head always reads back what was written, flushed or not.
        buf = bytearray(SIZE)
        head.pread(memoryview(buf), 0)
        assert buf == model
        info = head.flush()
        if info is not None:
            expected[info.version] = bytes(model)
    assert len(expected) >= 20
    for version, image in expected.items():
        assert read_all(store, heads, f"vol@{version}", SIZE) == image
    latest = max(expected)
    assert read_all(store, heads, "vol@latest", SIZE) == expected[latest]
    # block_changed counts exactly the blocks that differ from the previous version
    previous = bytes(SIZE)
    for v in store.versions(store.volume("vol")):
        image = expected[v.version]
        changed = sum(
            1 for b in range(0, SIZE, BS) if image[b : b + BS] != previous[b : b + BS]
        )
        assert v.blocks_changed == changed
        previous = image


def test_flush_with_nothing_pending_makes_no_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.create_volume("vol", SIZE, BS)
    s = Session(store, Heads(store), "vol", readonly=False)
    assert s.flush() is None
    s.pwrite(memoryview(b"x" * 100), 10)
    assert s.flush() is not None
    assert s.flush() is None
    # writing what the latest version already holds changes nothing either
    s.pwrite(memoryview(b"x" * 100), 10)
    assert s.flush() is None
    assert [v.version for v in store.versions(store.volume("vol"))] == [1]


def test_dedup_across_versions_and_volumes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.create_volume("a", 32 * BS, BS)
    store.create_volume("b", 32 * BS, BS)
    heads = Heads(store)
    data = random.Random(5).randbytes(16 * BS)
    a = Session(store, heads, "a", readonly=False)
    a.pwrite(memoryview(data), 0)
    v1 = a.flush()
    assert v1 is not None and v1.bytes_stored == 16 * BS and v1.chunks_stored == 16
    # the same data shifted by whole blocks: new map entries, no new chunks
    a.pwrite(memoryview(data), 8 * BS)
    v2 = a.flush()
    assert v2 is not None and v2.blocks_changed == 16 and v2.bytes_stored == 0
    b = Session(store, heads, "b", readonly=False)
    b.pwrite(memoryview(data), 0)
    v3 = b.flush()
    assert v3 is not None and v3.bytes_stored == 0 and v3.blocks_changed == 16
    # zero blocks are never stored
    b.zero(8 * BS, 0)
    assert b.flush() is not None
    assert store.stats()["chunks"] == 16


def test_pending_writes_saved_to_lmdb_resume_after_crash(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.create_volume("vol", SIZE, BS)
    heads = Heads(store)
    s = Session(store, heads, "vol", readonly=False)
    s.pwrite(memoryview(b"1" * BS), 0)
    assert s.flush() is not None
    s.pwrite(memoryview(b"2" * BS), BS)
    assert s.head is not None
    s.head.save()  # as a full batch would
    s.pwrite(memoryview(b"3" * BS), 2 * BS)  # only in memory: lost in the "crash"
    store.env.close()  # the process dies without committing
    store.segments.close()

    store = Store(tmp_path / "s")
    heads = Heads(store)
    image = read_all(store, heads, "vol@1", 3 * BS)
    assert image == b"1" * BS + bytes(2 * BS)  # the committed version is untouched
    head = Session(store, heads, "vol", readonly=False)
    buf = bytearray(3 * BS)
    head.pread(memoryview(buf), 0)
    assert bytes(buf) == b"1" * BS + b"2" * BS + bytes(BS)  # resumed pending writes
    info = head.flush()
    assert info is not None and info.version == 2 and info.blocks_changed == 1


def test_concurrent_sub_block_writes_do_not_lose_bytes(tmp_path: Path) -> None:
    import threading

    store = Store(tmp_path / "s", create=True)
    store.create_volume("vol", 16 * BS, BS)
    heads = Heads(store)
    sessions = [Session(store, heads, "vol", readonly=False) for _ in range(4)]

    def writer(i: int) -> None:
        for sector in range(i, 8 * BS // 512, 4):
            sessions[i].pwrite(memoryview(bytes([sector % 251 + 1]) * 512), sector * 512)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sessions[0].flush()
    image = read_all(store, heads, "vol@1", 8 * BS)
    for sector in range(8 * BS // 512):
        assert image[sector * 512 : (sector + 1) * 512] == bytes([sector % 251 + 1]) * 512


def test_map_grows_by_itself(tmp_path: Path) -> None:
    # 32768 blocks of one content: one chunk, and a map that outgrows 1 MiB.
    blocks = 32768
    store = Store(tmp_path / "s", create=True, map_size=1 << 20)
    store.create_volume("vol", blocks * BS, BS)
    s = Session(store, Heads(store), "vol", readonly=False)
    data = random.Random(3).randbytes(BS) * blocks
    s.pwrite(memoryview(data), 0)
    assert s.flush() is not None
    assert store.env.info()["map_size"] > 2 << 20
    assert read_all(store, Heads(store), "vol@1", len(data)) == data


def test_unknown_store_format_is_a_clear_error(tmp_path: Path) -> None:
    Store(tmp_path / "s", create=True).close()
    env = lmdb.open(str(tmp_path / "s"), max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", json.dumps({"format": 99}).encode(), db=meta)
    env.close()
    with pytest.raises(StoreFormatError, match="format 99"):
        Store(tmp_path / "s")
    with pytest.raises(StoreFormatError, match="no nbdsink store"):
        Store(tmp_path / "missing")


def test_volume_validation(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.create_volume("ok", 1 << 20)
    with pytest.raises(VolumeExists):
        store.create_volume("ok", 1 << 20)
    for bad in ("", "a@b", "a/b", "a;b", " a"):
        with pytest.raises(StoreError):
            store.create_volume(bad, 1 << 20)
    for bs in (1024, 3 * 4096, 8 << 20):
        with pytest.raises(StoreError, match="power of two"):
            store.create_volume("x", 1 << 20, bs)
    with pytest.raises(StoreError, match="multiple of 512"):
        store.create_volume("x", 1000)


def test_export_names_resolve_and_fail_clearly(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.create_volume("vol", SIZE, BS)
    heads = Heads(store)
    s = Session(store, heads, "vol", readonly=False)
    for i in range(3):
        s.pwrite(memoryview(bytes([i + 1]) * BS), 0)
        s.flush()
    versions = store.versions(store.volume("vol"))
    assert [v.version for v in versions] == [1, 2, 3]
    assert Session(store, heads, "vol@latest", readonly=False).version == 3
    assert Session(store, heads, f"vol@{versions[1].time}", readonly=True).version == 2
    assert Session(store, heads, "vol@2999-01-01T00:00:00Z", readonly=True).version == 3
    ro = Session(store, heads, "vol@1", readonly=False)
    assert ro.readonly
    with pytest.raises(SessionError) as err:
        ro.pwrite(memoryview(b"x"), 0)
    assert err.value.errno == errno.EPERM
    for name in ("nope", "vol@4", "vol@0", "vol@yesterday", "@1", "", "vol@1999-01-01T00:00:00Z",
                 "vol;consistency=maybe", "vol;novalue"):
        with pytest.raises(SessionError) as err:
            Session(store, heads, name, readonly=True)
        assert err.value.errno == errno.ENOENT


def test_head_attributes_label_the_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.create_volume("vol", SIZE, BS)
    s = Session(store, Heads(store), "vol;consistency=frozen;frozen_at=2026-11-23T10:00:00Z",
                readonly=False)
    s.pwrite(memoryview(b"z" * 10), 0)
    info = s.flush()
    assert info is not None
    assert info.consistency == "frozen"
    assert info.labels == {"frozen_at": "2026-11-23T10:00:00Z"}
    assert store.versions(store.volume("vol"))[0].to_json()["labels"] == info.labels


def test_extents_report_zero_blocks_as_holes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    store.create_volume("vol", 16 * BS, BS)
    s = Session(store, Heads(store), "vol", readonly=False)
    s.pwrite(memoryview(b"d" * BS), 2 * BS)
    s.pwrite(memoryview(b"d" * 2 * BS), 5 * BS)
    s.pwrite(memoryview(bytes(BS)), 6 * BS)  # data that happens to be zero: a hole too
    assert s.extents(16 * BS, 0) == [
        (0, 2 * BS, 3), (2 * BS, BS, 0), (3 * BS, 2 * BS, 3), (5 * BS, BS, 0), (6 * BS, 10 * BS, 3)
    ]
    s.flush()
    v1 = Session(store, Heads(store), "vol@1", readonly=True)
    assert v1.extents(3 * BS + 100, BS + 7) == [(BS + 7, BS - 7, 3), (2 * BS, BS, 0),
                                               (3 * BS, BS + 107, 3)]


def test_parse_times() -> None:
    assert parse_utc_time("2026-11-21T10:00:00Z") == 1795255200.0
    assert parse_utc_time("2026-11-21T11:00:00+01:00") == 1795255200.0
    assert parse_utc_time("2026-11-21T10:00:00.5Z") == 1795255200.5
    assert parse_utc_time("2026-11-21T10:00:00") is None  # a zone is required
    assert parse_utc_time("2026-13-01T00:00:00Z") is None
    with pytest.raises(ExportNameError):
        parse_export_name("vol@2026-11-21")


def test_head_counts_persist_across_saves(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    vol = store.create_volume("vol", 8 * BS, BS)
    head = Head(store, vol, batch_bytes=BS)
    head.write(memoryview(b"a" * BS), 0)
    head.write(memoryview(b"b" * BS), BS)
    head.write(memoryview(b"a" * BS), BS)  # same block twice, same chunk as block 0
    info = head.commit()
    assert info is not None
    assert (info.blocks_changed, info.chunks_stored) == (2, 2)  # "b" was stored, then replaced


def test_another_process_growing_the_map_is_adopted(tmp_path: Path) -> None:
    """The CLI (volume create, versions) works while a server process grows the map."""
    import subprocess
    import sys

    small = Store(tmp_path / "s", create=True, map_size=1 << 20)
    small.create_volume("a", 32768 * BS, BS)
    grow = f"""
import random
from nbdsink.store import Store
from nbdsink.server.session import Heads, Session
other = Store({str(tmp_path / "s")!r}, map_size=1 << 20)
s = Session(other, Heads(other), "a", readonly=False)
s.pwrite(memoryview(random.Random(1).randbytes({BS}) * 32768), 0)
s.flush()
assert other.env.info()["map_size"] > 2 << 20
"""
    subprocess.run([sys.executable, "-c", grow], check=True)
    small.create_volume("b", 1 << 20)
    assert [v.name for v in small.volumes()] == ["a", "b"]
    expected = random.Random(1).randbytes(BS) * 32768
    assert read_all(small, Heads(small), "a@1", len(expected)) == expected


@pytest.mark.parametrize(("block_size", "pages_per_block"),
                         [(4096, 1), (16384, 4), (65536, 17)])
def test_chunks_fill_whole_pages(tmp_path: Path, block_size: int, pages_per_block: int) -> None:
    """A chunk under 64 KiB takes block_size / 4 KiB pages, not one more for LMDB's page
    header (which doubled the space of 4 KiB blocks); larger ones stay whole."""
    size = 8 << 20
    store = Store(tmp_path / "s", create=True)
    head = Head(store, store.create_volume("vol", size, block_size))
    data = random.Random(7).randbytes(size)
    head.write(memoryview(data), 0)
    assert head.commit() is not None
    segment = store.segments.acquire(1)
    pages = segment.used_bytes() // 4096
    store.segments.release(segment)
    # The chunks' pages, plus a few hundred bytes per chunk of keys, tails, map and tree.
    bound = (size // block_size) * (pages_per_block * 4096 + 256) + (64 << 10)
    assert pages * 4096 < bound, f"{pages} pages for {size >> 20} MiB of {block_size}-byte blocks"
    assert read_all(store, Heads(store), "vol@1", size) == data


def test_a_chunk_without_its_tail_is_a_clear_error(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    head = Head(store, store.create_volume("vol", SIZE, BS))
    head.write(memoryview(random.Random(5).randbytes(BS)), 0)
    head.commit()
    store.close()
    env = lmdb.open(str(tmp_path / "s" / "segments" / "00000001.mdb"), subdir=False, max_dbs=2)
    tails = env.open_db(b"tails")
    with env.begin(write=True) as txn:
        txn.drop(tails, delete=False)
    env.close()
    store = Store(tmp_path / "s")
    buf = bytearray(BS)
    with pytest.raises(StoreError, match=r"checksum|incomplete"):
        Session(store, Heads(store), "vol@1", readonly=True).pread(memoryview(buf), 0)


@pytest.mark.parametrize("name", ["vol@01", "vol@\u0661", "vol@\uff11", "vol;k=v;k=w",
                                  "vol;label=a\x07b", "vol@2026-11-21T10:00:00-99:99",
                                  "vol;scratch", "vol@latest;bogus"])
def test_one_spelling_per_export(name: str) -> None:
    with pytest.raises(ExportNameError):
        parse_export_name(name)


def test_the_spellings_that_are_accepted() -> None:
    assert parse_export_name("vol@1").version == 1
    assert parse_export_name("vol@10").version == 10
    assert parse_export_name("vol@3;scratch").view == "scratch"
    assert parse_export_name("vol@latest;digests").view == "digests"
    assert parse_export_name("vol;digests").view == "digests"
    assert parse_export_name("vol;consistency=frozen;x=y").attributes == {
        "consistency": "frozen", "x": "y"}
    assert parse_export_name("vol@2026-11-21T10:00:00+14:00").kind == "time"


def test_a_batch_larger_than_a_segment_map_holds_is_saved(tmp_path: Path) -> None:
    """Writes that piled up in memory (while saves failed on a full disk, say) are saved in
    parts once they can be: one segment's map could not hold them all."""
    store = Store(tmp_path / "s", create=True, segment_bytes=8 << 20)
    size = 288 << 20  # more than a segment's map (256 MiB at least)
    store.create_volume("big", size, 65536)
    head = Head(store, store.volume("big"), batch_bytes=1 << 30)
    piece = 32 << 20
    written = b""
    for off in range(0, size, piece):
        data = os.urandom(piece)
        head.write(memoryview(data), off)
        written += data
    info = head.commit()
    assert info is not None and info.blocks_changed == size // 65536
    buf = bytearray(size)
    from nbdsink.store.head import read_into

    read_into(store, store.volume("big"), info.version, memoryview(buf), 0)
    assert buf == written
    store.close()
