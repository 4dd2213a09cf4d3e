"""Chunk data in segment environments: one LMDB file per segment, never shrunk, deleted whole.

Why not one file: an LMDB file never gives space back, and freeing many multi-page values
fragments its free list until commits crawl. So chunk data go to the *active* segment; a
segment that reached its size is *sealed* and never written again; a sealed segment whose
live data fell low is compacted away whole by the store (live chunks copied to the active
segment, the index repointed in one transaction of the main environment, then the file
deleted here once no reader of this process still uses it).

A segment holds, like format 2 stores did, a chunk's header and data up to its split point
under its digest in ``chunks`` and the rest (a few bytes, for chunks under 64 KiB) in
``tails`` (see :mod:`nbdsink.store.chunks`).

Segment 0 is special: the chunks a format-2 store kept in its main environment, read in place
until compaction moves them (it is never written).

This module knows files, not the index: :class:`nbdsink.store.store.Store` decides what lives
where.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lmdb

from nbdsink.store.chunks import FORMAT_SPLIT, HEADER_SIZE, check_header, split_point
from nbdsink.store.errors import StoreError, StoreFormatError
from nbdsink.store.lmdb_pages import EnvUnreadable, check_file_covers
from nbdsink.store.writeback import WritebackKicker

_SPLIT_BYTE = bytes([FORMAT_SPLIT])

SEGMENT_DIR = "segments"
DEFAULT_SEGMENT_BYTES = 64 << 20
"""A segment is sealed once it holds this much: small enough that compaction (which copies a
segment's live part) is cheap and that dead data wait in at most one unsealed segment, large
enough that a big store keeps a manageable number of files."""
MAX_OPEN = 256
"""Segment environments kept open at once (each costs a descriptor and a mapping)."""


class SegmentGone(StoreError):
    """The segment was compacted away after the reader looked it up: read again."""


class Segment:
    """One open segment environment."""

    def __init__(self, sid: int, path: Path, map_size: int, create: bool) -> None:
        self.id = sid
        self.path = path
        # LMDB opens a data file with O_CREAT: a segment deleted (compacted away by a server
        # in another process) between a look-up and this open would come back as a new,
        # empty file, and its chunks would look missing, not gone. Holding the file open
        # first tells the two apart.
        pinned = None if create else _pin(sid, path)
        self.unnamed = create and not path.exists()
        """Created here, and its directory entry not yet made durable (see SegmentSet.write)."""
        try:
            self._open(path, map_size, create, pinned)
        finally:
            if pinned is not None:
                os.close(pinned)
        self.page_size = int(self.env.stat()["psize"])
        self.users = 0
        self.retired = False
        # Starts the disk on a commit's pages while LMDB still copies them (see writeback.py).
        self.writeback = WritebackKicker(path)

    def _open(self, path: Path, map_size: int, create: bool, pinned: int | None) -> None:
        try:
            # LMDB maps the whole map size: a tree page past the end of a truncated file
            # would be a SIGBUS in the reader that follows a pointer to it. Refused here, the
            # segment's chunks are EIO and everything else is served.
            if path.exists() and path.stat().st_size:
                check_file_covers(path)
        except (EnvUnreadable, OSError) as exc:
            raise StoreError(f"cannot open segment {path}: {exc}") from None
        try:
            # Readahead stays on (LMDB's default): a chunk is a run of contiguous overflow
            # pages, and the chunks of one write are neighbours. Off, a read of pages not in
            # memory faults them in 4 KiB at a time: a full read of a 512 MiB version after
            # a restart took 3.6 s with it off, 0.66 s with it on (nbdkit file: 0.5 s).
            # metasync: a segment commit must be durable when it returns, meta page included.
            # The main environment's transaction that indexes its chunks (or, in compaction,
            # repoints them here before the old segment is deleted) follows at once; without
            # it, a power cut kept the index and lost the page that makes the chunks
            # reachable (tests/vm/test_power_cut.py: a FLUSHed version read EIO).
            self.env = lmdb.open(str(path), map_size=map_size, max_dbs=2, subdir=False,
                                 create=create, metasync=True, sync=True, max_readers=512)
        except lmdb.Error as exc:
            if not path.exists():
                raise SegmentGone(f"segment {self.id} is gone") from None
            raise StoreError(f"cannot open segment {path}: {exc}") from exc
        if pinned is not None and not _same_file(pinned, path):
            self.env.close()
            _remove_recreated(path, pinned)
            raise SegmentGone(f"segment {self.id} is gone (deleted while it was opened)")
        if pinned is not None and not self.env.stat()["entries"]:
            # No databases: a file a crash left before its first commit, or one that another
            # reader's open recreated as above. No chunk the index places can be in it.
            self.env.close()
            raise SegmentGone(f"segment {self.id} holds no chunks (gone)")
        # A crash between creating the file and the first commit leaves a file without its
        # databases: nothing was ever stored in it, so creating them empty is the repair.
        self.chunks = self.env.open_db(b"chunks")
        self.tails = self.env.open_db(b"tails")

    def used_bytes(self) -> int:
        """Bytes of the file's pages in use (what a full segment is measured by)."""
        info = self.env.info()
        return (int(info["last_pgno"]) + 1) * self.page_size

    def close(self) -> None:
        self.writeback.close()
        self.env.close()


def _pin(sid: int, path: Path) -> int:
    """A descriptor of segment ``sid``'s data file as it is now (SegmentGone: none)."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentGone(f"segment {sid} is gone") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    pinned = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (pinned.st_dev, pinned.st_ino)


def _remove_recreated(path: Path, pinned: int) -> None:
    """Delete the empty file (and lock file) an open made in place of a deleted segment:
    segment ids are never reused, so nothing will ever look for it again."""
    if os.fstat(pinned).st_nlink:
        return  # the segment file itself is still there under another name: leave it be
    _remove_files(path)


def _remove_files(path: Path) -> None:
    """Delete a segment's data file and LMDB's lock file beside it (either may be gone)."""
    for p in (path, path.with_name(path.name + "-lock")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def copy_stored(stored: memoryview | bytes, tail: memoryview | bytes | None,
                dest: memoryview, start: int, what: str) -> None:
    """Copy a stored chunk's data from ``start`` into all of ``dest`` (header checked)."""
    fmt, length = check_header(stored)
    end = start + len(dest)
    cut = len(stored) - HEADER_SIZE
    if end <= cut:
        dest[:] = stored[HEADER_SIZE + start : HEADER_SIZE + end]
        return
    if fmt != FORMAT_SPLIT or tail is None or cut + len(tail) != length or end > length:
        raise StoreFormatError(f"chunk {what} is incomplete (tail missing or short)")
    if start < cut:
        dest[: cut - start] = stored[HEADER_SIZE + start :]
        dest[cut - start :] = tail[: end - cut]
    else:
        dest[:] = tail[start - cut : end - cut]


class SegmentSet:
    """The segment files of one store, opened on demand (a bounded LRU) and counted while
    readers use them, so that a retired segment is closed and deleted only once unused."""

    def __init__(self, store_dir: Path, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.dir = store_dir / SEGMENT_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self._open: OrderedDict[int, Segment] = OrderedDict()
        self._retired: set[int] = set()
        self._lock = threading.Lock()
        self.write_lock = threading.Lock()
        """Held while new chunks are written to the active segment."""
        self.compaction_lock = threading.Lock()
        """Held while a compaction writes moved chunks to its own segment."""
        self.guard: Callable[[int, bytes], None] | None = None
        """Raises for a chunk whose lookup could reach a damaged page of its segment (set by
        the store while it knows of such damage; see structure.py)."""

    def path(self, sid: int) -> Path:
        return self.dir / f"{sid:08d}.mdb"

    def _map_size(self) -> int:
        # Room for a full segment plus the last batch that crossed the line, and LMDB's
        # overhead; the address space is free, the file grows as pages are written.
        return max(4 * self.segment_bytes, 256 << 20)

    def acquire(self, sid: int, create: bool = False) -> Segment:
        """The open segment ``sid``, counted as in use until :meth:`release`."""
        with self._lock:
            if sid in self._retired:
                raise SegmentGone(f"segment {sid} was compacted away")
            seg = self._open.get(sid)
            if seg is None:
                seg = Segment(sid, self.path(sid), self._map_size(), create)
                self._open[sid] = seg
                self._evict()
            else:
                self._open.move_to_end(sid)
            seg.users += 1
            return seg

    def release(self, seg: Segment) -> None:
        with self._lock:
            seg.users -= 1
            if seg.users == 0 and seg.retired:
                self._drop(seg)

    def _evict(self) -> None:
        # Close the least recently used segments nobody is reading.
        for sid in list(self._open):
            if len(self._open) <= MAX_OPEN:
                break
            seg = self._open[sid]
            if seg.users == 0:
                del self._open[sid]
                seg.close()

    def _drop(self, seg: Segment) -> None:
        self._open.pop(seg.id, None)
        seg.close()
        self._unlink(seg.id)

    def _unlink(self, sid: int) -> None:
        _remove_files(self.path(sid))

    def retire(self, sid: int) -> None:
        """``sid`` holds nothing the index points to any more: close and delete it once no
        reader of this process uses it (other processes keep their open mappings valid)."""
        with self._lock:
            self._retired.add(sid)
            seg = self._open.get(sid)
            if seg is None:
                self._unlink(sid)
            elif seg.users == 0:
                self._drop(seg)
            else:
                seg.retired = True

    def write(self, sid: int, chunks: Sequence[tuple[bytes, bytes | bytearray]],
              replace: frozenset[bytes] = frozenset()) -> int:
        """Store ``(digest, encoded chunk)`` pairs in segment ``sid`` and make them durable;
        returns the segment's bytes in use afterwards. Digests it holds already are skipped,
        but for those in ``replace`` (damaged copies, healed by the same content)."""
        need = sum(len(c) for _, c in chunks) + (1 << 20)
        if disk_free(self.dir) < need:
            # LMDB would report a full disk as EIO from its write: say what it is.
            from nbdsink.store.errors import StoreFull

            raise StoreFull(f"disk full: {disk_free(self.dir) >> 20} MiB free in {self.dir}, "
                            f"{need >> 20} MiB needed")
        seg = self.acquire(sid, create=True)
        try:
            try:
                txn = seg.env.begin(write=True)
                try:
                    for digest, chunk in chunks:
                        length = len(chunk) - HEADER_SIZE
                        split = chunk[0] == FORMAT_SPLIT
                        cut = HEADER_SIZE + (split_point(length, seg.page_size) if split else length)
                        view = memoryview(chunk)
                        again = digest in replace
                        if txn.put(digest, view[:cut], db=seg.chunks, overwrite=again) and split:
                            txn.put(digest, view[cut:], db=seg.tails)
                except BaseException:
                    txn.abort()
                    raise
                with seg.writeback.during():
                    txn.commit()
                if seg.unnamed:
                    # The commit made the file's data durable, not its name: a power cut
                    # could leave the index pointing into a file the directory lost.
                    try:
                        _sync_dir(self.dir)
                    except OSError as exc:
                        raise StoreError(f"cannot make segment {sid}'s file durable: "
                                         f"{exc}") from exc
                    seg.unnamed = False
            except lmdb.MapFullError as exc:
                raise StoreError(f"segment {sid} is full ({exc})") from exc
            except lmdb.Error as exc:
                raise _translate(exc, self.dir) from exc
            return seg.used_bytes()
        finally:
            self.release(seg)

    def read(self, sid: int, digest: bytes) -> bytes | None:
        """The whole encoded chunk (header and data, tail joined) or None if absent."""
        seg = self.acquire(sid)
        try:
            with seg.env.begin(buffers=True) as txn:
                stored = txn.get(digest, db=seg.chunks)
                if stored is None:
                    return None
                tail = txn.get(digest, db=seg.tails)
                return bytes(stored) + (bytes(tail) if tail is not None else b"")
        finally:
            self.release(seg)

    def existing(self) -> list[int]:
        """Ids of the segment files on disk."""
        out = []
        for p in self.dir.glob("*.mdb"):
            with contextlib.suppress(ValueError):
                out.append(int(p.stem))
        return sorted(out)

    def file_bytes(self, sid: int) -> int:
        try:
            return os.stat(self.path(sid)).st_blocks * 512
        except FileNotFoundError:
            return 0

    def close(self) -> None:
        with self._lock:
            for seg in self._open.values():
                seg.close()
            self._open.clear()


class SegmentReader:
    """The segment read transactions one store read uses, opened as needed, ended together."""

    def __init__(self, segments: SegmentSet) -> None:
        self.segments = segments
        self._txns: dict[int, tuple[Segment, Any]] = {}

    def get(self, sid: int, digest: bytes) -> tuple[memoryview | None, memoryview | None]:
        """(stored value, tail) of ``digest`` in segment ``sid``; valid until :meth:`close`."""
        if self.segments.guard is not None:
            self.segments.guard(sid, digest)
        entry = self._txns.get(sid)
        if entry is None:
            seg = self.segments.acquire(sid)
            try:
                txn = seg.env.begin(buffers=True)
            except BaseException:
                self.segments.release(seg)
                raise
            entry = self._txns[sid] = (seg, txn)
        seg, txn = entry
        stored = txn.get(digest, db=seg.chunks)
        if stored is None:
            return None, None
        # Only a split chunk has a tail: a whole one (every 64 KiB block) needs no second
        # lookup (one B-tree descent less on every read).
        tail = txn.get(digest, db=seg.tails) if stored[:1] == _SPLIT_BYTE else None
        return stored, tail

    def close(self) -> None:
        for seg, txn in self._txns.values():
            txn.abort()
            self.segments.release(seg)
        self._txns.clear()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


FULL_MARGIN = 16 << 20
"""Below this much free space, a failed write is taken for a full disk."""


def _translate(exc: lmdb.Error, where: Path) -> StoreError:
    from nbdsink.store.errors import StoreFull

    text = str(exc)
    # LMDB reports a write that found the disk full as EIO: tell them apart by the room left.
    if "No space left" in text or disk_free(where) < FULL_MARGIN:
        return StoreFull(f"disk full: {text}")
    return StoreError(f"LMDB error in a segment: {text}")
