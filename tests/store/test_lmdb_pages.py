"""The walk of LMDB's own pages (nbdsink.store.lmdb_pages), and how the store keeps away from
what it finds (nbdsink.store.structure): each kind of damage is found, in the right database,
page and key range; a sound store walks clean (every page accounted for) after pruning,
sweeping, punching and compaction; reads that could reach known damage fail with
StoreDamaged before LMDB is called, everything else reads back exactly; verify exits 1 and
names what is unreadable.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest

from nbdsink import testing_lmdb as lm
from nbdsink.store import Store, StoreFormatError, check, reclaim, structure
from nbdsink.store import keys as store_keys
from nbdsink.store.head import Head, read_into
from nbdsink.store.lmdb_pages import FREE_DB, check_env
from nbdsink.store.retention import Policy
from nbdsink.store.structure import StoreDamaged, StoreReadOnly

BS = 4096
BLOCKS = 8192
SIZE = BS * BLOCKS


def _write(path: Path, versions: int = 3, segment_bytes: int = 64 << 20) -> dict[int, bytes]:
    """A volume of 8192 blocks: the map and the chunk tree of segment 1 are three levels
    deep (branch pages below the root)."""
    store = Store(path, create=True, segment_bytes=segment_bytes)
    head = Head(store, store.create_volume("vol", SIZE, BS))
    rng = random.Random(3)
    image = bytearray(rng.randbytes(SIZE))
    head.write(memoryview(image), 0)
    head.commit()
    images = {1: bytes(image)}
    for v in range(2, versions + 1):
        for _ in range(BLOCKS // 8):
            b = rng.randrange(BLOCKS)
            image[b * BS : (b + 1) * BS] = rng.randbytes(BS)
            head.write(memoryview(image[b * BS : (b + 1) * BS]), b * BS)
        head.commit()
        images[v] = bytes(image)
    store.close()
    return images


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, bytes]]:
    path = tmp_path_factory.mktemp("base") / "store"
    return path, _write(path)


@pytest.fixture
def copy(base: tuple[Path, dict[int, bytes]], tmp_path: Path) -> Path:
    shutil.copytree(base[0], tmp_path / "store")
    return tmp_path / "store"


def _all_envs(store: Path) -> list[Path]:
    return [p for _, p, _ in structure.environments(store)]


def test_a_sound_store_walks_clean_through_pruning_sweeping_punching_and_compaction(
        tmp_path: Path) -> None:
    path = tmp_path / "store"
    _write(path, versions=5, segment_bytes=4 << 20)
    for data_file in _all_envs(path):
        found = check_env(data_file, punched=data_file.name != "data.mdb")
        assert found.clean, found.summary()
        # Every page is either in use or listed free: LMDB loses none.
        assert found.leaked_pages == 0 and found.pages_walked > 0
    with Store(path) as store:
        reclaim.prune(store, store.volume("vol"), Policy(keep_last=2))
        reclaim.finish_pruning(store)
        reclaim.sweep(store, grace=0.0)
        reclaim.seal_dirty(store, min_dead=0.1)
        punched = reclaim.punch_holes(store)
        reclaim.compact(store, min_dead=0.1)
        # In process, pinned through the store's own environments.
        walk = structure.check_store(path, pin=check.pinner(store))
    assert punched.chunks > 0
    assert walk.clean and walk.environments >= 2, [f.lines() for f in walk.findings]
    assert all(f.leaked_pages == 0 for f in walk.findings)


Damager = Callable[[Path], tuple[Path, str, int]]
"""Damages a store copy; returns the file, the database the walk must blame, the page."""


def _zero_map_leaf(store: Path) -> tuple[Path, str, int]:
    page = lm.find_pages(lm.main_file(store), "map", "leaf")[30]
    lm.zero_page(lm.main_file(store), page.pgno)
    return lm.main_file(store), "map", page.pgno


def _scramble_map_branch(store: Path) -> tuple[Path, str, int]:
    page = lm.find_pages(lm.main_file(store), "map", "branch", depth=2)[0]
    lm.scramble_page(lm.main_file(store), page.pgno, seed=1)
    return lm.main_file(store), "map", page.pgno


def _redirect_map_pointer(store: Path) -> tuple[Path, str, int]:
    data = lm.main_file(store)
    branch = lm.find_pages(data, "map", "branch", depth=2)[1]
    lm.redirect_child(data, branch.pgno, 2, lm.find_pages(data, "map", "leaf")[3].pgno)
    return data, "map", branch.pgno


def _pointer_past_the_end(store: Path) -> tuple[Path, str, int]:
    """The meta page claims pages past the end of the file, and a pointer leads there (a
    SIGBUS in LMDB)."""
    data = lm.main_file(store)
    index_root = lm.find_pages(data, "index", "branch", depth=1)[0]
    first = lm.claim_pages(data, 100)
    lm.redirect_child(data, index_root.pgno, 1, first + 50)
    return data, "index", index_root.pgno


def _scramble_free_list(store: Path) -> tuple[Path, str, int]:
    page = lm.find_pages(lm.main_file(store), FREE_DB, "leaf")[0]
    lm.scramble_page(lm.main_file(store), page.pgno, seed=4)
    return lm.main_file(store), FREE_DB, page.pgno


def _segment_overflow_count(store: Path) -> tuple[Path, str, int]:
    seg = lm.segment_file(store, 1)
    page = lm.find_pages(seg, "chunks", "overflow")[7]
    lm.write_at(seg, page.pgno * lm.page_size(seg) + 12, b"\x09\0\0\0")
    return seg, "chunks", page.pgno


def _zero_segment_branch(store: Path) -> tuple[Path, str, int]:
    seg = lm.segment_file(store, 1)
    page = lm.find_pages(seg, "chunks", "branch", depth=2)[0]
    lm.zero_page(seg, page.pgno)
    return seg, "chunks", page.pgno


def _node_offsets_past_the_page(store: Path) -> tuple[Path, str, int]:
    seg = lm.segment_file(store, 1)
    page = lm.find_pages(seg, "tails", "leaf")[1]
    lm.write_at(seg, page.pgno * lm.page_size(seg) + 16, b"\xf0\xff" * 4)
    return seg, "tails", page.pgno


def _index_keys_swapped(store: Path) -> tuple[Path, str, int]:
    """Two neighbouring nodes of an index leaf trade places: every node is inside the page
    and every key is a real digest, only their order is wrong."""
    data = lm.main_file(store)
    page = lm.find_pages(data, "index", "leaf")[2]
    offsets = lm.read_page(data, page.pgno)[16:20]
    lm.write_at(data, page.pgno * lm.page_size(data) + 16, offsets[2:] + offsets[:2])
    return data, "index", page.pgno


def _segment_chunks_share_pages(store: Path) -> tuple[Path, str, int]:
    """A chunk's overflow pointer is bent to its neighbour's pages (a header that reads
    right, pages another pointer reaches too)."""
    seg = lm.segment_file(store, 1)
    leaf = lm.find_pages(seg, "chunks", "leaf")[1]
    chunks = [p for p in lm.find_pages(seg, "chunks", "overflow")
              if leaf.low is not None and p.key is not None and p.key >= leaf.low
              and (leaf.high is None or p.key < leaf.high)]
    lm.overflow_pointer(seg, leaf.pgno, 4, chunks[3].pgno)
    return seg, "chunks", chunks[3].pgno


def _segment_node_key_past_the_page(store: Path) -> tuple[Path, str, int]:
    """The last node of a segment leaf says its key is longer than the page has room for."""
    seg = lm.segment_file(store, 1)
    leaf = lm.find_pages(seg, "chunks", "leaf")[0]
    lm.write_at(seg, lm.node_offset(seg, leaf.pgno, 0) + 6, b"\xff\x0f")
    return seg, "chunks", leaf.pgno


@pytest.mark.parametrize("damage", [
    _zero_map_leaf, _scramble_map_branch, _redirect_map_pointer, _pointer_past_the_end,
    _scramble_free_list, _segment_overflow_count, _zero_segment_branch,
    _node_offsets_past_the_page, _index_keys_swapped, _segment_chunks_share_pages,
    _segment_node_key_past_the_page,
], ids=lambda f: f.__name__.strip("_"))
def test_each_kind_of_damage_is_found_where_it_is(copy: Path, damage: Damager) -> None:
    data_file, db, pgno = damage(copy)
    found = check_env(data_file, punched=data_file.name != "data.mdb")
    assert not found.clean
    blamed = [d for d in found.damage if d.db == db]
    assert blamed, found.summary()
    assert pgno in {d.pgno for d in blamed} or found.problems, found.summary()
    # The rest of the store walks clean.
    for other in _all_envs(copy):
        if other != data_file:
            assert check_env(other, punched=other.name != "data.mdb").clean


def test_a_truncated_file_is_refused_before_lmdb_maps_it(copy: Path) -> None:
    lm.truncate(lm.main_file(copy), 20)
    found = check_env(lm.main_file(copy))
    assert any("truncated" in p for p in found.problems)
    with pytest.raises(StoreFormatError, match="truncated"):
        Store(copy)


def test_reads_keep_away_from_known_damage(copy: Path, base: tuple[Path, dict[int, bytes]]
                                           ) -> None:
    """In process: the walk's findings go to the store; a lookup that could reach the
    damaged page fails with StoreDamaged (LMDB would abort on it: it is read as zeros), the
    rest reads back exactly, and writes are refused."""
    images = base[1]
    _, _, pgno = _zero_map_leaf(copy)
    store = Store(copy)
    walk = structure.check_store(copy, pin=check.pinner(store))
    damage = store.reload_damage(walk)
    assert damage is not None and damage.read_only and "map" in damage.main
    guard = damage.main["map"][0]
    assert guard.pgno == pgno
    vol = store.volume("vol")
    failed = 0
    for v, image in images.items():
        for b in range(BLOCKS):
            buf = bytearray(BS)
            if guard.guards(store_keys.map_key(vol.id, b, v)):
                with pytest.raises(StoreDamaged):
                    read_into(store, vol, v, memoryview(buf), b * BS)
                failed += 1
            else:
                read_into(store, vol, v, memoryview(buf), b * BS)
                assert buf == image[b * BS : (b + 1) * BS]
    assert failed > 0
    with pytest.raises(StoreReadOnly):
        Head(store, vol).commit()
    report = check.verify(store, walk=walk)
    assert not report.clean
    assert any("volume vol: blocks" in u for e in report.structural for u in e["unreadable"])
    store.close()


def test_map_and_index_entries_of_the_wrong_shape(copy: Path,
                                                 base: tuple[Path, dict[int, bytes]]) -> None:
    """Records LMDB reads without complaint but nbdsink cannot have written: EIO."""
    env = lmdb.open(str(copy), max_dbs=20)
    with env.begin(write=True) as txn:
        txn.put(store_keys.map_key(1, 5, 1), b"short", db=env.open_db(b"map", txn=txn))
        index = env.open_db(b"index", txn=txn)
        first = bytes(next(iter(txn.cursor(db=index)))[0])
        txn.put(first, b"\0" * 5, db=index)
    env.close()
    store = Store(copy)
    vol = store.volume("vol")
    buf = bytearray(BS)
    with pytest.raises(StoreDamaged, match="5-byte entry"):
        read_into(store, vol, 1, memoryview(buf), 5 * BS)
    read_into(store, vol, 1, memoryview(buf), 6 * BS)
    assert buf == base[1][1][6 * BS : 7 * BS]
    assert store.read(lambda r: store.locate(r, bytes(32))) is None
    with pytest.raises(StoreDamaged, match="index entry of 5 bytes"):
        store.read(lambda r: store.locate(r, first))
    store.close()


def test_verify_names_the_damage_and_a_restored_store_is_served_again(
        copy: Path, base: tuple[Path, dict[int, bytes]]) -> None:
    _zero_segment_branch(copy)
    run = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "verify", "--json",
                          "--store", str(copy)], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    found = json.loads(run.stdout)
    assert not found["clean"]
    damaged = found["structure"]["damaged"]
    assert [e["environment"] for e in damaged] == ["segment 1"]
    assert "chunks: page" in damaged[0]["problems"][0]
    # The chunks behind the damaged branch are named with the blocks that use them, and
    # quarantined (reads give EIO without looking).
    assert found["damaged_chunks"] and all(u["volume"] == "vol"
                                           for d in found["damaged_chunks"] for u in d["uses"])
    assert structure.load(copy) is not None and not structure.load(copy).clean  # type: ignore[union-attr]
    # Restored from a sound copy: the next check clears the record, and nothing is refused.
    shutil.copy(lm.segment_file(base[0], 1), lm.segment_file(copy, 1))
    run = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "verify", "--store",
                          str(copy)], capture_output=True, text=True)
    # The quarantine marks stay until the same content is written again (healing).
    assert run.returncode == 1 and "structural damage" not in run.stdout, run.stdout
    with Store(copy) as store:
        assert store.damage is None


def _verify_cli(store: Path) -> tuple[int, dict[str, object]]:
    run = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "verify", "--json",
                          "--store", str(store)], capture_output=True, text=True)
    return run.returncode, json.loads(run.stdout)


def test_a_map_key_changed_in_order_is_found_by_its_change_record(
        copy: Path, base: tuple[Path, dict[int, bytes]]) -> None:
    """A map entry whose key changed but still sorts in its place (a bit of its version
    number): every page is sound, every chunk whole, yet block 7 would read as zeros. Its
    change record no longer matches: verify names the block, and reads of it are refused."""
    images = base[1]
    env = lmdb.open(str(copy), max_dbs=24)
    with env.begin(write=True) as txn:
        db = env.open_db(b"map", txn=txn)
        value = txn.pop(store_keys.map_key(1, 7, 1), db=db)
        txn.put(store_keys.map_key(1, 7, 1 << 40), value, db=db)
    env.close()
    with Store(copy) as store:
        buf = bytearray(BS)
        read_into(store, store.volume("vol"), 1, memoryview(buf), 7 * BS)
        assert buf == bytes(BS) != images[1][7 * BS : 8 * BS]  # what a reader got
    code, found = _verify_cli(copy)
    assert code == 1
    assert found["damaged_records"] == [
        f"volume vol, block 7: a map entry of version {1 << 40} has no change record "
        "(a damaged page)"]
    with Store(copy) as store:
        vol = store.volume("vol")
        for v in images:
            with pytest.raises(StoreDamaged):
                read_into(store, vol, v, memoryview(buf), 7 * BS)
            read_into(store, vol, v, memoryview(buf), 8 * BS)
            assert buf == images[v][8 * BS : 9 * BS]


def test_a_live_chunk_whose_pages_read_as_zeros(copy: Path) -> None:
    """Zeros are what a punched hole reads as, so the walk lets them pass in a segment; a
    chunk the index still points to there is damaged, and verify says so without reading
    the data."""
    seg = lm.segment_file(copy, 1)
    page = lm.find_pages(seg, "chunks", "overflow")[11]
    assert page.key is not None
    for p in range(page.pgno, page.pgno + page.pages):
        lm.zero_page(seg, p)
    code, found = _verify_cli(copy)
    assert code == 1
    damaged = found["damaged_chunks"]
    assert [d["chunk"] for d in damaged] == [page.key.hex()]  # type: ignore[index]
    assert "read as zeros" in damaged[0]["problem"]  # type: ignore[index]


def test_a_chunk_missing_from_its_segments_list(copy: Path) -> None:
    """Compaction copies what the segment's list of chunks names, then deletes the segment:
    a chunk the index places there but the list lacks would be lost. verify finds it, and
    the store stops writing (so nothing is compacted) until it is restored."""
    env = lmdb.open(str(copy), max_dbs=24)
    with env.begin(write=True) as txn:
        db = env.open_db(b"seg_chunks", txn=txn)
        key = bytes(next(iter(txn.cursor(db=db)))[0])
        txn.delete(key, db=db)
    env.close()
    code, found = _verify_cli(copy)
    assert code == 1
    assert found["damaged_records"] == [
        f"chunk {key[4:].hex()}: the index places it in segment 1, whose list of chunks "
        "lacks it (a damaged page): compacting the segment would lose it"]
    with Store(copy) as store:
        assert store.damage is not None and store.damage.read_only
        with pytest.raises(StoreReadOnly):
            Head(store, store.volume("vol")).commit()


def test_an_empty_segment_file_left_by_a_crash_is_not_damage(copy: Path) -> None:
    """A crash between creating a segment's file and its first commit leaves it empty: it
    holds nothing (the store initializes it when it opens it)."""
    lm.segment_file(copy, 99).touch()
    code, found = _verify_cli(copy)
    assert code == 0, found
