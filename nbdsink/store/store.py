"""The LMDB store: volumes, versions, the block map and the chunks.

One LMDB environment per store directory, with named sub-databases:

- ``meta``:     b"format" -> JSON header (format version); b"next_volume_id" -> counter
- ``volumes``:  name -> JSON {id, size, block_size, created, parent}
- ``versions``: (volume id, version) -> JSON record of a committed version
- ``map``:      (volume id, block, ~version) -> 32-byte digest, or b"" for an all-zero block
- ``chunks``:   digest -> header + data up to the split point (see :mod:`nbdsink.store.chunks`)
- ``chunk_tails``: digest -> the rest of the chunk's data (a few bytes)
- ``pending``:  volume id -> JSON counters of the pending (uncommitted) version

Reading block b of version V is one ``set_range``: the newest map entry for b at or below V.
Writing a version costs O(blocks changed). The pending version P = latest + 1 lives in the same
map; no committed version can see it because every committed version is < P, and the version
record that makes P visible is written in the same transaction as its last blocks.

Durability: the environment commits with MDB_NOMETASYNC (data pages are fsynced at every
commit, the meta page is not), which keeps the database intact across a system crash at the
cost of possibly losing the last transaction; :meth:`Store.sync` forces the meta page out, and a
commit of a version always ends with it, so an acknowledged FLUSH is durable.

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
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from nbdsink.store import keys
from nbdsink.store.chunks import FORMAT_SPLIT, HEADER_SIZE, check_header, split_point
from nbdsink.store.errors import (
    StoreError,
    StoreFormatError,
    StoreFull,
    UnknownVersion,
    UnknownVolume,
    VolumeExists,
)
from nbdsink.store.writeback import WritebackKicker

STORE_FORMAT = 2
"""Format 2 stores chunks smaller than 64 KiB split in two (see :mod:`nbdsink.store.chunks`).
A format 1 store is upgraded when it is opened: its chunks stay readable as they are."""
READABLE_FORMATS = (1, 2)
DEFAULT_MAP_SIZE = 1 << 30
MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 4 << 20
MAX_VOLUME_NAME = 200
_VOLUME_NAME_FORBIDDEN = set("@/;\0")

T = TypeVar("T")


def utc_iso(ts: float) -> str:
    """ISO-8601 UTC with microseconds and a Z, e.g. 2026-11-23T10:00:00.123456Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class VolumeInfo:
    """A volume: a fixed-size block device image made of ``block_size`` blocks."""

    name: str
    id: int
    size: int
    block_size: int
    created: float
    parent: str | None = None

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
                 map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = Path(path)
        self._guard = _ResizeGuard()
        self._write_lock = threading.Lock()
        exists = (self.path / "data.mdb").exists()
        if not exists and not create:
            raise StoreFormatError(
                f"no nbdsink store at {self.path} (create one with 'nbdsink volume create')"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.env = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=8, subdir=True,
                metasync=False, sync=True, max_readers=512,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open store at {self.path}: {exc}") from exc
        self._meta = self.env.open_db(b"meta")
        self._volumes = self.env.open_db(b"volumes")
        self._versions = self.env.open_db(b"versions")
        self._map = self.env.open_db(b"map")
        self._chunks = self.env.open_db(b"chunks")
        self._tails = self.env.open_db(b"chunk_tails")
        self._page_size = int(self.env.stat()["psize"])
        self._pending = self.env.open_db(b"pending")
        self._writeback = WritebackKicker(self.path / "data.mdb")
        self._check_format(create)

    # -- life cycle ---------------------------------------------------------------------------

    def _check_format(self, create: bool) -> None:
        with self.env.begin(write=True) as txn:
            raw = txn.get(b"format", db=self._meta)
            if raw is None:
                if txn.stat(self._volumes)["entries"] or not create:
                    raise StoreFormatError(f"{self.path} holds an LMDB file without an nbdsink header")
                header = {"format": STORE_FORMAT, "created": utc_iso(time.time())}
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
                # From now on chunks are written split: an older nbdsink must refuse the store.
                header.update(format=STORE_FORMAT, upgraded=utc_iso(time.time()))
                txn.put(b"format", json.dumps(header).encode(), db=self._meta)

    def close(self) -> None:
        with self._write_lock, self._guard.exclusive():
            self._writeback.close()
            self.env.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sync(self) -> None:
        """Force everything committed so far (meta page included) to stable storage."""
        with self._guard.shared():
            try:
                self.env.sync(True)
            except lmdb.Error as exc:
                raise _translate(exc) from exc

    # -- transactions ---------------------------------------------------------------------------

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one write transaction, growing the map and retrying when it is full.

        A full disk (or a map that cannot grow) aborts the transaction and raises StoreFull;
        everything committed before stays as it was.
        """
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
                    raise _translate(exc) from exc

    def read(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        while True:
            self._guard.enter()
            try:
                with self.env.begin(buffers=True) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                pass
            finally:
                self._guard.leave()
            self._adopt_map_size()

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

        def create(txn: lmdb.Transaction) -> VolumeInfo:
            if txn.get(name.encode(), db=self._volumes) is not None:
                raise VolumeExists(f"volume {name!r} already exists")
            raw_id = txn.get(b"next_volume_id", db=self._meta)
            vid = int(raw_id) if raw_id else 1
            txn.put(b"next_volume_id", str(vid + 1).encode(), db=self._meta)
            info = VolumeInfo(name, vid, size, block_size, time.time(), parent)
            record = {"id": vid, "size": size, "block_size": block_size,
                      "created": info.created, "parent": parent}
            txn.put(name.encode(), json.dumps(record).encode(), db=self._volumes)
            return info

        info = self.write(create)
        self.sync()
        return info

    def volume(self, name: str) -> VolumeInfo:
        raw = self.read(lambda txn: _bytes(txn.get(name.encode(), db=self._volumes)))
        if raw is None:
            raise UnknownVolume(f"no volume named {name!r}")
        return _volume_from(name, raw)

    def volumes(self) -> list[VolumeInfo]:
        def scan(txn: lmdb.Transaction) -> list[VolumeInfo]:
            return [_volume_from(bytes(k).decode(), bytes(v))
                    for k, v in txn.cursor(db=self._volumes)]
        return self.read(scan)

    # -- versions -------------------------------------------------------------------------------

    def latest_version(self, volume: VolumeInfo) -> int:
        """The newest committed version number, 0 when nothing was committed yet."""
        return self.read(lambda txn: self._latest(txn, volume.id))

    def _latest(self, txn: lmdb.Transaction, vid: int) -> int:
        cur = txn.cursor(db=self._versions)
        if cur.set_range(keys.version_key(vid + 1, 0)):
            if not cur.prev():
                return 0
        elif not cur.last():
            return 0
        key_vid, version = keys.unpack_version_key(bytes(cur.key()))
        return version if key_vid == vid else 0

    def version(self, volume: VolumeInfo, version: int) -> VersionInfo:
        raw = self.read(lambda txn: _bytes(txn.get(keys.version_key(volume.id, version),
                                                   db=self._versions)))
        if raw is None:
            raise UnknownVersion(f"volume {volume.name!r} has no version {version}")
        return _version_from(volume.name, raw)

    def versions(self, volume: VolumeInfo) -> list[VersionInfo]:
        def scan(txn: lmdb.Transaction) -> list[VersionInfo]:
            out: list[VersionInfo] = []
            cur = txn.cursor(db=self._versions)
            if not cur.set_range(keys.version_key(volume.id, 0)):
                return out
            for k, v in cur:
                if keys.unpack_version_key(bytes(k))[0] != volume.id:
                    break
                out.append(_version_from(volume.name, bytes(v)))
            return out
        return self.read(scan)

    def version_at(self, volume: VolumeInfo, timestamp: float) -> int:
        """The newest version committed at or before ``timestamp`` (binary search: versions
        are numbered 1..latest without gaps and their times never go backwards)."""
        # Compare whole microseconds: the ISO text has that resolution, and float sums would
        # otherwise put an exact match a rounding error away.
        limit = round(timestamp * 1e6)

        def search(txn: lmdb.Transaction) -> int:
            lo, hi = 0, self._latest(txn, volume.id)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                raw = txn.get(keys.version_key(volume.id, mid), db=self._versions)
                if raw is not None and round(json.loads(bytes(raw))["timestamp"] * 1e6) <= limit:
                    lo = mid
                else:
                    hi = mid - 1
            return lo
        found = self.read(search)
        if found == 0:
            raise UnknownVersion(
                f"volume {volume.name!r} has no version committed at or before {utc_iso(timestamp)}"
            )
        return found

    # -- blocks ---------------------------------------------------------------------------------

    def block_digests(self, txn: lmdb.Transaction, volume: VolumeInfo, version: int,
                      first: int, count: int) -> list[bytes | None]:
        """The digest (None: zeros) of blocks first..first+count-1 at ``version``, in order.

        One seek per block that has entries, none for the runs of blocks that were never
        written, so it stays cheap on large sparse volumes. This is on the path of every NBD
        read: keys are compared as bytes, and unpacked only to skip a run of holes.
        """
        out: list[bytes | None] = []
        cur = txn.cursor(db=self._map)
        vid = volume.id
        block = first
        end = first + count
        prefix_size = keys.BLOCK_PREFIX_SIZE
        while block < end:
            key = keys.map_key(vid, block, version)
            if not cur.set_range(key):
                break
            found = cur.key()
            if found[:prefix_size] == key[:prefix_size]:
                # The newest entry for this block at or below `version`.
                value = cur.value()
                out.append(bytes(value) if len(value) else None)
                block += 1
                continue
            key_vid, key_block, _ = keys.unpack_map_key(bytes(found))
            if key_vid != vid:
                break
            # Blocks block..key_block-1 have no entry at or below `version`: zeros. The next
            # turn seeks key_block itself at `version` (the entry we landed on may be newer).
            stop = min(key_block, end)
            out.extend([None] * (stop - block))
            block = stop
        out.extend([None] * (end - block))
        return out

    def has_chunk(self, txn: lmdb.Transaction, digest: bytes) -> bool:
        return txn.get(digest, db=self._chunks) is not None

    def copy_chunk(self, txn: lmdb.Transaction, digest: bytes, dest: memoryview,
                   start: int) -> None:
        """Copy the chunk's data from ``start`` into all of ``dest``.

        On the path of every NBD read, once per block: the data is copied straight out of
        LMDB's map, and the tail is looked up only when the range reaches it."""
        stored = txn.get(digest, db=self._chunks)
        if stored is None:
            raise StoreError(f"store is missing chunk {digest.hex()}")
        fmt, length = check_header(stored)
        end = start + len(dest)
        cut = len(stored) - HEADER_SIZE  # data bytes held in `stored`
        if end <= cut:
            dest[:] = stored[HEADER_SIZE + start : HEADER_SIZE + end]
            return
        tail = txn.get(digest, db=self._tails) if fmt == FORMAT_SPLIT else None
        if tail is None or cut + len(tail) != length or end > length:
            raise StoreFormatError(f"chunk {digest.hex()} is incomplete (tail missing or short)")
        if start < cut:
            dest[: cut - start] = stored[HEADER_SIZE + start :]
            dest[cut - start :] = tail[: end - cut]
        else:
            dest[:] = tail[start - cut : end - cut]

    # The pending-version primitives below are used by nbdsink.store.head.Head inside one
    # write transaction. They are here because they know the key layout.

    def pending_counters(self, txn: lmdb.Transaction, volume: VolumeInfo) -> PendingCounters:
        latest = self._latest(txn, volume.id)
        raw = txn.get(keys.volume_id_key(volume.id), db=self._pending)
        if raw is not None:
            counters = PendingCounters.decode(bytes(raw))
            if counters.version == latest + 1:
                return counters
        return PendingCounters(version=latest + 1)

    def put_pending_counters(self, txn: lmdb.Transaction, volume: VolumeInfo,
                             counters: PendingCounters) -> None:
        txn.put(keys.volume_id_key(volume.id), counters.encode(), db=self._pending)

    def stage_blocks(self, txn: lmdb.Transaction, volume: VolumeInfo,
                     counters: PendingCounters,
                     blocks: Iterable[tuple[int, bytes | None, bytes | bytearray | None]]
                     ) -> None:
        """Set each ``block`` of the pending version to ``digest`` (None: all zeros);
        ``chunk`` is the encoded chunk (see :func:`nbdsink.store.chunks.encode_chunk`) to store
        under ``digest`` if the store does not hold it yet (None: the writer found it stored).

        A block set back to what the previous version holds leaves no entry, so a version
        records exactly the blocks that differ from its predecessor. Blocks in ascending order
        keep the map's pages hot.
        """
        cur = txn.cursor(db=self._map)
        vid = volume.id
        pending = counters.version
        prefix_size = keys.BLOCK_PREFIX_SIZE
        for block, digest, chunk in blocks:
            pending_key = keys.map_key(vid, block, pending)
            prefix = pending_key[:prefix_size]
            # One seek finds both the pending entry (if any) and the previous version's:
            # the newest entry at or below `pending` sorts first.
            had_pending = False
            previous: bytes | None = None
            if cur.set_range(pending_key) and cur.key()[:prefix_size] == prefix:
                if cur.key() == pending_key:
                    had_pending = True
                    if cur.next() and cur.key()[:prefix_size] == prefix:
                        previous = bytes(cur.value()) or None
                else:
                    previous = bytes(cur.value()) or None
            if digest == previous:
                if had_pending:
                    txn.delete(pending_key, db=self._map)
                    counters.blocks_changed -= 1
                continue
            if digest is not None and chunk is None:
                # The writer took the chunk as stored. Check it, in this transaction: a map
                # entry without its chunk would be a version that can never be read back.
                if txn.get(digest, db=self._chunks) is None:
                    raise StoreError(
                        f"refusing to record block {block} of {volume.name!r}: chunk "
                        f"{digest.hex()} was taken as stored but the store does not hold it")
            elif digest is not None and chunk is not None:
                length = len(chunk) - HEADER_SIZE
                split = chunk[0] == FORMAT_SPLIT
                cut = HEADER_SIZE + (split_point(length, self._page_size) if split else length)
                view = memoryview(chunk)
                if txn.put(digest, view[:cut], db=self._chunks, overwrite=False):
                    if split:
                        txn.put(digest, view[cut:], db=self._tails)
                    counters.bytes_stored += length
                    counters.chunks_stored += 1
            txn.put(pending_key, digest or b"", db=self._map)
            if not had_pending:
                counters.blocks_changed += 1

    def commit_pending(self, txn: lmdb.Transaction, volume: VolumeInfo,
                       counters: PendingCounters, consistency: str,
                       labels: dict[str, str]) -> VersionInfo | None:
        """Make the pending version visible (same transaction as its last blocks)."""
        if counters.blocks_changed == 0:
            txn.delete(keys.volume_id_key(volume.id), db=self._pending)
            return None
        previous = txn.get(keys.version_key(volume.id, counters.version - 1), db=self._versions)
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
        del record["volume"]
        txn.put(keys.version_key(volume.id, counters.version), json.dumps(record).encode(),
                db=self._versions)
        txn.delete(keys.volume_id_key(volume.id), db=self._pending)
        return info

    def stats(self) -> dict[str, int]:
        """Entry counts and sizes, for tests and ``nbdsink store-info``."""
        def gather(txn: lmdb.Transaction) -> dict[str, int]:
            chunk_stat = txn.stat(self._chunks)
            return {
                "chunks": chunk_stat["entries"],
                "map_entries": txn.stat(self._map)["entries"],
                "versions": txn.stat(self._versions)["entries"],
                "volumes": txn.stat(self._volumes)["entries"],
            }
        return self.read(gather)


def _bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def _volume_from(name: str, raw: bytes) -> VolumeInfo:
    rec = json.loads(raw)
    return VolumeInfo(name, rec["id"], rec["size"], rec["block_size"], rec["created"],
                      rec.get("parent"))


def _version_from(volume: str, raw: bytes) -> VersionInfo:
    rec = json.loads(raw)
    return VersionInfo(
        volume=volume, version=rec["version"], timestamp=rec["timestamp"], size=rec["size"],
        blocks_changed=rec["blocks_changed"], bytes_stored=rec["bytes_stored"],
        chunks_stored=rec["chunks_stored"], consistency=rec.get("consistency", "none"),
        labels=rec.get("labels", {}),
    )


def _translate(exc: lmdb.Error) -> StoreError:
    text = str(exc)
    if "No space left" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return StoreFull(f"disk full: {text}")
    return StoreError(f"LMDB error: {text}")
