"""Damage in a copy of a store: verify finds each kind exactly, reads never return wrong bytes,
undamaged blocks read correctly, and the same content written again heals."""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import blake3
import lmdb
import pytest

from nbdsink import testing_lmdb as lm
from nbdsink.server.session import Heads, Session
from nbdsink.store import Store, StoreError, check
from nbdsink.store import keys as store_keys
from nbdsink.store.head import Head

BS = 16384
BLOCKS = 32
SIZE = BS * BLOCKS


def _read(store: Store, name: str, offset: int = 0, length: int = SIZE) -> bytes:
    buf = bytearray(length)
    Session(store, Heads(store), name, readonly=True).pread(memoryview(buf), offset)
    return bytes(buf)


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, dict[int, bytes], list[bytes]]:
    """A store with two versions of random blocks; returns its path, the images, the blocks
    of version 1."""
    store = Store(tmp_path / "s", create=True)
    head = Head(store, store.create_volume("vol", SIZE, BS))
    rng = random.Random(5)
    blocks = [rng.randbytes(BS) for _ in range(BLOCKS)]
    head.write(memoryview(b"".join(blocks)), 0)
    head.commit()
    image2 = bytearray(b"".join(blocks))
    image2[3 * BS : 4 * BS] = rng.randbytes(BS)
    head.write(memoryview(image2[3 * BS : 4 * BS]), 3 * BS)
    head.commit()
    store.close()
    return tmp_path / "s", {1: b"".join(blocks), 2: bytes(image2)}, blocks


def _segment_env(store_path: Path) -> lmdb.Environment:
    return lmdb.open(str(store_path / "segments" / "00000001.mdb"), subdir=False, max_dbs=2)


def _flip_chunk(store_path: Path, digest: bytes, in_tail: bool = False) -> None:
    env = _segment_env(store_path)
    db = env.open_db(b"tails" if in_tail else b"chunks")
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(digest, db=db))
        value[-1] ^= 0xFF
        txn.put(digest, bytes(value), db=db)
    env.close()


def test_flipped_bytes_are_found_and_never_served(written: tuple[Path, dict[int, bytes], list[bytes]]) -> None:
    path, images, blocks = written
    from nbdsink.store.chunks import digest

    victim = digest(blocks[7])
    _flip_chunk(path, victim)
    store = Store(path)
    # Reads of the damaged block fail (EIO), of every other block succeed, in both versions.
    for v in (1, 2):
        with pytest.raises(StoreError):
            _read(store, f"vol@{v}", 7 * BS, BS)
        assert _read(store, f"vol@{v}", 0, 7 * BS) == images[v][: 7 * BS]
        assert _read(store, f"vol@{v}", 8 * BS, SIZE - 8 * BS) == images[v][8 * BS :]
    assert check.verify(store).clean  # the structure is intact ...
    report = check.verify(store, full=True)  # ... the data are not
    assert [d.digest for d in report.damaged] == [victim.hex()]
    damage = report.damaged[0]
    assert "checksum" in damage.problem
    assert [(u["volume"], u["block"], u["from_version"], u["to_version"]) for u in damage.uses] == [
        ("vol", 7, 1, 2)]
    assert damage.heal_from_source
    # Heal by content: the same block written again makes every version whole.
    head = Head(store, store.volume("vol"))
    head.write(memoryview(blocks[7]), 7 * BS)
    assert head.commit() is None  # same content as the version: no new version ...
    assert _read(store, "vol@1") == images[1]  # ... and both old versions read back whole
    assert _read(store, "vol@2") == images[2]
    assert check.verify(store, full=True).clean
    store.close()


