"""Clones (a volume whose version 1 is another's version) and scratch views."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nbdsink.server.session import Heads, Session
from nbdsink.store import Store, StoreError, reclaim
from nbdsink.store.head import Head
from nbdsink.store.retention import Policy

BS = 16384
BLOCKS = 64
SIZE = BS * BLOCKS


def read(store: Store, name: str) -> bytes:
    buf = bytearray(SIZE)
    Session(store, Heads(store), name, readonly=True).pread(memoryview(buf), 0)
    return bytes(buf)


def test_clone_reads_its_base_and_keeps_its_own_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    vol = store.create_volume("web", SIZE, BS)
    head = Head(store, vol)
    rng = random.Random(2)
    v1 = rng.randbytes(SIZE)
    head.write(memoryview(v1), 0)
    head.commit()
    v2 = bytearray(v1)
    v2[5 * BS : 6 * BS] = rng.randbytes(BS)
    head.write(memoryview(v2[5 * BS : 6 * BS]), 5 * BS)
    head.commit()
    dr = store.clone(vol, 2, "dr")
    assert read(store, "dr@1") == bytes(v2)
    # The clone's own writes: a whole block, zeros over a block the base has data in, a
    # partial block, and a block set back to what the base holds.
    dr_head = Head(store, dr)
    expected = bytearray(v2)
    new = rng.randbytes(BS)
    dr_head.write(memoryview(new), 0)
    expected[:BS] = new
    dr_head.zero(BS, 3 * BS)
    expected[3 * BS : 4 * BS] = bytes(BS)
    dr_head.write(memoryview(b"partial" * 10), 7 * BS + 100)
    expected[7 * BS + 100 : 7 * BS + 170] = b"partial" * 10
    info = dr_head.commit()
    assert info is not None and info.version == 2 and info.blocks_changed == 3
    assert read(store, "dr@2") == bytes(expected)
    assert read(store, "dr@1") == bytes(v2)
    assert read(store, "web@2") == bytes(v2) and read(store, "web@1") == v1
    # A clone of the clone.
    store.clone(dr, 2, "dr2")
    assert read(store, "dr2@1") == bytes(expected)
    # The base is kept from pruning while a clone uses it ...
    head.write(memoryview(rng.randbytes(BS)), 9 * BS)
    head.commit()
    report = reclaim.prune(store, vol, Policy(keep_last=1))
    assert report.kept[2] == "base of clone dr" and 2 not in report.pruned
    assert read(store, "dr@1") == bytes(v2)
    with pytest.raises(StoreError, match="base of clone"):
        reclaim.delete_volume(store, "web")
    # ... and released when the clones go.
    reclaim.delete_volume(store, "dr2")
    reclaim.delete_volume(store, "dr")
    assert 2 in reclaim.prune(store, vol, Policy(keep_last=1)).pruned


def test_a_clone_costs_no_data(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    vol = store.create_volume("big", 1 << 30, 65536)
    head = Head(store, vol)
    head.write(memoryview(os.urandom(64 << 20)), 0)
    head.commit()
    store.sync()
    before = sum(f.stat().st_blocks * 512 for f in (tmp_path / "s").rglob("*") if f.is_file())
    store.clone(vol, 1, "c")
    after = sum(f.stat().st_blocks * 512 for f in (tmp_path / "s").rglob("*") if f.is_file())
    assert after - before < 1 << 20


def test_scratch_writes_live_only_for_the_connection(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    vol = store.create_volume("web", SIZE, BS)
    head = Head(store, vol)
    base = random.Random(3).randbytes(SIZE)
    head.write(memoryview(base), 0)
    head.commit()
    heads = Heads(store)
    a = Session(store, heads, "web@1;scratch", readonly=False)
    b = Session(store, heads, "web@1;scratch", readonly=False)
    assert not a.readonly
    a.pwrite(memoryview(b"A" * (BS + 10)), 2 * BS - 5)
    a.zero(100, 10 * BS)
    b.pwrite(memoryview(b"B" * 10), 0)
    got = bytearray(SIZE)
    a.pread(memoryview(got), 0)
    expected = bytearray(base)
    expected[2 * BS - 5 : 3 * BS + 5] = b"A" * (BS + 10)
    expected[10 * BS : 10 * BS + 100] = bytes(100)
    assert bytes(got) == bytes(expected)
    b.pread(memoryview(got), 0)
    assert bytes(got) == b"B" * 10 + base[10:]
    assert a.flush() is None  # nothing is committed
    a.close()
    b.close()
    assert read(store, "web@1") == base
    assert store.latest_version(vol) == 1
    assert list((tmp_path / "s" / "scratch").iterdir()) == []  # nothing left behind
