"""The LMDB store: volumes, versions, the block map, the chunk index, and chunk data.

The **main environment** (``data.mdb`` in the store directory) is the index and the record,
with named sub-databases (keys in :mod:`nbdsink.store.keys`):

- ``meta``:     b"format" -> JSON header; b"next_volume_id", b"next_segment" -> counters;
                b"active_segment", b"compaction_segment" -> where new and moved chunks go
- ``volumes``:  name -> JSON {id, size, block_size, created, parent, base, retention}
- ``versions``: (volume id, version) -> JSON record of a committed version
- ``map``:      (volume id, block, ~version) -> 32-byte digest, or b"" for an all-zero block
- ``index``:    digest -> segment u32 | length u32 | xxh3-64 of the data u64 | flags u8
- ``seg_chunks``: (segment u32, digest) -> b"": what each segment holds that the index uses
- ``segments``: segment u32 -> JSON {state: active|sealed|retired, live: bytes indexed there}
- ``refs``:     digest -> u64 number of map entries (of any version, pending ones included)
- ``garbage``:  digest -> time (f64) its references fell to zero
- ``pins``:     (volume id, version) -> JSON {note, time}
- ``changes``:  (volume id, version, block) -> b"": the blocks each version has map entries
  for, so that pruning a version costs what it changed
- ``pruning``:  (volume id, version) -> JSON {into}: a version being pruned (its record is
  gone; its entries are still being merged into the next version)
- ``holes``:    (segment id, digest) -> u64 id of the transaction that swept the chunk: its
  pages are to be punched out of the segment file once sealed and no reader is older
- ``pending``:  volume id -> JSON counters of the pending (uncommitted) version
- ``chunks``, ``chunk_tails``: chunk data of a format-2 store, read in place as segment 0
  until compaction moves them out

Chunk **data** live in segment environments (:mod:`nbdsink.store.segments`). A batch is saved
in two steps: its new chunks are written to the active segment and made durable, and only
then does one transaction of the main environment index them and record the blocks (and, at
a FLUSH, the version). A crash in between leaves unindexed bytes in the segment, which
compaction drops; it never leaves an index entry without its data.

Reading block b of version V is one ``set_range``: the newest map entry for b at or below V,
then the index, then the segment. Every chunk read is checked against the xxh3 checksum its
index entry keeps: a damaged chunk is EIO, never wrong data. Writing a version costs
O(blocks changed). The pending version P = latest + 1 lives in the same map; no committed
version can see it because every committed version is < P, and the version record that
makes P visible is written in the same transaction as its last blocks.

Durability: environments commit with MDB_NOMETASYNC (data pages are fsynced at every
commit, the meta page is not), which keeps the database intact across a system crash at the
cost of possibly losing the last transaction; :meth:`Store.sync` forces the meta page out, and a
commit of a version always ends with it, so an acknowledged FLUSH is durable. A segment's
chunks are synced fully before the main transaction that indexes them.

Transactions run concurrently (readers never wait for the writer), but growing the map
(``set_mapsize``) requires that no transaction of this process is open: every transaction
holds :class:`_ResizeGuard` shared, a resize holds it exclusively. Write transactions are
also serialised by a plain lock of ours, so a thread never blocks inside LMDB's own writer
mutex while holding the GIL.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import lmdb
import xxhash

from nbdsink.contract import REPLICATION_LABEL
from nbdsink.store import keys
from nbdsink.store.chunks import DIGEST_SIZE, HEADER_SIZE, check_header, whole_header
from nbdsink.store.errors import (
    StoreError,
    StoreFormatError,
    StoreFull,
    StoreLocked,
    UnknownVersion,
    UnknownVolume,
    VolumeExists,
)
from nbdsink.store.lmdb_pages import EnvUnreadable, check_file_covers
from nbdsink.store.segments import (
    DEFAULT_SEGMENT_BYTES,
    FULL_MARGIN,
    SegmentGone,
    SegmentReader,
    SegmentSet,
    copy_stored,
    disk_free,
)
from nbdsink.store.structure import (
    GuardedTxn,
    StoreDamage,
    StoreDamaged,
    StoreReadOnly,
    StructureReport,
    db_names,
    record_mtime,
)
from nbdsink.store.structure import load as load_structure
from nbdsink.store.writeback import WritebackKicker

STORE_FORMAT = 3
"""Format 3 keeps chunk data in segment environments, indexed with a checksum, and counts
references. Format 1 and 2 stores are upgraded when opened: their chunks are indexed where
they are (segment 0) and moved out by compaction."""
READABLE_FORMATS = (1, 2, 3)
DEFAULT_MAP_SIZE = 1 << 30
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 << 20
MAX_VOLUME_NAME = 200
MAX_VOLUME_SIZE = 1 << 60
"""Largest volume: 2^60 bytes (1 EiB), far below what keys and NBD's u64 sizes allow."""
_VOLUME_NAME_FORBIDDEN = set("@/;\0")
READ_AGAIN_LIMIT = 20
"""Fresh snapshots a read takes when a segment it needs was compacted away meanwhile (one
is nearly always enough: the next snapshot points to where its chunks moved)."""
GARBAGE_GRACE_SECONDS = 120.0
"""A chunk without references is deleted only after this long. A writer that took it as
stored (dedup) looked it up while it was referenced, and saves within MAX_BATCH_AGE of that:
by then its own reference revived the chunk, and the sweep, which re-checks, spares it."""

_INDEX = struct.Struct(">IIQB")
_INDEX_SIZE = _INDEX.size
_unpack_index = _INDEX.unpack
_xxh3 = xxhash.xxh3_64_intdigest
_ZEROS = memoryview(bytes(MAX_BLOCK_SIZE))
FLAG_DAMAGED = 1
"""The chunk failed its check: reads give EIO until the same content is written again."""
FLAG_NO_CHECKSUM = 2
"""A chunk of a format-2 store, indexed at the upgrade without reading it."""
_REF = struct.Struct(">Q")
_UNSET = object()
"""A block a clone has no map entry for (what its base shows)."""
_TIME = struct.Struct(">d")

T = TypeVar("T")


def utc_iso(ts: float) -> str:
    """ISO-8601 UTC with microseconds and a Z, e.g. 2026-11-23T10:00:00.123456Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def checksum(data: bytes | bytearray | memoryview) -> int:
    """The check every read of a chunk's data passes (xxh3-64: a few percent of a read)."""
    return int(xxhash.xxh3_64_intdigest(data))


class ChunkDamaged(StoreError):
    """A chunk's data fail their check: the reader gets EIO, never the wrong bytes."""


@dataclass(frozen=True)
class Location:
    """Where a chunk's data are: segment, data length, checksum, flags."""

    segment: int
    length: int
    check: int
    flags: int = 0

    def encode(self) -> bytes:
        return _INDEX.pack(self.segment, self.length, self.check, self.flags)

    @classmethod
    def decode(cls, raw: bytes | memoryview) -> Location:
        if len(raw) != _INDEX.size:
            raise StoreDamaged(f"an index entry of {len(raw)} bytes (damaged page)")
        segment, length, check, flags = _INDEX.unpack(raw)
        return cls(segment, length, check, flags)