def test_damage_under_a_pruned_oldest_version_names_the_versions_left(
        written: tuple[Path, dict[int, bytes], list[bytes]]) -> None:
    """Pruning the oldest version leaves its entries under its own number (the next version
    reads them): a report names the versions that exist, and skips an entry no version
    shows any more."""
    from nbdsink.store import reclaim
    from nbdsink.store.chunks import digest
    from nbdsink.store.retention import Policy

    path, images, blocks = written
    store = Store(path)
    assert reclaim.prune(store, store.volume("vol"), Policy(keep_last=1)).pruned == [1]
    store.close()
    _flip_chunk(path, digest(blocks[7]))  # read by version 2 from version 1's entry
    _flip_chunk(path, digest(blocks[3]))  # version 1's block 3: no version shows it now
    store = Store(path)
    report = check.verify(store, full=True)
    uses = {d.digest: [(u["volume"], u["block"], u["from_version"], u["to_version"])
                       for u in d.uses] for d in report.damaged}
    assert uses == {digest(blocks[7]).hex(): [("vol", 7, 2, 2)], digest(blocks[3]).hex(): []}
    assert _read(store, "vol@2", 8 * BS, SIZE - 8 * BS) == images[2][8 * BS :]
    store.close()


def test_a_split_chunks_tail(written: tuple[Path, dict[int, bytes], list[bytes]]) -> None:
    path, images, blocks = written
    from nbdsink.store.chunks import digest

    victim = digest(blocks[9])
    _flip_chunk(path, victim, in_tail=True)
    store = Store(path)
    report = check.verify(store, full=True)
    assert [d.digest for d in report.damaged] == [victim.hex()]
    with pytest.raises(StoreError):
        _read(store, "vol@1", 9 * BS, BS)
    assert _read(store, "vol@1", 10 * BS, BS) == images[1][10 * BS : 11 * BS]
    store.close()


def test_a_map_entry_pointing_nowhere(written: tuple[Path, dict[int, bytes], list[bytes]]) -> None:
    path, images, _ = written
    env = lmdb.open(str(path), max_dbs=16)
    db = env.open_db(b"map")
    bogus = bytes(range(32))
    with env.begin(write=True) as txn:
        txn.put(store_keys.map_key(1, 11, 1), bogus, db=db)
    env.close()
    store = Store(path)
    report = check.verify(store)
    assert [d.digest for d in report.damaged] == [bogus.hex()]
    assert "missing" in report.damaged[0].problem
    assert report.damaged[0].uses[0]["block"] == 11
    with pytest.raises(StoreError):
        _read(store, "vol@1", 11 * BS, BS)
    assert _read(store, "vol@1", 12 * BS, BS) == images[1][12 * BS : 13 * BS]
    store.close()


def test_a_damaged_version_record(written: tuple[Path, dict[int, bytes], list[bytes]]) -> None:
    path = written[0]
    env = lmdb.open(str(path), max_dbs=16)
    db = env.open_db(b"versions")
    with env.begin(write=True) as txn:
        txn.put(store_keys.version_key(1, 1), b"{not json", db=db)
    env.close()
    run = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "verify", "--json",
                          "--store", str(path)], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    found = json.loads(run.stdout)
    assert not found["clean"] and "damaged" in found["problems"][0]
    clean = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "verify", "vol@2",
                            "--store", str(path)], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    usage = subprocess.run([sys.executable, "-m", "nbdsink.cli.main", "verify", "--bogus",
                            "--store", str(path)], capture_output=True, text=True)
    assert usage.returncode == 2


