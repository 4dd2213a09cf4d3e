"""A store written by the nbdsink that kept chunks in its main environment (format 2, and the
older format 1) is upgraded when opened: every version reads back byte for byte, pending
writes resume, new writes go to segments, and the old chunks stay readable until compaction
moves them out."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from nbdsink.server.session import Heads, Session
from nbdsink.store import Store
from nbdsink.store.head import Head

REPO = Path(__file__).resolve().parents[2]
FORMAT_2_COMMIT = "22afef0"
"""The last commit whose store is format 2 (chunks in the main environment)."""

WRITER = """
import random, sys
from nbdsink.store import Store
from nbdsink.store.head import Head
path = sys.argv[1]
store = Store(path, create=True)
for name, bs in (("small", 16384), ("large", 65536)):
    rng = random.Random(bs)
    vol = store.create_volume(name, 64 * bs, bs)
    head = Head(store, vol)
    for version in range(3):
        head.write(memoryview(rng.randbytes(8 * bs)), version * 4 * bs)
        head.write(memoryview(bytes(bs)), 40 * bs)
        head.write(memoryview(b"dup" * (bs // 3) + b"d" * (bs % 3)), (50 + version) * bs)
        head.commit()
    head.write(memoryview(rng.randbytes(2 * bs)), 60 * bs)
    head.save()  # pending, saved, not committed
store.close()
"""


def _old_nbdsink(tmp: Path) -> Path:
    """The package as that commit had it, to write a store the way users' stores were."""
    out = tmp / "old"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", FORMAT_2_COMMIT, "nbdsink"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        pytest.fail(f"cannot read commit {FORMAT_2_COMMIT}: {archive.stderr.decode()}")
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def _expected_images(path: Path) -> dict[str, bytes]:
    """Every export's bytes, read through the old code itself."""
    reader = """
import json, sys
from nbdsink.store import Store
from nbdsink.server.session import Heads, Session
store = Store(sys.argv[1])
heads = Heads(store)
out = {}
for vol in store.volumes():
    names = [f"{vol.name}@{v.version}" for v in store.versions(vol)] + [vol.name]
    for n in names:
        buf = bytearray(vol.size)
        Session(store, heads, n, readonly=True).pread(memoryview(buf), 0)
        out[n] = buf.hex()
print(json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=str(path.parent / "old"))
    # cwd outside the checkout: "-c" puts the current directory first on sys.path.
    run = subprocess.run([sys.executable, "-c", reader, str(path)], capture_output=True,
                         text=True, env=env, check=True, cwd=path.parent)
    return {k: bytes.fromhex(v) for k, v in json.loads(run.stdout).items()}


def _write_old_store(tmp: Path) -> Path:
    old = _old_nbdsink(tmp)
    path = tmp / "store"
    env = dict(os.environ, PYTHONPATH=str(old))
    subprocess.run([sys.executable, "-c", WRITER, str(path)], env=env, check=True, cwd=tmp)
    return path


def _as_format_1(path: Path) -> None:
    """What a store written before chunks were split holds: whole chunks, format 1."""
    env = lmdb.open(str(path), max_dbs=8)
    meta, chunks, tails = (env.open_db(name) for name in (b"meta", b"chunks", b"chunk_tails"))
    with env.begin(write=True) as txn:
        for digest, tail in list(txn.cursor(db=tails)):
            head = bytearray(txn.get(digest, db=chunks))
            head[0] = 1
            txn.put(digest, bytes(head) + tail, db=chunks)
            txn.delete(digest, db=tails)
        header = json.loads(txn.get(b"format", db=meta))
        txn.put(b"format", json.dumps({**header, "format": 1}).encode(), db=meta)
    env.close()


def _read(store: Store, name: str, size: int) -> bytes:
    buf = bytearray(size)
    Session(store, Heads(store), name, readonly=True).pread(memoryview(buf), 0)
    return bytes(buf)


@pytest.mark.parametrize("old_format", [2, 1])
def test_old_store_is_upgraded_and_reads_back(tmp_path: Path, old_format: int) -> None:
    path = _write_old_store(tmp_path)
    expected = _expected_images(path)
    if old_format == 1:
        _as_format_1(path)
    store = Store(path)
    header = store.read(lambda r: json.loads(bytes(r.txn.get(b"format", db=store._meta))))
    assert header["format"] == 3 and header["upgraded_from"] == old_format
    for name, image in expected.items():
        assert _read(store, name, len(image)) == image, name
    # Pending writes resume; new data go to segments; old and new read side by side.
    for vol in store.volumes():
        head = Head(store, vol)
        bs = vol.block_size
        new = random.Random(9).randbytes(bs)
        head.write(memoryview(new), 61 * bs)
        info = head.commit()
        assert info is not None and info.version == 4
        image = bytearray(expected[vol.name])
        image[61 * bs : 62 * bs] = new
        assert _read(store, f"{vol.name}@4", vol.size) == bytes(image)
    assert store.segments.existing() == [1]
    store.close()
    # Opening again does nothing more.
    store = Store(path)
    for name, image in expected.items():
        if "@" in name:
            assert _read(store, name, len(image)) == image, name
    store.close()