@dataclass(frozen=True)
class VolumeInfo:
    """A volume: a fixed-size block device image made of ``block_size`` blocks."""

    name: str
    id: int
    size: int
    block_size: int
    created: float
    parent: str | None = None
    base: int | None = None
    """For a clone: the version of ``parent`` its version 1 is."""
    retention: dict[str, Any] | None = None
    """The retention policy (see :mod:`nbdsink.store.retention`), None to keep everything."""

    @property
    def blocks(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "block_size": self.block_size,
            "created": utc_iso(self.created),
            "parent": self.parent,
            "base": self.base,
            "retention": self.retention,
        }


@dataclass(frozen=True)
class VersionInfo:
    """A committed version (point in time) of a volume."""

    volume: str
    version: int
    timestamp: float
    size: int
    blocks_changed: int
    bytes_stored: int
    chunks_stored: int
    consistency: str = "none"
    labels: dict[str, str] = field(default_factory=dict)
    pinned: str | None = None
    """The pin's note ("" without one), or None when the version is not pinned."""

    @property
    def time(self) -> str:
        return utc_iso(self.timestamp)

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume,
            "version": self.version,
            "time": self.time,
            "size": self.size,
            "blocks_changed": self.blocks_changed,
            "bytes_stored": self.bytes_stored,
            "chunks_stored": self.chunks_stored,
            "consistency": self.consistency,
            "labels": dict(self.labels),
            "pinned": self.pinned is not None,
            "pin_note": self.pinned,
        }