@pytest.mark.parametrize("where", ["data", "header"])
def test_reads_of_whole_chunks_check_every_block_of_a_request(tmp_path: Path, where: str) -> None:
    """64 KiB blocks are stored whole, and a read of them takes the read path's common case
    for every block but a partial first or last one: requests of many blocks at any offset
    read back exactly, and one damaged block (its data, or its header) fails every request
    that covers it, never another."""
    bs, blocks = 65536, 24
    store = Store(tmp_path / "s", create=True)
    head = Head(store, store.create_volume("vol", bs * blocks, bs))
    rng = random.Random(9)
    data = [rng.randbytes(bs) for _ in range(blocks)]
    image = b"".join(data)
    head.write(memoryview(image), 0)
    head.commit()
    ranges = [(rng.randrange(bs * blocks - 1), 0) for _ in range(60)]
    ranges = [(off, rng.randint(1, bs * blocks - off)) for off, _ in ranges]
    for off, length in ranges:
        assert _read(store, "vol@1", off, length) == image[off : off + length]
    store.close()

    from nbdsink.store.chunks import digest

    env = _segment_env(tmp_path / "s")
    db = env.open_db(b"chunks")
    with env.begin(write=True) as txn:
        value = bytearray(txn.get(digest(data[10]), db=db))
        value[0 if where == "header" else len(value) // 2] ^= 0x01
        txn.put(digest(data[10]), bytes(value), db=db)
    env.close()
    store = Store(tmp_path / "s")
    for off, length in ranges:
        if off < 11 * bs and off + length > 10 * bs:
            with pytest.raises(StoreError):
                _read(store, "vol@1", off, length)
        else:
            assert _read(store, "vol@1", off, length) == image[off : off + length]
    store.close()


def _damage_refs(path: Path, digest: bytes, damage: str) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    refs = env.open_db(b"refs")
    with env.begin(write=True) as txn:
        right = struct.unpack(">Q", txn.get(digest, db=refs))[0]
        assert right == 2
        if damage == "gone":
            txn.delete(digest, db=refs)
        else:
            txn.put(digest, struct.pack(">Q", 1 if damage == "lower" else 9), db=refs)
    env.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdsink.cli.main", *args],
                          capture_output=True, text=True)


@pytest.mark.parametrize("damage", ["lower", "gone", "higher"])
def test_a_wrong_reference_count_is_found_and_repaired_before_gc_can_lose_data(
        written: tuple[Path, dict[int, bytes], list[bytes]], damage: str,
        tmp_path: Path) -> None:
    """A reference count that disagrees with the map (a damaged page, a flipped bit): too
    low, garbage collection deletes a chunk versions still use (shown on a copy of the
    store). verify names the chunk and sets the count back to the map's; then pruning and
    collecting keep every version left whole."""
    path, images, blocks = written
    # Version 3 writes block 3's first content back: that chunk has two map entries.
    store = Store(path)
    head = Head(store, store.volume("vol"))
    head.write(memoryview(blocks[3]), 3 * BS)
    head.commit()
    store.close()
    images[3] = images[1]
    digest = blake3.blake3(blocks[3]).digest()
    _damage_refs(path, digest, damage)
    unverified = tmp_path / "unverified"
    shutil.copytree(path, unverified)

    found = _cli("verify", "--json", "--store", str(path))
    assert found.returncode == 1, found.stdout + found.stderr
    report = json.loads(found.stdout)
    assert report["damaged_chunks"] == [] and report["refs_repaired"] == 1
    [line] = report["damaged_refs"]
    assert line.startswith(f"chunk {digest.hex()}: reference count ")
    assert ("could delete it" in line) == (damage != "higher")
    again = _cli("verify", "--store", str(path))
    assert again.returncode == 0, again.stdout

    # Pruning version 1 drops its entry of block 3 (version 2 changed the block); version 3
    # still uses the chunk.
    for where in (path, unverified):
        for args in (["prune", "vol", "--keep-last", "2"], ["gc"]):
            done = _cli(*args, "--store", str(where))
            assert done.returncode == 0, done.stdout + done.stderr
    store = Store(path)
    assert _read(store, "vol@2") == images[2]
    assert _read(store, "vol@3") == images[3]
    store.close()
    assert _cli("verify", "--full", "--store", str(path)).returncode == 0
    # Without verify, a count too low lost the chunk.
    store = Store(unverified)
    if damage == "higher":
        assert _read(store, "vol@3") == images[3]
    else:
        with pytest.raises(StoreError):
            _read(store, "vol@3")
    store.close()


