"""replicate --once --verify: a write the tracker cannot see is found and sent; a chunk damaged
in the store is healed from the source; only digests are compared."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lmdb
import pytest

from .helpers import loop_device, make_image, run
from .rig import Sender, Server, nbdsink, stop_tracker

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 64 * MiB
CS = 64 << 10


def _replicate(dev: str, srv: Server, state: Path, *extra: str) -> None:
    proc = run(*Sender.command(), dev, srv.uri("vol"), "--state", str(state), "--once", *extra,
               check=False)
    assert proc.returncode == 0, proc.stderr


def _version_bytes(srv: Server, version: int, tmp: Path) -> bytes:
    out = tmp / f"v{version}.img"
    run("nbdcopy", srv.uri(f"vol@{version}"), str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def test_verify_finds_an_untracked_write_and_heals_a_damaged_chunk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    with open(img, "r+b") as f:
        f.write(os.urandom(SIZE))
    original = img.read_bytes()
    srv = Server(tmp_path / "store", tmp_path / "nbd.sock")
    nbdsink("volume", "create", "vol", "--size", str(SIZE), "--store", str(srv.store))
    srv.start()
    state = tmp_path / "state"
    try:
        with loop_device(img) as dev:
            try:
                _replicate(dev, srv, state)
                assert _version_bytes(srv, 1, tmp_path) == original
                # A write the tracker cannot see: to the loop device's backing file, not
                # through the block layer.
                with open(img, "r+b") as f:
                    f.seek(10 * CS + 100)
                    f.write(b"untracked" * 100)
                    f.flush()
                    os.fsync(f.fileno())
                _replicate(dev, srv, state, "--verify")
                status = json.loads(nbdsink("status", "--state", str(state), "--json", check=False).stdout)
                assert status["verify"]["chunks_differed"] == 1
                assert status["verify"]["chunks_compared"] == SIZE // CS
                latest = srv.versions("vol")[-1]["version"]
                assert _version_bytes(srv, latest, tmp_path) == img.read_bytes()

                # Damage in the store: a chunk of version 1 that the source still holds.
                srv.stop()
                seg = lmdb.open(str(srv.store / "segments" / "00000001.mdb"), subdir=False,
                                max_dbs=2, map_size=1 << 30)
                chunks = seg.open_db(b"chunks")
                with seg.begin(write=True) as txn:
                    digest, value = next(iter(txn.cursor(db=chunks)))
                    damaged = bytearray(value)
                    damaged[-7] ^= 0x55
                    txn.put(digest, bytes(damaged), db=chunks)
                seg.close()
                found = nbdsink("verify", "--full", "--json", "--store", str(srv.store),
                                check=False)
                assert found.returncode == 1
                assert json.loads(found.stdout)["damaged_chunks"][0]["heal_from_source"]
                srv.start()
                _replicate(dev, srv, state, "--verify")
                status = json.loads(nbdsink("status", "--state", str(state), "--json", check=False).stdout)
                assert status["verify"]["chunks_differed"] >= 1
                srv.stop()
                clean = nbdsink("verify", "--full", "--store", str(srv.store), check=False)
                assert clean.returncode == 0, clean.stdout
                srv.start()
                # Version 1 reads back whole again: healed by content.
                assert _version_bytes(srv, 1, tmp_path) == original
            finally:
                stop_tracker(dev)
    finally:
        srv.stop()