@dataclass
class PendingCounters:
    """What the pending version of a volume has changed so far (persisted with its blocks)."""

    version: int
    blocks_changed: int = 0
    bytes_stored: int = 0
    chunks_stored: int = 0

    def encode(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PendingCounters:
        return cls(**json.loads(raw))


def validate_volume_name(name: str) -> None:
    if not name or len(name) > MAX_VOLUME_NAME:
        raise StoreError(f"volume name must be 1..{MAX_VOLUME_NAME} characters")
    bad = _VOLUME_NAME_FORBIDDEN.intersection(name)
    if bad or not name.isprintable() or name.strip() != name:
        raise StoreError(f"volume name {name!r} may not contain '@', '/', ';' or spaces at its ends")


def validate_block_size(block_size: int) -> None:
    if block_size & (block_size - 1) or not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise StoreError(
            f"block size {block_size} must be a power of two from 4K to 4M"
        )


class Reading:
    """One consistent read of the store: a main-environment transaction, plus the segment
    transactions the chunks it reads need. Handed to the function given to :meth:`Store.read`."""

    def __init__(self, txn: lmdb.Transaction, segments: SegmentReader) -> None:
        self.txn = txn
        self.segments = segments


class _ResizeGuard:
    """Shared for transactions, exclusive for resizing the map.

    ``enter``/``leave`` are plain calls rather than a context manager because every NBD read
    passes here: the generator machinery of ``@contextmanager`` costs more than the lock.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._resizing = False

    def enter(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0 and self._resizing:
                self._cond.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


class Store:
    """An open store directory. Thread-safe; one per process and directory."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False,
                 map_size: int = DEFAULT_MAP_SIZE,
                 segment_bytes: int | None = None, serving: bool = False) -> None:
        self.path = Path(path)
        self._serving = serving
        """True in the server, which holds the store's serve lock itself."""
        self._guard = _ResizeGuard()
        self._write_lock = threading.Lock()
        if self.path.exists() and not self.path.is_dir():
            raise StoreFormatError(f"{self.path} is a file, not a store directory")
        exists = (self.path / "data.mdb").exists()
        if not exists and not create:
            raise StoreFormatError(
                f"no nbdsink store at {self.path} (create one with 'nbdsink volume create')"
            )
        # Known damage to LMDB's pages (recorded by the last structural check), kept away
        # from; and a truncated file refused here rather than met as SIGBUS by a reader.
        self._damage: StoreDamage | None = None
        self._damage_mtime = 0.0
        self._db_names: dict[int, str] = {}
        if exists:
            self._open_checks()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=24, subdir=True,
                metasync=False, sync=True, max_readers=512,
                # A damaged main environment is never written, not even to open a database:
                # a write allocates pages from the free-page tree, which may be what is
                # damaged (measured: SIGBUS).
                readonly=self._damage is not None and bool(self._damage.read_only),
            )
        except (lmdb.Error, OSError) as exc:
            raise StoreError(f"cannot open store at {self.path}: {exc}") from exc
        self._meta = self.env.open_db(b"meta")
        self._volumes = self.env.open_db(b"volumes")
        self._versions = self.env.open_db(b"versions")
        self._map = self.env.open_db(b"map")
        self._chunks = self.env.open_db(b"chunks")  # format-2 data: segment 0
        self._tails = self.env.open_db(b"chunk_tails")
        self._pending = self.env.open_db(b"pending")
        self._index = self.env.open_db(b"index")
        self._seg_chunks = self.env.open_db(b"seg_chunks")
        self._segments_db = self.env.open_db(b"segments")
        self._refs = self.env.open_db(b"refs")
        self._garbage = self.env.open_db(b"garbage")
        self._pins = self.env.open_db(b"pins")
        self._changes = self.env.open_db(b"changes")
        self._pruning = self.env.open_db(b"pruning")
        self._holes = self.env.open_db(b"holes")
        self._db_names = db_names(self)
        self._page_size = int(self.env.stat()["psize"])
        self._writeback = WritebackKicker(self.path / "data.mdb")
        self.segments = SegmentSet(self.path)
        if self._damage is not None and self._damage.segments:
            self.segments.guard = self._damage.check_segment
        self._check_format(create, segment_bytes)
        self.segments.segment_bytes = self._segment_bytes()
        self._forget_retired_files()

    # -- life cycle ---------------------------------------------------------------------------

    def _check_format(self, create: bool, segment_bytes: int | None) -> None:
        if self._damage is not None and self._damage.read_only:
            raw = self.read(lambda r: _bytes(r.txn.get(b"format", db=self._meta)))
            if raw is None or json.loads(raw).get("format") != STORE_FORMAT:
                raise StoreFormatError(f"store at {self.path} is damaged and not in format "
                                       f"{STORE_FORMAT}: it cannot be upgraded")
            return
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"format", db=self._meta)
            if raw is None:
                if txn.stat(self._volumes)["entries"] or not create:
                    raise StoreFormatError(f"{self.path} holds an LMDB file without an nbdsink header")
                header = {"format": STORE_FORMAT, "created": utc_iso(time.time()),
                          "segment_bytes": segment_bytes or DEFAULT_SEGMENT_BYTES}
                txn.put(b"format", json.dumps(header).encode(), db=self._meta)
                return
            try:
                header = json.loads(raw)
                fmt = header["format"]
            except (ValueError, KeyError, TypeError) as exc:
                raise StoreFormatError(f"{self.path}: unreadable store header") from exc
            if fmt not in READABLE_FORMATS:
                raise StoreFormatError(
                    f"store at {self.path} has format {fmt}; this nbdsink reads formats "
                    f"{', '.join(map(str, READABLE_FORMATS))}"
                )
        if fmt != STORE_FORMAT:
            self._upgrade_alone(header, segment_bytes)
        elif segment_bytes and segment_bytes != header.get("segment_bytes"):
            def put(txn: lmdb.Transaction) -> None:
                txn.put(b"format", json.dumps({**header, "segment_bytes": segment_bytes}).encode(),
                        db=self._meta)
            self._write_txn(put)

    def _segment_bytes(self) -> int:
        raw = self.read(lambda r: _bytes(r.txn.get(b"format", db=self._meta)))
        header = json.loads(raw) if raw else {}
        return int(header.get("segment_bytes") or DEFAULT_SEGMENT_BYTES)

    def _upgrade_alone(self, header: dict[str, Any], segment_bytes: int | None) -> None:
        """Upgrade, but only while no other process serves the store: an older server would
        go on writing chunks where the upgraded store no longer looks for them."""
        if self._serving:
            self._upgrade(header, segment_bytes)
            return
        from nbdsink.store.serve_lock import take_serve_lock

        try:
            fd = take_serve_lock(self.path)
        except StoreLocked:
            raise StoreFormatError(
                f"the store at {self.path} is in format {header['format']} and a server is "
                "serving it: stop that server, then open the store with this nbdsink to "
                "upgrade it") from None
        try:
            self._upgrade(header, segment_bytes)
        finally:
            os.close(fd)

    def _upgrade(self, header: dict[str, Any], segment_bytes: int | None) -> None:
        """Format 1/2 -> 3: index the chunks where they are (segment 0, without a checksum:
        reading them all would take as long as copying), count references from the map.
        Safe to interrupt: it starts over (the index puts are idempotent, the counts are
        rebuilt) until the header says format 3."""
        def index(txn: lmdb.Transaction, digest: bytes, stored: bytes) -> None:
            _, length = check_header(stored)
            txn.put(digest, Location(0, length, 0, FLAG_NO_CHECKSUM).encode(), db=self._index)
            txn.put(_seg_key(0, digest), b"", db=self._seg_chunks)
        self._walk_in_batches(self._chunks, index)

        def reset_refs(txn: lmdb.Transaction) -> None:
            txn.drop(self._refs, delete=False)
        self._write_txn(reset_refs)

        def count(txn: lmdb.Transaction, key: bytes, value: bytes) -> None:
            if value:
                self._incref(txn, value)
            vid, block, version = keys.unpack_map_key(key)
            txn.put(keys.change_key(vid, version, block), b"", db=self._changes)
        self._walk_in_batches(self._map, count)

        def finish(txn: lmdb.Transaction) -> None:
            live = 0
            for _, v in txn.cursor(db=self._index):
                live += Location.decode(v).length
            txn.put(_u32(0), json.dumps({"state": "sealed", "live": live}).encode(),
                    db=self._segments_db)
            new_header = {**header, "format": STORE_FORMAT, "upgraded": utc_iso(time.time()),
                          "upgraded_from": header["format"],
                          "segment_bytes": segment_bytes or DEFAULT_SEGMENT_BYTES}
            txn.put(b"format", json.dumps(new_header).encode(), db=self._meta)
        self._write_txn(finish)
        self.sync()

    def _walk_in_batches(self, db: Any,
                         visit: Callable[[lmdb.Transaction, bytes, bytes], None],
                         batch: int = 20000) -> None:
        """``visit(txn, key, value)`` for every record of ``db``, in write transactions of
        ``batch`` records each (a long walk never holds one huge transaction)."""
        after: bytes | None = None
        while True:
            def step(txn: lmdb.Transaction, after: bytes | None = after) -> bytes | None:
                cur = txn.cursor(db=db)
                found = cur.set_range(after + b"\0") if after is not None else cur.first()
                last = None
                for _ in range(batch):
                    if not found:
                        return None
                    last = bytes(cur.key())
                    visit(txn, last, bytes(cur.value()))
                    found = cur.next()
                return last if found else None
            after = self._write_txn(step)
            if after is None:
                return

    def _forget_retired_files(self) -> None:
        """Delete the files of segments compacted away before a crash or a stop."""
        if self._damage is not None and self._damage.read_only:
            return  # no file is deleted on the word of a damaged environment
        states = self.read(lambda r: {
            _unpack_u32(k): json.loads(bytes(v))["state"] for k, v in r.txn.cursor(db=self._segments_db)})
        for sid in self.segments.existing():
            if states.get(sid) == "retired":
                self.segments.retire(sid)

    def _open_checks(self) -> None:
        """Before LMDB maps the main environment: refuse a truncated file, and load the
        recorded structural damage (a store whose main environment is unreadable is
        refused; see :mod:`nbdsink.store.structure`)."""
        try:
            check_file_covers(self.path / "data.mdb")
        except (EnvUnreadable, OSError) as exc:
            raise StoreFormatError(f"cannot open store at {self.path}: {exc}") from None
        self.reload_damage()
        if self._damage is not None and self._damage.unreadable:
            raise StoreFormatError(
                f"store at {self.path} is structurally damaged: {self._damage.unreadable} "
                "(see 'nbdsink verify'; restore the store or replicate into a new one)")

    def reload_damage(self, report: StructureReport | None = None) -> StoreDamage | None:
        """Take the structural damage of ``report`` (or of the store's record, when it
        changed since the last call) as what reads keep away from; None when there is none.
        Cheap when nothing changed (one ``stat``): the server calls it every pass."""
        if report is None:
            mtime = record_mtime(self.path)
            if mtime == self._damage_mtime:
                return self._damage
            self._damage_mtime = mtime
            report = load_structure(self.path)
        damage = StoreDamage(report) if report is not None and not report.clean else None
        self._damage = damage
        if hasattr(self, "segments"):
            self.segments.guard = damage.check_segment if damage and damage.segments else None
        return damage

    @property
    def damage(self) -> StoreDamage | None:
        """Known structural damage (see :meth:`reload_damage`)."""
        return self._damage

    def close(self) -> None:
        with self._write_lock, self._guard.exclusive():
            self._writeback.close()
            self.segments.close()
            self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sync(self) -> None:
        """Force everything committed so far (meta page included) to stable storage."""
        if self._damage is not None and self._damage.read_only:
            return  # opened read-only: nothing was written
        with self._guard.shared():
            try:
                self.env.sync(True)
            except lmdb.Error as exc:
                raise _translate(exc, self.path) from exc

    # -- transactions ---------------------------------------------------------------------------

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction of the main environment, growing the map and
        retrying when it is full.

        A full disk (or a map that cannot grow) aborts the transaction and raises StoreFull;
        everything committed before stays as it was.
        """
        return self._write_txn(fn)

    def _write_txn(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        if self._damage is not None and self._damage.read_only:
            raise StoreReadOnly(self._damage.read_only)
        with self._write_lock:
            while True:
                try:
                    with self._guard.shared():
                        txn = self.env.begin(write=True)
                        try:
                            result = fn(txn)
                        except BaseException:
                            txn.abort()
                            raise
                        # A failed commit aborts the transaction by itself.
                        with self._writeback.during():
                            txn.commit()
                        return result
                except lmdb.MapFullError:
                    with self._guard.exclusive():
                        self._grow_map()
                except lmdb.MapResizedError:
                    self._adopt_map_size()
                except lmdb.Error as exc:
                    raise _translate(exc, self.path) from exc

    def read(self, fn: Callable[[Reading], T]) -> T:
        """Run ``fn`` on one consistent :class:`Reading` of the store.

        A chunk whose segment was compacted away after this reading looked it up makes the
        whole read start again, on a fresh snapshot (which points to where it moved). A
        segment still gone after READ_AGAIN_LIMIT fresh snapshots is missing (a file deleted
        by hand, a lost directory entry): the read fails (EIO) rather than loop for ever.
        """
        gone = 0
        while True:
            self._guard.enter()
            segments = SegmentReader(self.segments)
            try:
                return self._read_once(fn, segments)
            except lmdb.MapResizedError:
                pass
            except SegmentGone as exc:
                gone += 1
                if gone < READ_AGAIN_LIMIT:
                    continue
                raise StoreDamaged(f"{exc}, yet the index still points into it: its file is "
                                   "missing, and its chunks are unreadable") from None
            except (StoreError, lmdb.Error) as exc:
                # py-lmdb keeps a read transaction's reader slot until the object is freed,
                # and the frames of this exception's traceback hold this read's transactions.
                # An exception kept in a reference cycle (the plugin's error path makes one)
                # would hold them until the next garbage collection: a few hundred failed
                # reads filled LMDB's reader table (MDB_READERS_FULL for every later read).
                # The traceback below this frame goes; the error stays.
                exc.with_traceback(None)
                if isinstance(exc, StoreError):
                    raise
                # LMDB met a damaged page and said so (MDB_CORRUPTED, MDB_PAGE_NOTFOUND ...):
                # an error for this read (EIO), not for the process.
                raise _read_error(exc) from None
            finally:
                segments.close()
                self._guard.leave()
            self._adopt_map_size()

    def _read_once(self, fn: Callable[[Reading], T], segments: SegmentReader) -> T:
        damage = self._damage
        if damage is not None and damage.unreadable:
            # Found while this store was open (the tree of database names, a truncated
            # file): every transaction would read it.
            raise StoreDamaged(f"the store's main environment is unreadable: "
                               f"{damage.unreadable} (see 'nbdsink verify')")
        with self.env.begin(buffers=True) as txn:
            if damage is not None and damage.main:
                # Only a damaged store pays for the guard (see structure.py).
                return fn(Reading(cast(lmdb.Transaction, GuardedTxn(
                    txn, damage.main, self._db_names)), segments))
            return fn(Reading(txn, segments))

    def oldest_reader(self) -> int | None:
        """The oldest snapshot (transaction id) a read transaction of any process is still
        on, or None when none is open: what it could have looked up may still be read."""
        self.env.reader_check()  # forget the slots of processes that died
        oldest = None
        for line in self.env.readers().splitlines()[1:]:
            fields = line.split()
            if len(fields) == 3 and fields[2].isdigit():
                txnid = int(fields[2])
                oldest = txnid if oldest is None else min(oldest, txnid)
        return oldest

    def _adopt_map_size(self) -> None:
        """Another process (a server) grew the map: take its size, then retry."""
        with self._guard.exclusive():
            self.env.set_mapsize(0)

    def _grow_map(self) -> None:
        current = self.env.info()["map_size"]
        st = os.statvfs(self.path)
        free = st.f_bavail * st.f_frsize
        used = (self.path / "data.mdb").stat().st_size
        # Growing only changes the address space LMDB may use; the file grows as pages are
        # written. Still cap at what the disk can hold, so a full disk reads as ENOSPC here
        # rather than as a surprise later.
        target = min(current * 2, used + free)
        if target < current + (1 << 20):
            raise StoreFull(
                f"store at {self.path} is full: {free >> 20} MiB free on disk, "
                f"map at {current >> 20} MiB"
            )
        self.env.set_mapsize(target)

    # -- volumes --------------------------------------------------------------------------------

    def create_volume(self, name: str, size: int, block_size: int = 65536,
                      parent: str | None = None) -> VolumeInfo:
        validate_volume_name(name)
        validate_block_size(block_size)
        if size <= 0 or size % 512:
            raise StoreError(f"volume size {size} must be a positive multiple of 512 bytes")
        if size > MAX_VOLUME_SIZE:
            raise StoreError(f"volume size {size} is larger than the largest served "
                             f"({MAX_VOLUME_SIZE} bytes, 1 EiB)")

        def create(txn: lmdb.Transaction) -> VolumeInfo:
            if txn.get(name.encode(), db=self._volumes) is not None:
                raise VolumeExists(f"volume {name!r} already exists")
            vid = self._next_volume_id(txn)
            info = VolumeInfo(name, vid, size, block_size, time.time(), parent)
            txn.put(name.encode(), _volume_record(info), db=self._volumes)
            return info

        info = self.write(create)
        self.sync()
        return info

    def _next_volume_id(self, txn: lmdb.Transaction) -> int:
        raw_id = txn.get(b"next_volume_id", db=self._meta)
        vid = int(raw_id) if raw_id else 1
        txn.put(b"next_volume_id", str(vid + 1).encode(), db=self._meta)
        return vid

    def volume(self, name: str) -> VolumeInfo:
        raw = self.read(lambda r: _bytes(r.txn.get(name.encode(), db=self._volumes)))
        if raw is None:
            raise UnknownVolume(f"no volume named {name!r}")
        return _volume_from(name, raw)

    def volumes(self) -> list[VolumeInfo]:
        def scan(r: Reading) -> list[VolumeInfo]:
            return [_volume_from(bytes(k).decode(), bytes(v))
                    for k, v in r.txn.cursor(db=self._volumes)]
        return self.read(scan)

    def set_retention(self, volume: VolumeInfo, policy: dict[str, Any] | None) -> VolumeInfo:
        """Store ``policy`` (None: keep everything) as the volume's retention policy."""
        def put(txn: lmdb.Transaction) -> VolumeInfo:
            raw = txn.get(volume.name.encode(), db=self._volumes)
            if raw is None:
                raise UnknownVolume(f"no volume named {volume.name!r}")
            info = replace(_volume_from(volume.name, bytes(raw)), retention=policy or None)
            txn.put(volume.name.encode(), _volume_record(info), db=self._volumes)
            return info
        info = self.write(put)
        self.sync()
        return info

    def clone(self, source: VolumeInfo, version: int, name: str) -> VolumeInfo:
        """A new volume ``name`` whose version 1 is ``source`` at ``version``: instant, no data
        copied (what the clone never writes it reads from its base, which is kept from
        pruning while the clone exists)."""
        validate_volume_name(name)

        def create(txn: lmdb.Transaction) -> VolumeInfo:
            if txn.get(name.encode(), db=self._volumes) is not None:
                raise VolumeExists(f"volume {name!r} already exists")
            base = txn.get(keys.version_key(source.id, version), db=self._versions)
            if base is None:
                raise UnknownVersion(f"volume {source.name!r} has no version {version}")
            base_info = _version_from(source.name, bytes(base))
            vid = self._next_volume_id(txn)
            info = VolumeInfo(name, vid, source.size, source.block_size, time.time(),
                              parent=source.name, base=version)
            txn.put(name.encode(), _volume_record(info), db=self._volumes)
            record = {"version": 1, "timestamp": round(time.time(), 6), "size": source.size,
                      "time": utc_iso(time.time()), "blocks_changed": 0, "bytes_stored": 0,
                      "chunks_stored": 0, "consistency": base_info.consistency,
                      # No replication committed the clone's version 1: whichever first
                      # replicates into the clone owns it (see sender/ownership.py).
                      "labels": {**{k: v for k, v in base_info.labels.items()
                                    if k != REPLICATION_LABEL},
                                 "clone_of": f"{source.name}@{version}"}}
            txn.put(keys.version_key(vid, 1), json.dumps(record).encode(), db=self._versions)
            txn.put(b"last_version:" + _u32(vid), b"1", db=self._meta)
            return info
        info = self.write(create)
        self.sync()
        return info

    # -- versions -------------------------------------------------------------------------------

    def latest_version(self, volume: VolumeInfo) -> int:
        """The newest committed version number, 0 when nothing was committed yet."""
        return self.read(lambda r: self._latest(r.txn, volume.id))

    def _latest(self, txn: lmdb.Transaction, vid: int) -> int:
        cur = txn.cursor(db=self._versions)
        if cur.set_range(keys.version_key(vid + 1, 0)):
            if not cur.prev():
                return 0
        elif not cur.last():
            return 0
        key_vid, version = keys.unpack_version_key(bytes(cur.key()))
        return version if key_vid == vid else 0

    def _last_number(self, txn: lmdb.Transaction, vid: int) -> int:
        """The highest version number ever committed (versions are never renumbered, and a
        pruned number is never reused: the next version is this plus one)."""
        raw = txn.get(b"last_version:" + _u32(vid), db=self._meta)
        return max(int(raw) if raw else 0, self._latest(txn, vid))

    def version(self, volume: VolumeInfo, version: int) -> VersionInfo:
        def get(r: Reading) -> VersionInfo | None:
            key = keys.version_key(volume.id, version)
            raw = r.txn.get(key, db=self._versions)
            if raw is None:
                return None
            return _version_from(volume.name, bytes(raw), _bytes(r.txn.get(key, db=self._pins)))
        info = self.read(get)
        if info is None:
            raise UnknownVersion(f"volume {volume.name!r} has no version {version}"
                                 + self._pruned_note(volume, version))
        return info

    def _pruned_note(self, volume: VolumeInfo, version: int) -> str:
        last = self.read(lambda r: self._last_number(r.txn, volume.id))
        return " (it was pruned)" if 0 < version <= last else ""

    def versions(self, volume: VolumeInfo) -> list[VersionInfo]:
        def scan(r: Reading) -> list[VersionInfo]:
            out: list[VersionInfo] = []
            cur = r.txn.cursor(db=self._versions)
            if not cur.set_range(keys.version_key(volume.id, 0)):
                return out
            for k, v in cur:
                if keys.unpack_version_key(bytes(k))[0] != volume.id:
                    break
                out.append(_version_from(volume.name, bytes(v),
                                         _bytes(r.txn.get(bytes(k), db=self._pins))))
            return out
        return self.read(scan)

    def version_at(self, volume: VolumeInfo, timestamp: float) -> int:
        """The newest version committed at or before ``timestamp`` (binary search over the
        versions that exist: their times never go backwards)."""
        # Compare whole microseconds: the ISO text has that resolution, and float sums would
        # otherwise put an exact match a rounding error away.
        limit = round(timestamp * 1e6)
        numbers = [v.version for v in self.versions(volume)]

        def search(r: Reading) -> int:
            lo, hi = 0, len(numbers)
            while lo < hi:
                mid = (lo + hi) // 2
                raw = r.txn.get(keys.version_key(volume.id, numbers[mid]), db=self._versions)
                if raw is not None and round(json.loads(bytes(raw))["timestamp"] * 1e6) <= limit:
                    lo = mid + 1
                else:
                    hi = mid
            return numbers[lo - 1] if lo else 0
        found = self.read(search)
        if found == 0:
            raise UnknownVersion(
                f"volume {volume.name!r} has no version committed at or before {utc_iso(timestamp)}"
            )
        return found

    def pin(self, volume: VolumeInfo, version: int, note: str = "") -> None:
        """Protect ``version`` from pruning (with a note saying why)."""
        def put(txn: lmdb.Transaction) -> None:
            key = keys.version_key(volume.id, version)
            if txn.get(key, db=self._versions) is None:
                raise UnknownVersion(f"volume {volume.name!r} has no version {version}")
            txn.put(key, json.dumps({"note": note, "time": time.time()}).encode(), db=self._pins)
        self.write(put)
        self.sync()

    def unpin(self, volume: VolumeInfo, version: int) -> bool:
        """Remove the pin of ``version``; False when it was not pinned."""
        removed = self.write(lambda txn: bool(txn.delete(keys.version_key(volume.id, version),
                                                         db=self._pins)))
        self.sync()
        return removed

    # -- blocks ---------------------------------------------------------------------------------

    def block_digests(self, r: Reading | lmdb.Transaction, volume: VolumeInfo, version: int,
                      first: int, count: int) -> list[bytes | None]:
        """The digest (None: zeros) of blocks first..first+count-1 at ``version``, in order.

        One seek per block that has entries, none for the runs of blocks that were never
        written, so it stays cheap on large sparse volumes. This is on the path of every NBD
        read: keys are compared as bytes, and unpacked only to skip a run of holes.
        """
        txn = r.txn if isinstance(r, Reading) else r
        if volume.parent is None:
            return self._own_digests(txn, volume, version, first, count, None)  # type: ignore[return-value]
        # A clone: what it never wrote is its base version's (of a clone, maybe, in turn).
        out = self._own_digests(txn, volume, version, first, count, _UNSET)
        unset = [i for i, d in enumerate(out) if d is _UNSET]
        if unset:
            parent = self._parent(txn, volume)
            lo, hi = unset[0], unset[-1] + 1
            inherited = self.block_digests(txn, parent, volume.base or 0, first + lo, hi - lo)
            for i in unset:
                out[i] = inherited[i - lo]
        return out  # type: ignore[return-value]

    def _parent(self, txn: lmdb.Transaction, volume: VolumeInfo) -> VolumeInfo:
        assert volume.parent is not None
        raw = txn.get(volume.parent.encode(), db=self._volumes)
        if raw is None:
            raise StoreError(f"clone {volume.name!r}: its base volume {volume.parent!r} is gone")
        return _volume_from(volume.parent, bytes(raw))

    def _own_digests(self, txn: lmdb.Transaction, volume: VolumeInfo, version: int, first: int,
                     count: int, unset: object) -> list[object]:
        """block_digests from the volume's own map; ``unset`` where it has no entry."""
        out: list[object] = []
        cur = txn.cursor(db=self._map)
        vid = volume.id
        block = first
        end = first + count
        prefix_size = keys.BLOCK_PREFIX_SIZE
        while block < end:
            key = keys.map_key(vid, block, version)
            if not cur.set_range(key):
                break
            found = bytes(cur.key())
            if found < key or len(found) != keys.MAP_KEY_SIZE:
                # LMDB never returns a smaller key from set_range, nor one of another size
                # from this database, unless a damaged page led it astray: taking it would
                # serve a newer version's block, or walk backwards for ever.
                raise StoreDamaged(f"map of volume {volume.name!r}: a lookup of block {block} "
                                   f"found key {found.hex()} (damaged page; see 'nbdsink verify')")
            if found[:prefix_size] == key[:prefix_size]:
                # The newest entry for this block at or below `version`.
                value = cur.value()
                if len(value) not in (0, DIGEST_SIZE):
                    raise StoreDamaged(f"map of volume {volume.name!r}: block {block} has a "
                                       f"{len(value)}-byte entry (damaged page)")
                out.append(bytes(value) if len(value) else None)
                block += 1
                continue
            key_vid, key_block, _ = keys.unpack_map_key(found)
            if key_vid != vid:
                break
            # Blocks block..key_block-1 have no entry at or below `version`. The next turn
            # seeks key_block itself at `version` (the entry we landed on may be newer).
            stop = min(key_block, end)
            out.extend([unset] * (stop - block))
            block = stop
        out.extend([unset] * (end - block))
        return out

    def has_chunk(self, r: Reading, digest: bytes) -> bool:
        """True when the store holds ``digest`` durably and it is referenced (a chunk without
        references may be swept: a writer must not count on it) and undamaged."""
        raw = r.txn.get(digest, db=self._index)
        if raw is None or Location.decode(raw).flags & FLAG_DAMAGED:
            return False
        return r.txn.get(digest, db=self._refs) is not None

    def locate(self, r: Reading | lmdb.Transaction, digest: bytes) -> Location | None:
        txn = r.txn if isinstance(r, Reading) else r
        raw = txn.get(digest, db=self._index)
        return None if raw is None else Location.decode(raw)

    def copy_blocks(self, r: Reading, digests: Sequence[bytes | None], dest: memoryview,
                    skip: int, block_size: int) -> None:
        """Fill ``dest`` with the data of consecutive blocks, ``digests`` (None: zeros),
        from ``skip`` bytes into the first: the store's part of every NBD read.

        Each chunk's data are checked against the index's checksum, then copied straight
        out of the segment's map. The loop is written for the common case, a whole,
        undamaged chunk of a segment read whole (a few microseconds of Python per block
        count here); anything else, and any doubt (a wrong header, a failed check), goes
        through :meth:`copy_chunk`, which says exactly what is wrong.
        """
        index_get, index = r.txn.get, self._index
        segment_get = r.segments.get
        end = len(dest)
        pos = 0
        for digest in digests:
            n = min(block_size - skip, end - pos)
            out = dest[pos : pos + n]
            if digest is None:
                out[:] = _ZEROS[:n]
            else:
                raw = index_get(digest, db=index)
                if raw is not None and len(raw) == _INDEX_SIZE and not skip:
                    sid, length, check, flags = _unpack_index(raw)
                    if not flags and sid and n == length:
                        stored, _ = segment_get(sid, digest)
                        if (stored is not None and len(stored) == HEADER_SIZE + length
                                and stored[:HEADER_SIZE] == whole_header(length)):
                            data = stored[HEADER_SIZE:]
                            if _xxh3(data) == check:
                                out[:] = data
                                pos += n
                                continue
                self.copy_chunk(r, digest, out, skip)
            pos += n
            skip = 0

    def copy_chunk(self, r: Reading, digest: bytes, dest: memoryview, start: int) -> None:
        """Copy the chunk's data from ``start`` into all of ``dest``, after checking all of
        its data against the index's checksum."""
        raw = r.txn.get(digest, db=self._index)
        if raw is None:
            raise StoreError(f"store is missing chunk {digest.hex()}")
        loc = Location.decode(raw)
        if loc.flags & FLAG_DAMAGED:
            raise ChunkDamaged(f"chunk {digest.hex()} is damaged (found by an earlier check); "
                               "it is whole again once the same content is written")
        if loc.segment == 0:
            stored, tail = r.txn.get(digest, db=self._chunks), r.txn.get(digest, db=self._tails)
        else:
            stored, tail = r.segments.get(loc.segment, digest)
        if stored is None:
            raise ChunkDamaged(f"chunk {digest.hex()} is missing from segment {loc.segment}")
        if len(stored) > HEADER_SIZE + loc.length:
            # A damaged node's size: reading that much could run past the file (SIGBUS).
            raise ChunkDamaged(f"chunk {digest.hex()} in segment {loc.segment} has a stored "
                               f"size of {len(stored)} bytes for {loc.length}: damaged page")
        if not loc.flags & FLAG_NO_CHECKSUM and _data_check(stored, tail) != loc.check:
            raise ChunkDamaged(f"chunk {digest.hex()} in segment {loc.segment} fails its "
                               "checksum: damaged on disk")
        copy_stored(stored, tail, dest, start, digest.hex())

    def mark_damaged(self, digest: bytes) -> bool:
        """Quarantine a chunk that failed a check: reads of it give EIO (never its bytes),
        and the next write of the same content replaces it. False if it was gone."""
        def mark(txn: lmdb.Transaction) -> bool:
            raw = txn.get(digest, db=self._index)
            if raw is None:
                return False
            loc = Location.decode(raw)
            if not loc.flags & FLAG_DAMAGED:
                txn.put(digest, replace(loc, flags=loc.flags | FLAG_DAMAGED).encode(),
                        db=self._index)
            return True
        return self.write(mark)

    def read_chunk(self, r: Reading, digest: bytes) -> bytes:
        """A chunk's whole data (checked)."""
        loc = self.locate(r, digest)
        if loc is None:
            raise StoreError(f"store is missing chunk {digest.hex()}")
        out = bytearray(loc.length)
        self.copy_chunk(r, digest, memoryview(out), 0)
        return bytes(out)

    # -- saving batches -------------------------------------------------------------------------

    def save_chunks(self, chunks: Mapping[bytes, bytearray | bytes]) -> dict[bytes, Location]:
        """Write the chunks the store does not index yet to the active segment, durably.

        Returns where each one went; give that to :meth:`stage_blocks` (in the main
        transaction that then indexes them). Chunks already indexed are skipped.
        """
        damaged: set[bytes] = set()

        def missing(r: Reading) -> list[bytes]:
            out = []
            for d in chunks:
                raw = r.txn.get(d, db=self._index)
                # A damaged chunk is written again: healing by content.
                if raw is None:
                    out.append(d)
                elif Location.decode(raw).flags & FLAG_DAMAGED:
                    out.append(d)
                    damaged.add(d)
            return out
        todo = self.read(missing)
        if not todo:
            return {}
        located: dict[bytes, Location] = {}
        with self.segments.write_lock:
            # A segment's map has room for four segments' worth (SegmentSet._map_size), and
            # a segment takes chunks until it holds one: a batch larger than two goes in
            # parts, each durable before the next. Writes that piled up while saves failed
            # (a full disk, say) would otherwise fill the map, and fail every save after,
            # for good. A batch of the usual size (a little over one segment's worth, at
            # most) stays one commit.
            for part in _parts(todo, chunks, 2 * self.segments.segment_bytes):
                sid = self._active_segment()
                used = self.segments.write(sid, part, replace=frozenset(damaged))
                located.update((d, Location(sid, len(c) - HEADER_SIZE,
                                            checksum(memoryview(c)[HEADER_SIZE:])))
                               for d, c in part)
                if used >= self.segments.segment_bytes:
                    self._seal(sid)
        return located

    def _active_segment(self, role: bytes = b"active_segment") -> int:
        """The segment new chunks go to (``role`` b"active_segment") or compaction copies
        live chunks to (b"compaction_segment"). Two, so that a compaction never contends
        with ingest for one segment's writer lock and fsync, and data that survived a
        compaction (older, likelier to stay) is not mixed with new writes."""
        raw = self.read(lambda r: _bytes(r.txn.get(role, db=self._meta)))
        if raw is not None:
            return int(raw)

        def find(txn: lmdb.Transaction) -> int:
            raw = txn.get(role, db=self._meta)
            return int(raw) if raw is not None else self._new_segment(txn, role)
        return self._write_txn(find)

    def _new_segment(self, txn: lmdb.Transaction, role: bytes = b"active_segment") -> int:
        raw = txn.get(b"next_segment", db=self._meta)
        sid = int(raw) if raw else 1
        txn.put(b"next_segment", str(sid + 1).encode(), db=self._meta)
        txn.put(role, str(sid).encode(), db=self._meta)
        txn.put(_u32(sid), json.dumps({"state": "active", "live": 0}).encode(), db=self._segments_db)
        return sid

    def _seal(self, sid: int) -> None:
        """Segment ``sid`` is full: never written again; the next chunks go to a new one."""
        def seal(txn: lmdb.Transaction) -> None:
            rec = self._segment_record(txn, sid)
            if rec["state"] != "active":
                return
            rec["state"] = "sealed"
            txn.put(_u32(sid), json.dumps(rec).encode(), db=self._segments_db)
            for role in (b"active_segment", b"compaction_segment"):
                raw = txn.get(role, db=self._meta)
                if raw is not None and int(raw) == sid:
                    if role == b"active_segment":
                        self._new_segment(txn, role)
                    else:
                        txn.delete(role, db=self._meta)  # a new one when compaction needs it
        self._write_txn(seal)

    def _segment_record(self, txn: lmdb.Transaction, sid: int) -> dict[str, Any]:
        raw = txn.get(_u32(sid), db=self._segments_db)
        rec: dict[str, Any] = json.loads(bytes(raw)) if raw is not None else {"state": "sealed", "live": 0}
        return rec

    def _add_live(self, txn: lmdb.Transaction, deltas: dict[int, int]) -> None:
        for sid, delta in deltas.items():
            if delta:
                rec = self._segment_record(txn, sid)
                rec["live"] = int(rec.get("live", 0)) + delta
                txn.put(_u32(sid), json.dumps(rec).encode(), db=self._segments_db)

    # The pending-version primitives below are used by nbdsink.store.head.Head inside one
    # write transaction. They are here because they know the key layout.

    def pending_counters(self, txn: lmdb.Transaction, volume: VolumeInfo) -> PendingCounters:
        latest = self._last_number(txn, volume.id)
        raw = txn.get(keys.volume_id_key(volume.id), db=self._pending)
        if raw is not None:
            counters = PendingCounters.decode(bytes(raw))
            if counters.version == latest + 1:
                return counters
        return PendingCounters(version=latest + 1)

    def put_pending_counters(self, txn: lmdb.Transaction, volume: VolumeInfo,
                             counters: PendingCounters) -> None:
        txn.put(keys.volume_id_key(volume.id), counters.encode(), db=self._pending)

    def _incref(self, txn: lmdb.Transaction, digest: bytes) -> None:
        raw = txn.get(digest, db=self._refs)
        if raw is None:
            txn.put(digest, _REF.pack(1), db=self._refs)
            txn.delete(digest, db=self._garbage)
        else:
            txn.put(digest, _REF.pack(_REF.unpack(raw)[0] + 1), db=self._refs)

    def _decref(self, txn: lmdb.Transaction, digest: bytes) -> None:
        raw = txn.get(digest, db=self._refs)
        n = _REF.unpack(raw)[0] if raw is not None else 0
        if n <= 1:
            txn.delete(digest, db=self._refs)
            txn.put(digest, _TIME.pack(time.time()), db=self._garbage)
        else:
            txn.put(digest, _REF.pack(n - 1), db=self._refs)

    def set_refs(self, txn: lmdb.Transaction, digest: bytes, count: int) -> None:
        """Set ``digest``'s reference count to ``count`` (a repair: ``nbdsink verify``
        recounts the map's entries). At zero the chunk becomes garbage, as when the last map
        entry using it goes; above zero it is no longer garbage."""
        if count > 0:
            txn.put(digest, _REF.pack(count), db=self._refs)
            txn.delete(digest, db=self._garbage)
        else:
            txn.delete(digest, db=self._refs)
            if txn.get(digest, db=self._garbage) is None:
                txn.put(digest, _TIME.pack(time.time()), db=self._garbage)

    def stage_blocks(self, txn: lmdb.Transaction, volume: VolumeInfo,
                     counters: PendingCounters,
                     blocks: Iterable[tuple[int, bytes | None]],
                     located: dict[bytes, Location] | None = None) -> None:
        """Set each ``block`` of the pending version to ``digest`` (None: all zeros).

        A digest the index does not hold must be in ``located`` (written by
        :meth:`save_chunks`): it is indexed now. A block set back to what the previous
        version holds leaves no entry, so a version records exactly the blocks that differ
        from its predecessor. Blocks in ascending order keep the map's pages hot.
        """
        located = located or {}
        # Chunks written to a segment another process compacted away meanwhile: write again.
        # (One look per segment, not per chunk: this is the save's hot loop.)
        for sid in {loc.segment for loc in located.values()}:
            if self._segment_record(txn, sid)["state"] == "retired":
                raise SegmentGone(f"segment {sid} was compacted away during a save")
        cur = txn.cursor(db=self._map)
        vid = volume.id
        pending = counters.version
        prefix_size = keys.BLOCK_PREFIX_SIZE
        live: dict[int, int] = {}
        for block, digest in blocks:
            pending_key = keys.map_key(vid, block, pending)
            prefix = pending_key[:prefix_size]
            # One seek finds both the pending entry (if any) and the previous version's:
            # the newest entry at or below `pending` sorts first.
            had_pending: bytes | None = None
            previous: bytes | None = None
            own_previous = False
            if cur.set_range(pending_key) and cur.key()[:prefix_size] == prefix:
                if cur.key() == pending_key:
                    had_pending = bytes(cur.value())
                    if cur.next() and cur.key()[:prefix_size] == prefix:
                        previous = bytes(cur.value()) or None
                        own_previous = True
                else:
                    previous = bytes(cur.value()) or None
                    own_previous = True
            if not own_previous and volume.parent is not None:
                # Never written in the clone: its previous content is the base's.
                previous = self.block_digests(txn, volume, counters.version - 1, block, 1)[0]
            if digest is not None:
                self._index_chunk(txn, digest, located, counters, live, block, volume)
            if had_pending:
                self._decref(txn, had_pending)
            if digest == previous:
                if had_pending is not None:
                    txn.delete(pending_key, db=self._map)
                    txn.delete(keys.change_key(vid, pending, block), db=self._changes)
                    counters.blocks_changed -= 1
                continue
            txn.put(pending_key, digest or b"", db=self._map)
            if digest is not None:
                self._incref(txn, digest)
            if had_pending is None:
                txn.put(keys.change_key(vid, pending, block), b"", db=self._changes)
                counters.blocks_changed += 1
        self._add_live(txn, live)

    def _index_chunk(self, txn: lmdb.Transaction, digest: bytes, located: dict[bytes, Location],
                     counters: PendingCounters, live: dict[int, int], block: int,
                     volume: VolumeInfo) -> None:
        raw = txn.get(digest, db=self._index)
        if raw is not None:
            loc = Location.decode(raw)
            new = located.get(digest)
            if loc.flags & FLAG_DAMAGED and new is not None:
                # Healed by content: the same data arrived again; the new copy replaces it.
                self._repoint(txn, digest, loc, new, live)
            return
        new = located.get(digest)
        if new is None:
            # The writer took the chunk as stored. A map entry without its chunk would be
            # a version that can never be read back: refuse.
            raise StoreError(
                f"refusing to record block {block} of {volume.name!r}: chunk "
                f"{digest.hex()} was taken as stored but the store does not hold it")
        txn.put(digest, new.encode(), db=self._index)
        txn.put(_seg_key(new.segment, digest), b"", db=self._seg_chunks)
        live[new.segment] = live.get(new.segment, 0) + new.length
        counters.bytes_stored += new.length
        counters.chunks_stored += 1

    def _repoint(self, txn: lmdb.Transaction, digest: bytes, old: Location, new: Location,
                 live: dict[int, int]) -> None:
        txn.put(digest, new.encode(), db=self._index)
        txn.delete(_seg_key(old.segment, digest), db=self._seg_chunks)
        txn.put(_seg_key(new.segment, digest), b"", db=self._seg_chunks)
        live[old.segment] = live.get(old.segment, 0) - old.length
        live[new.segment] = live.get(new.segment, 0) + new.length

    def commit_pending(self, txn: lmdb.Transaction, volume: VolumeInfo,
                       counters: PendingCounters, consistency: str,
                       labels: dict[str, str]) -> VersionInfo | None:
        """Make the pending version visible (same transaction as its last blocks)."""
        if counters.blocks_changed == 0:
            txn.delete(keys.volume_id_key(volume.id), db=self._pending)
            return None
        latest = self._latest(txn, volume.id)
        previous = txn.get(keys.version_key(volume.id, latest), db=self._versions) if latest else None
        # Microsecond resolution, as the ISO time users see and type has.
        now = round(time.time(), 6)
        if previous is not None:
            # Commit times never go backwards, so time lookups can binary-search.
            now = max(now, json.loads(bytes(previous))["timestamp"])
        info = VersionInfo(
            volume=volume.name, version=counters.version, timestamp=now, size=volume.size,
            blocks_changed=counters.blocks_changed, bytes_stored=counters.bytes_stored,
            chunks_stored=counters.chunks_stored, consistency=consistency, labels=labels,
        )
        record = info.to_json()
        record["timestamp"] = now
        for k in ("volume", "pinned", "pin_note"):
            del record[k]
        txn.put(keys.version_key(volume.id, counters.version), json.dumps(record).encode(),
                db=self._versions)
        txn.put(b"last_version:" + _u32(volume.id), str(counters.version).encode(), db=self._meta)
        txn.delete(keys.volume_id_key(volume.id), db=self._pending)
        return info

    def stats(self) -> dict[str, int]:
        """Entry counts and sizes, for tests and ``nbdsink store-info``."""
        def gather(r: Reading) -> dict[str, int]:
            txn = r.txn
            return {
                "chunks": txn.stat(self._index)["entries"],
                "map_entries": txn.stat(self._map)["entries"],
                "versions": txn.stat(self._versions)["entries"],
                "volumes": txn.stat(self._volumes)["entries"],
                "garbage": txn.stat(self._garbage)["entries"],
            }
        return self.read(gather)