def test_an_unused_chunk_left_out_of_garbage_is_found_and_collected(
        written: tuple[Path, dict[int, bytes], list[bytes]]) -> None:
    """A chunk nothing uses whose garbage record is gone (a damaged page) would keep its space
    for ever: verify names it and marks it as garbage again, and gc then deletes it."""
    path, images, blocks = written
    assert _cli("prune", "vol", "--keep-last", "1", "--store", str(path)).returncode == 0
    digest = blake3.blake3(blocks[3]).digest()  # version 1's block 3: now unused
    env = lmdb.open(str(path), max_dbs=16)
    refs, garbage = env.open_db(b"refs"), env.open_db(b"garbage")
    with env.begin(write=True) as txn:
        assert txn.get(digest, db=refs) is None
        assert txn.delete(digest, db=garbage)
    env.close()
    assert _cli("gc", "--store", str(path)).returncode == 0
    store = Store(path)
    assert store.read(lambda r: store.locate(r, digest)) is not None  # leaked: gc skips it
    store.close()

    found = _cli("verify", "--json", "--store", str(path))
    assert found.returncode == 1, found.stdout + found.stderr
    report = json.loads(found.stdout)
    assert report["damaged_refs"] == [f"chunk {digest.hex()}: unused, but not marked as "
                                      "garbage: its space would never be reclaimed"]
    assert report["refs_repaired"] == 1
    assert _cli("gc", "--store", str(path)).returncode == 0
    store = Store(path)
    assert store.read(lambda r: store.locate(r, digest)) is None
    assert _read(store, "vol@2") == images[2]
    store.close()
    assert _cli("verify", "--full", "--store", str(path)).returncode == 0


def test_a_segment_file_deleted_by_hand_gives_eio_not_a_hang(
        written: tuple[Path, dict[int, bytes], list[bytes]]) -> None:
    """Reads of chunks whose segment file is missing fail (EIO) after a few fresh snapshots
    (a compaction elsewhere would have moved the index on), rather than loop for ever;
    verify reports it."""
    path = written[0]
    (path / "segments" / "00000001.mdb").unlink()
    store = Store(path)
    with pytest.raises(StoreError, match="missing"):
        _read(store, "vol@1", 0, BS)
    store.close()
    found = _cli("verify", "--json", "--store", str(path))
    assert found.returncode == 1, found.stdout + found.stderr
    damaged = json.loads(found.stdout)["damaged_chunks"]
    # Every chunk of the volume was in segment 1: each is named, with the blocks using it.
    assert len(damaged) == BLOCKS + 1
    assert all("segment 1 is gone" in d["problem"] and d["uses"] for d in damaged)


# -- verify in worker processes -------------------------------------------------------------


