"""Segment files: their names are made durable, and a segment deleted (compacted away by a
server in another process) while a reader opens it is gone.

Deleted while opened: LMDB opens data files with O_CREAT, so the open used to make a new,
empty file in its place, and the reader found the chunks "missing" (verify then quarantined
sound chunks) instead of reading again where the index had moved them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lmdb
import pytest

from nbdsink.store import segments as segments_module
from nbdsink.store.chunks import encode_chunk
from nbdsink.store.segments import SegmentGone, SegmentSet


def _one_segment(tmp_path: Path) -> tuple[Path, int, bytes, bytes]:
    store_dir = tmp_path / "store"
    writer = SegmentSet(store_dir)
    digest, chunk = b"d" * 32, encode_chunk(b"x" * 65536)
    writer.write(7, [(digest, chunk)])
    writer.close()
    return store_dir, 7, digest, chunk


def test_a_segment_deleted_during_the_open_is_gone_and_not_recreated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_dir, sid, _, _ = _one_segment(tmp_path)
    reader = SegmentSet(store_dir)
    path = reader.path(sid)
    real_open = lmdb.open

    def deleted_first(*args: Any, **kwargs: Any) -> Any:
        # What a server's retire does in the instant between the reader's look and its open.
        path.unlink()
        path.with_name(path.name + "-lock").unlink()
        return real_open(*args, **kwargs)

    monkeypatch.setattr(segments_module.lmdb, "open", deleted_first)
    with pytest.raises(SegmentGone):
        reader.acquire(sid)
    assert not path.exists(), "the open left an empty segment file behind"
    assert not path.with_name(path.name + "-lock").exists()


def test_a_segment_file_without_databases_is_gone_for_a_reader(tmp_path: Path) -> None:
    store_dir, sid, digest, chunk = _one_segment(tmp_path)
    path = SegmentSet(store_dir).path(sid)
    path.unlink()
    # Another reader's open made an empty file in its place (before it saw the deletion).
    lmdb.open(str(path), subdir=False, max_dbs=2).close()
    reader = SegmentSet(store_dir)
    with pytest.raises(SegmentGone):
        reader.read(sid, digest)
    # A writer's open (the active segment after a crash before its first commit) repairs it.
    reader.write(sid, [(digest, chunk)])
    assert reader.read(sid, digest) == bytes(chunk)
    reader.close()


def test_an_intact_segment_reads(tmp_path: Path) -> None:
    store_dir, sid, digest, chunk = _one_segment(tmp_path)
    reader = SegmentSet(store_dir)
    assert reader.read(sid, digest) == bytes(chunk)
    reader.close()


def test_a_new_segment_file_name_is_made_durable_once(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(segments_module, "_sync_dir", synced.append)
    segs = SegmentSet(tmp_path / "store")
    segs.write(1, [(b"a" * 32, encode_chunk(b"a" * 4096))])
    segs.write(1, [(b"b" * 32, encode_chunk(b"b" * 4096))])
    assert synced == [segs.dir]  # the first commit into a new file, and only that one
    segs.write(2, [(b"c" * 32, encode_chunk(b"c" * 4096))])
    assert synced == [segs.dir, segs.dir]
    segs.close()
    reopened = SegmentSet(tmp_path / "store")
    reopened.write(2, [(b"d" * 32, encode_chunk(b"d" * 4096))])  # an existing file: no sync
    assert len(synced) == 2
    reopened.close()