def _data_check(stored: memoryview | bytes, tail: memoryview | bytes | None) -> int:
    if not tail:
        return checksum(memoryview(stored)[HEADER_SIZE:])
    h = xxhash.xxh3_64()
    h.update(memoryview(stored)[HEADER_SIZE:])
    h.update(tail)
    return int(h.intdigest())


def _parts(digests: list[bytes], chunks: Mapping[bytes, bytearray | bytes], most: int
           ) -> Iterator[list[tuple[bytes, bytearray | bytes]]]:
    """``(digest, chunk)`` of ``digests`` in consecutive groups of at most ``most`` bytes
    (at least one chunk each)."""
    part: list[tuple[bytes, bytearray | bytes]] = []
    size = 0
    for d in digests:
        chunk = chunks[d]
        if part and size + len(chunk) > most:
            yield part
            part, size = [], 0
        part.append((d, chunk))
        size += len(chunk)
    if part:
        yield part


def _u32(n: int) -> bytes:
    return struct.pack(">I", n)


def _unpack_u32(raw: bytes | memoryview) -> int:
    return int(struct.unpack(">I", bytes(raw))[0])


def _seg_key(sid: int, digest: bytes) -> bytes:
    return struct.pack(">I", sid) + digest


def _volume_record(info: VolumeInfo) -> bytes:
    return json.dumps({"id": info.id, "size": info.size, "block_size": info.block_size,
                       "created": info.created, "parent": info.parent, "base": info.base,
                       "retention": info.retention}).encode()