@pytest.fixture
def spread(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """A store of 1,200 chunks over several segments (1 MiB each), two versions: enough
    batches that every worker of verify --full gets some. Returns its path and the blocks
    of version 1."""
    store = Store(tmp_path / "s", create=True, segment_bytes=1 << 20)
    blocks_n, bs = 1200, 4096
    head = Head(store, store.create_volume("vol", blocks_n * bs, bs))
    rng = random.Random(11)
    blocks = [rng.randbytes(bs) for _ in range(blocks_n)]
    head.write(memoryview(b"".join(blocks)), 0)
    head.commit()
    head.write(memoryview(rng.randbytes(bs)), 5 * bs)
    head.commit()
    store.close()
    assert len(list((tmp_path / "s" / "segments").glob("*.mdb"))) >= 3
    return tmp_path / "s", blocks


def _damage_spread(path: Path, blocks: list[bytes]) -> None:
    from nbdsink.store.chunks import digest
    from nbdsink.store.store import Location

    store = Store(path)
    where = {d: store.read(lambda r, d=d: store.locate(r, d)) for d in
             (digest(blocks[7]), digest(blocks[700]), digest(blocks[1150]))}
    store.close()
    for d, loc in where.items():
        assert isinstance(loc, Location)
        env = lmdb.open(str(path / "segments" / f"{loc.segment:08d}.mdb"), subdir=False,
                        max_dbs=2)
        db = env.open_db(b"chunks")
        with env.begin(write=True) as txn:
            value = bytearray(txn.get(d, db=db))
            value[-1] ^= 0xFF
            txn.put(d, bytes(value), db=db)
        env.close()
    env = lmdb.open(str(path), max_dbs=16)
    refs = env.open_db(b"refs")
    with env.begin(write=True) as txn:
        txn.put(digest(blocks[300]), struct.pack(">Q", 7), db=refs)
    env.close()
    # A zeroed leaf of segment 2: the workers must keep away from it as the walk says.
    seg = lm.segment_file(path, 2)
    lm.zero_page(seg, lm.find_pages(seg, "chunks", "leaf")[1].pgno)


def _two_damaged_copies(spread: tuple[Path, list[bytes]], tmp_path: Path) -> tuple[Path, Path]:
    """The store damaged by :func:`_damage_spread`, copied twice: one for verify in one
    process, one for verify in workers (verify quarantines and repairs what it finds)."""
    path, blocks = spread
    _damage_spread(path, blocks)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    shutil.copytree(path, alone)
    shutil.copytree(path, shared)
    return alone, shared


def _fresh_process(code: str) -> Any:
    """Run ``code`` in a new Python process (as the CLI runs: no other thread, so workers
    are forked; a test process has threads left by earlier tests) and parse the JSON it
    prints."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_workers_find_exactly_what_one_process_finds(
        spread: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    """nbdsink verify --full with worker processes (the walk of the environments shared
    out, the chunks re-hashed in batches) reports the same damage, uses and repairs as in
    one process, on two copies of the same damaged store."""
    from nbdsink.store.chunks import digest

    blocks = spread[1]
    alone, shared = _two_damaged_copies(spread, tmp_path)
    walks = _fresh_process(f"""
        import json
        from pathlib import Path
        from nbdsink.store import structure, workers
        with workers.fork_pool(2) as pool:
            walks = [structure.check_store(Path({str(alone)!r})),
                     structure.check_store(Path({str(shared)!r}), pool=pool)]
        print(json.dumps([walk.to_json() for walk in walks]))
        """)
    for walk in walks:
        walk.pop("seconds")
        walk.pop("checked")
    assert walks[0] == walks[1] and walks[0]["environments"] >= 4
    runs = [_cli("verify", "--full", "--json", "--jobs", jobs, "--store", str(p))
            for p, jobs in ((alone, "1"), (shared, "2"))]
    assert [r.returncode for r in runs] == [1, 1], [r.stderr for r in runs]
    one, many = (json.loads(r.stdout) for r in runs)
    assert (one.pop("workers"), many.pop("workers")) == (0, 2)
    one.pop("seconds")
    many.pop("seconds")
    assert one == many
    problems = {d["chunk"]: d["problem"] for d in many["damaged_chunks"]}
    flipped = [digest(blocks[i]).hex() for i in (7, 700, 1150)]
    assert all(d in problems for d in flipped)
    assert sum("checksum" in problems[d] for d in flipped) >= 2
    assert [env["environment"] for env in many["structure"]["damaged"]] == ["segment 2"]
    behind = [d for d, problem in problems.items() if "segment 2" in problem]
    assert len(behind) > 10  # the chunks under the zeroed leaf
    assert all(d["uses"] for d in many["damaged_chunks"])
    assert many["refs_repaired"] == 1 and many["chunks"] == 1201
    assert many["bytes_checked"] == 1201 * 4096
    # Quarantined by the parent as in one process: reads of the damaged blocks give EIO.
    store = Store(shared)
    with pytest.raises(StoreError):
        _read_block(store, 700)
    assert _read_block(store, 701) == blocks[701]
    store.close()


def _read_block(store: Store, block: int) -> bytes:
    buf = bytearray(4096)
    Session(store, Heads(store), "vol@1", readonly=True).pread(memoryview(buf), block * 4096)
    return bytes(buf)


def test_an_error_in_a_worker_is_reported_as_in_one_process(
        spread: tuple[Path, list[bytes]]) -> None:
    """A batch that cannot be checked (a StoreError forced in the check, which the forked
    workers inherit) ends the chunk checks with the same problem, not a traceback."""
    found = _fresh_process(f"""
        import json
        from nbdsink.store import StoreError, check, chunk_check

        def boom(store, part, full):
            raise StoreError("segment 3 unreadable: forced")
        chunk_check.check_batch = check.check_batch = boom
        out = []
        for jobs in (1, 2):
            report = check.verify_store({str(spread[0])!r}, full=True, jobs=jobs)
            out.append([report.clean, report.workers, report.problems])
        print(json.dumps(out))
        """)
    problem = ["chunk index not fully read: segment 3 unreadable: forced"]
    assert found == [[False, 0, problem], [False, 2, problem]]


def test_an_interrupted_verify_leaves_no_worker_and_a_sound_store(
        spread: tuple[Path, list[bytes]]) -> None:
    """Ctrl-C in the middle of verify --full (KeyboardInterrupt in the parent while the
    workers check chunks): it propagates, every worker is gone, and the store verifies
    clean afterwards (no reader left behind keeps it from anything)."""
    found = _fresh_process(f"""
        import json, multiprocessing
        from nbdsink.store import check

        def interrupt(done, total):
            if done < total:
                raise KeyboardInterrupt
        try:
            check.verify_store({str(spread[0])!r}, full=True, jobs=2, progress=interrupt)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        left = len(multiprocessing.active_children())
        report = check.verify_store({str(spread[0])!r}, full=True, jobs=2)
        print(json.dumps([interrupted, left, report.clean, report.workers, report.chunks]))
        """)
    assert found == [True, 0, True, 2, 1201]


def test_workers_keep_away_from_damage_that_could_not_be_recorded(
        spread: tuple[Path, list[bytes]], tmp_path: Path) -> None:
    """When the walk's findings cannot be recorded in the store (a read-only copy: here the
    save fails by force), the workers are handed the walk itself: they keep away from the
    zeroed segment leaf exactly as one process does."""
    alone, shared = _two_damaged_copies(spread, tmp_path)
    found = _fresh_process(f"""
        import json
        from nbdsink.store import check, structure

        def refuse(store_dir, report):
            raise OSError(30, "Read-only file system")
        structure.save = refuse
        out = []
        for where, jobs in (({str(alone)!r}, 1), ({str(shared)!r}, 2)):
            report = check.verify_store(where, full=True, jobs=jobs).to_json()
            report.pop("seconds")
            out.append(report)
        print(json.dumps(out))
        """)
    one, many = found
    assert (one.pop("workers"), many.pop("workers")) == (0, 2)
    assert one == many
    assert [env["environment"] for env in many["structure"]["damaged"]] == ["segment 2"]
    assert any("could not be recorded" in p for p in many["problems"])
    assert sum("segment 2" in d["problem"] for d in many["damaged_chunks"]) > 10


def test_kill_9_of_verify_leaves_no_worker_running(spread: tuple[Path, list[bytes]]) -> None:
    """kill -9 of `nbdsink verify --full` as soon as its workers exist: they end by
    themselves (their parent's end of the pipes closed), and the store verifies clean."""
    path = spread[0]
    proc = subprocess.Popen([sys.executable, "-m", "nbdsink.cli.main", "verify", "--full",
                             "--jobs", "2", "--store", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found: list[int] = []
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found += [int(c) for c in (task / "children").read_text().split()]
        return found

    def running(pid: int) -> bool:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        return "\nState:\tZ" not in status  # a zombie has ended (its new parent reaps it)

    deadline = time.monotonic() + 10
    workers: list[int] = []
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = children()
    assert len(workers) == 2, "verify ended before its workers were seen"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(running(w) for w in workers)
    after = _cli("verify", "--full", "--json", "--store", str(path))
    assert after.returncode == 0, after.stdout + after.stderr
    assert json.loads(after.stdout)["chunks"] == 1201
