"""Damage to LMDB's own pages, in a copy of a real store, under a real server.

For each kind (a map leaf read as zeros, a map branch, a branch pointer led to another
valid leaf, a page pointer past the end of the file, a segment's B-tree and overflow pages,
the chunk index, a truncated file): ``nbdsink verify`` exits 1 and says which environment
and which volumes' blocks or which chunks are affected; ``nbdsink serve`` stays up; every
block either reads back exactly or fails with EIO (never wrong bytes), exactly the blocks
whose lookups could reach the damage fail, and everything else reads correctly.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nbd
import pytest

from nbdsink import testing_lmdb as lm
from nbdsink.store import Store
from nbdsink.store import keys as store_keys
from nbdsink.store.chunks import digest as chunk_digest
from nbdsink.store.head import Head
from nbdsink.store.lmdb_pages import Damage, check_env
from nbdsink.testing import ServerProcess, run_cli

BS = 4096
BLOCKS = 4096
SIZE = BS * BLOCKS
VERSIONS = 3
REQUEST = 1 << 20


@dataclass
class Base:
    path: Path
    images: dict[tuple[str, int], bytes]
    ids: dict[str, int]
    segment_of: dict[bytes, int]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    """Two volumes of 4096 blocks, three versions each (the map is three levels deep), over
    several 8 MiB segments."""
    path = tmp_path_factory.mktemp("base") / "store"
    store = Store(path, create=True, segment_bytes=8 << 20)
    rng = random.Random(1)
    images: dict[tuple[str, int], bytes] = {}
    ids = {}
    for name in ("a", "b"):
        vol = store.create_volume(name, SIZE, BS)
        ids[name] = vol.id
        head = Head(store, vol)
        image = bytearray(rng.randbytes(SIZE))
        head.write(memoryview(image), 0)
        head.commit()
        images[(name, 1)] = bytes(image)
        for v in range(2, VERSIONS + 1):
            for _ in range(BLOCKS // 8):
                b = rng.randrange(BLOCKS)
                image[b * BS : (b + 1) * BS] = rng.randbytes(BS)
                head.write(memoryview(image[b * BS : (b + 1) * BS]), b * BS)
            head.commit()
            images[(name, v)] = bytes(image)
    digests = {chunk_digest(img[b * BS : (b + 1) * BS]) for img in images.values()
               for b in range(BLOCKS)}
    segment_of = {d: loc.segment for d in digests
                  if (loc := store.read(lambda r, d=d: store.locate(r, d))) is not None}
    store.close()
    return Base(path, images, ids, segment_of)


@pytest.fixture
def copy(base: Base, tmp_path: Path) -> Path:
    dest = tmp_path / "store"
    shutil.copytree(base.path, dest)
    return dest


def verify(store: Path) -> tuple[int, dict[str, object], str]:
    text = run_cli("verify", "--store", str(store), check=False)
    js = run_cli("verify", "--json", "--store", str(store), check=False)
    assert text.returncode == js.returncode, text.stderr
    return js.returncode, json.loads(js.stdout), text.stdout


def read_blocks(srv: ServerProcess, export: str) -> dict[int, bytes | None]:
    """Every block of the export: its bytes, or None where the server answered EIO (a
    request that fails is read again block by block)."""
    h = nbd.NBD()
    h.connect_uri(srv.uri(export))
    out: dict[int, bytes | None] = {}
    try:
        per = REQUEST // BS
        for first in range(0, BLOCKS, per):
            try:
                data = h.pread(REQUEST, first * BS)
                out.update({first + i: data[i * BS : (i + 1) * BS] for i in range(per)})
                continue
            except nbd.Error as exc:
                assert exc.errnum == errno.EIO, exc
            for b in range(first, first + per):
                try:
                    out[b] = h.pread(BS, b * BS)
                except nbd.Error as exc:
                    assert exc.errnum == errno.EIO, exc
                    out[b] = None
    finally:
        h.shutdown()
    return out


def check_reads(srv: ServerProcess, base: Base, failing: Callable[[str, int, int], bool]) -> int:
    """Read every version of both volumes: a block fails (EIO) exactly when ``failing(volume,
    version, block)``, and every other block is exactly what was written. The number of
    failed blocks."""
    failed = 0
    for (name, v), image in sorted(base.images.items()):
        got = read_blocks(srv, f"{name}@{v}")
        for b in range(BLOCKS):
            expected = image[b * BS : (b + 1) * BS]
            if failing(name, v, b):
                assert got[b] is None, f"{name}@{v} block {b} should fail"
                failed += 1
            else:
                assert got[b] == expected, f"{name}@{v} block {b} is wrong or failed"
    assert srv.alive
    return failed


def guards(data_file: Path, **kw: object) -> list[Damage]:
    found = check_env(data_file, punched=data_file.name != "data.mdb")
    assert found.damage, "the walk finds the damage"
    return found.damage


def map_failing(base: Base, damage: list[Damage]) -> Callable[[str, int, int], bool]:
    def failing(name: str, v: int, b: int) -> bool:
        key = store_keys.map_key(base.ids[name], b, v)
        return any(d.db == "map" and d.guards(key) for d in damage)
    return failing


def chunk_failing(base: Base, damage: list[Damage], sid: int | None
                  ) -> Callable[[str, int, int], bool]:
    def failing(name: str, v: int, b: int) -> bool:
        d = chunk_digest(base.images[(name, v)][b * BS : (b + 1) * BS])
        if sid is not None and base.segment_of[d] != sid:
            return False
        return any(g.guards(d) for g in damage) if damage else True
    return failing


@pytest.fixture
def serve(copy: Path, tmp_path: Path) -> Iterator[Callable[[], ServerProcess]]:
    servers: list[ServerProcess] = []

    def start() -> ServerProcess:
        srv = ServerProcess(copy, tmp_path / "nbd.sock")
        servers.append(srv.start())
        return srv
    yield start
    for srv in servers:
        srv.kill()


def test_a_map_leaf_read_as_zeros(base: Base, copy: Path, serve: Callable[[], ServerProcess]
                                  ) -> None:
    """The page LMDB aborts on (a failed assertion) when a cursor steps onto it."""
    leaf = lm.find_pages(lm.main_file(copy), "map", "leaf")[40]
    lm.zero_page(lm.main_file(copy), leaf.pgno)
    damage = guards(lm.main_file(copy))
    code, _, text = verify(copy)
    assert code == 1
    assert f"map: page {leaf.pgno}" in text and "volume a: blocks" in text, text
    srv = serve()
    assert check_reads(srv, base, map_failing(base, damage)) > 0
    assert_read_only(srv, base)


def assert_read_only(srv: ServerProcess, base: Base) -> None:
    """A store whose main environment is damaged takes no writes: its heads are served
    read-only (what they read is checked like the versions)."""
    h = nbd.NBD()
    h.connect_uri(srv.uri("b"))
    assert h.is_read_only()
    with pytest.raises(nbd.Error):
        h.pwrite(bytes(BS), 0)
    h.shutdown()
    assert srv.alive


def test_a_map_branch_read_as_zeros(base: Base, copy: Path,
                                    serve: Callable[[], ServerProcess]) -> None:
    branch = lm.find_pages(lm.main_file(copy), "map", "branch", depth=2)[1]
    lm.zero_page(lm.main_file(copy), branch.pgno)
    damage = guards(lm.main_file(copy))
    code, _, text = verify(copy)
    assert code == 1 and f"map: page {branch.pgno}" in text, text
    srv = serve()
    # A branch page covers many leaves: hundreds of blocks, in every version. More failed
    # reads than LMDB has reader slots (512): a failed read leaves none behind.
    assert check_reads(srv, base, map_failing(base, damage)) > 600
    assert_read_only(srv, base)


def test_a_branch_pointer_led_to_another_valid_leaf(base: Base, copy: Path,
                                                    serve: Callable[[], ServerProcess]) -> None:
    """The damage LMDB cannot see: every page it meets is sound, but a lookup below the
    damaged pointer lands in another part of the map (measured before the structural check:
    blocks read as zeros, and a reader looping for ever). The walk finds the page reached
    twice; reads of the blocks below that pointer are refused."""
    data = lm.main_file(copy)
    branch = lm.find_pages(data, "map", "branch", depth=2)[1]
    other = lm.find_pages(data, "map", "leaf")[5]
    lm.redirect_child(data, branch.pgno, 3, other.pgno)
    damage = guards(data)
    code, _, text = verify(copy)
    assert code == 1 and "which another pointer reaches too" in text, text
    srv = serve()
    assert check_reads(srv, base, map_failing(base, damage)) > 0
    assert_read_only(srv, base)


def test_segment_pages(base: Base, copy: Path, serve: Callable[[], ServerProcess]) -> None:
    """A chunk data leaf read as zeros, a tails leaf scrambled, an overflow page's header
    wrong, a branch pointer out of range: the chunks whose lookups reach them are
    quarantined (EIO, and healed when written again); the main environment is sound, so
    the store still takes writes."""
    seg1, seg2, seg3 = (lm.segment_file(copy, sid) for sid in (1, 2, 3))
    lm.zero_page(seg1, lm.find_pages(seg1, "chunks", "leaf")[3].pgno)
    lm.scramble_page(seg2, lm.find_pages(seg2, "tails", "leaf")[2].pgno, seed=2)
    ov = lm.find_pages(seg3, "chunks", "overflow")[10]
    lm.write_at(seg3, ov.pgno * lm.page_size(seg3) + 12, b"\3\0\0\0")  # the page count
    branch = lm.find_pages(seg3, "chunks", "branch", depth=1)[0]
    lm.redirect_child(seg3, branch.pgno, 2, 10 << 20)
    damage = {sid: [d for d in guards(f) if not d.header_only]
              for sid, f in ((1, seg1), (2, seg2), (3, seg3))}
    code, report, text = verify(copy)
    assert code == 1, text
    assert {e["environment"] for e in report["structure"]["damaged"]} == {  # type: ignore[index]
        "segment 1", "segment 2", "segment 3"}
    assert "overflow page header is wrong" in text and "used by a versions" in text, text

    def failing(name: str, v: int, b: int) -> bool:
        return any(chunk_failing(base, d, sid)(name, v, b) for sid, d in damage.items())
    srv = serve()
    assert check_reads(srv, base, failing) > 0
    # The main environment is sound: the head takes writes, and writing a damaged block's
    # content again heals it in every version.
    victim = next((name, v, b) for (name, v) in sorted(base.images) for b in range(BLOCKS)
                  if failing(name, v, b))
    name, v, b = victim
    block = base.images[(name, v)][b * BS : (b + 1) * BS]
    h = nbd.NBD()
    h.connect_uri(srv.uri("b"))
    h.pwrite(block, 0)
    h.flush()
    h.shutdown()
    h = nbd.NBD()
    h.connect_uri(srv.uri(f"{name}@{v}"))
    assert h.pread(BS, b * BS) == block
    h.shutdown()
    assert srv.alive


def test_truncated_segments(base: Base, copy: Path, serve: Callable[[], ServerProcess]) -> None:
    """A segment cut short, and one whose meta page claims pages past its end (a page
    pointer past the end of the file: SIGBUS in LMDB): refused when opened, so their chunks
    are EIO and everything else is served."""
    lm.truncate(lm.segment_file(copy, 1), 40)
    lm.claim_pages(lm.segment_file(copy, 3), 1000)
    code, _, text = verify(copy)
    assert code == 1 and "truncated" in text and "every chunk of segment 1" in text, text
    assert "every chunk of segment 3" in text, text
    srv = serve()

    def failing(name: str, v: int, b: int) -> bool:
        d = chunk_digest(base.images[(name, v)][b * BS : (b + 1) * BS])
        return base.segment_of[d] in (1, 3)
    assert check_reads(srv, base, failing) > 0


@pytest.mark.parametrize("how", ["truncated", "pointer past the end"])
def test_a_truncated_main_environment(base: Base, copy: Path, tmp_path: Path, how: str) -> None:
    """Every read needs the main environment: one cut short (or whose meta page claims
    pages past its end) is refused with a clear error, before LMDB could fault on it."""
    data = lm.main_file(copy)
    if how == "truncated":
        lm.truncate(data, 30)
    else:
        first = lm.claim_pages(data, 1000)
        lm.redirect_child(data, lm.find_pages(data, "map", "branch", depth=1)[0].pgno, 1,
                          first + 500)
    code, _, text = verify(copy)
    assert code == 1 and "truncated" in text and "everything in it" in text, text
    srv = ServerProcess(copy, tmp_path / "nbd.sock")
    with pytest.raises(RuntimeError, match="truncated"):
        srv.start()


def test_a_damaged_index_page(base: Base, copy: Path, serve: Callable[[], ServerProcess]) -> None:
    data = lm.main_file(copy)
    leaf = lm.find_pages(data, "index", "leaf")[20]
    lm.scramble_page(data, leaf.pgno, seed=3)
    damage = guards(data)
    code, _, text = verify(copy)
    assert code == 1 and "index entry is on a damaged page" in text, text
    srv = serve()
    assert check_reads(srv, base, chunk_failing(base, damage, None)) > 0
    assert_read_only(srv, base)


def test_damage_found_while_serving(base: Base, copy: Path,
                                    serve: Callable[[], ServerProcess]) -> None:
    """A page goes bad under a running server; 'nbdsink verify' finds it, and the server
    (which reloads the record) keeps every later read away from it."""
    srv = serve()
    assert check_reads(srv, base, lambda *_: False) == 0
    data = lm.main_file(copy)
    leaf = lm.find_pages(data, "map", "leaf")[70]
    lm.zero_page(data, leaf.pgno)
    damage = guards(data)
    code, _, text = verify(copy)
    assert code == 1 and "unreadable: volume" in text, text
    deadline = time.monotonic() + 15
    while "maintenance stopped" not in srv.log.read_text():
        assert time.monotonic() < deadline, "the server did not take the record"
        time.sleep(0.1)
    assert check_reads(srv, base, map_failing(base, damage)) > 0


def test_serve_walks_the_main_environment_before_it_serves(
        base: Base, copy: Path, serve: Callable[[], ServerProcess]) -> None:
    """No verify ran: the server's own walk at start finds a map leaf read as zeros (LMDB
    aborts the process on it: every client gone), and the reads that would meet it fail
    with EIO instead."""
    leaf = lm.find_pages(lm.main_file(copy), "map", "leaf")[55]
    lm.zero_page(lm.main_file(copy), leaf.pgno)
    damage = guards(lm.main_file(copy))
    srv = serve()
    assert check_reads(srv, base, map_failing(base, damage)) > 0
    assert_read_only(srv, base)


def test_a_bookkeeping_page(base: Base, copy: Path, serve: Callable[[], ServerProcess]) -> None:
    """The segments' states (what compaction and the start of a server read) read as
    zeros: reads need none of it and are all served; the store is read-only, and no
    segment file is deleted on its word."""
    data = lm.main_file(copy)
    page = lm.find_pages(data, "segments", "leaf")[0]
    lm.zero_page(data, page.pgno)
    before = sorted(p.name for p in (copy / "segments").glob("*.mdb"))
    assert len(before) >= 2
    code, _, text = verify(copy)
    assert code == 1 and "database segments" in text, text
    srv = serve()
    assert check_reads(srv, base, lambda *_: False) == 0
    assert_read_only(srv, base)
    assert sorted(p.name for p in (copy / "segments").glob("*.mdb")) == before