def _bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _volume_from(name: str, raw: bytes) -> VolumeInfo:
    try:
        rec = json.loads(raw)
        return VolumeInfo(name, int(rec["id"]), int(rec["size"]), int(rec["block_size"]),
                          float(rec["created"]), rec.get("parent"), rec.get("base"),
                          rec.get("retention"))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreFormatError(f"the record of volume {name!r} is damaged ({exc})") from None


def _version_from(volume: str, raw: bytes, pin: bytes | None = None) -> VersionInfo:
    try:
        rec = json.loads(raw)
        note = None if pin is None else str(json.loads(pin).get("note", ""))
        return VersionInfo(
            volume=volume, version=rec["version"], timestamp=rec["timestamp"], size=rec["size"],
            blocks_changed=rec["blocks_changed"], bytes_stored=rec["bytes_stored"],
            chunks_stored=rec["chunks_stored"], consistency=rec.get("consistency", "none"),
            labels=rec.get("labels", {}), pinned=note,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreFormatError(f"a version record of volume {volume!r} is damaged ({exc})") from None


_DAMAGE_ERRORS = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.BadValsizeError,
                  lmdb.InvalidError, lmdb.BadTxnError, lmdb.BadDbiError)
"""What LMDB answers when a page it reads is damaged (a transaction that met one is
unusable after: BadTxnError)."""


def _read_error(exc: lmdb.Error) -> StoreError:
    """The store's error for an LMDB error met by a read."""
    if isinstance(exc, _DAMAGE_ERRORS):
        return StoreDamaged(f"LMDB: {exc} (a damaged page; see 'nbdsink verify')")
    return StoreError(f"LMDB error: {exc}")


def _translate(exc: lmdb.Error, where: Path) -> StoreError:
    text = str(exc)
    # LMDB reports a write that found the disk full as EIO: tell them apart by the room left.
    if ("No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC
            or disk_free(where) < FULL_MARGIN):
        return StoreFull(f"disk full: {text}")
    return StoreError(f"LMDB error: {text}")
