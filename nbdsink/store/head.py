"""Reading versions and writing the head (the pending version) of a volume.

:func:`read_into` serves every read: historic versions straight from the map, the head through
an overlay of the writes not yet saved to LMDB.

:class:`Head` batches writes in memory and saves them to LMDB as the pending version when the
batch grows past a bound, so the fsync that a durable LMDB commit costs is paid once per batch,
not once per NBD request. A commit (an NBD FLUSH) saves the batch and writes the version record
in one transaction. Pending writes saved to LMDB survive a crash and resume as the pending
version of the next server process; the in-memory batch does not (an NBD client may assume
nothing of unflushed writes), and nothing half-written is ever visible in a committed version.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import lmdb

from nbdsink.store.chunks import digest as chunk_digest
from nbdsink.store.store import PendingCounters, Store, VersionInfo, VolumeInfo

DEFAULT_BATCH_BYTES = 64 << 20

Overlay = dict[int, bytes | None]
"""block -> digest (None: all zeros), for writes not yet saved to LMDB."""


def read_into(store: Store, volume: VolumeInfo, version: int, buf: memoryview, offset: int,
              overlay: Overlay | None = None, overlay_data: dict[bytes, bytes] | None = None) -> None:
    """Fill ``buf`` with the bytes of ``volume`` at ``version`` from ``offset``."""
    bs = volume.block_size
    length = len(buf)
    if length == 0:
        return
    first = offset // bs
    count = (offset + length - 1) // bs - first + 1

    def fill(txn: lmdb.Transaction) -> None:
        for block, digest in store.block_digests(txn, volume, version, first, count):
            if overlay is not None and block in overlay:
                digest = overlay[block]
            start = max(block * bs, offset)
            end = min((block + 1) * bs, offset + length)
            dst = buf[start - offset : end - offset]
            if digest is None:
                dst[:] = bytes(len(dst))
                continue
            data: bytes | memoryview | None = None
            if overlay_data is not None:
                data = overlay_data.get(digest)
            if data is None:
                data = store.get_chunk(txn, digest)
            dst[:] = data[start - block * bs : end - block * bs]

    store.read(fill)


def block_is_data(store: Store, volume: VolumeInfo, version: int, first: int, count: int,
                  overlay: Overlay | None = None) -> list[bool]:
    """For blocks first..first+count-1: True where the block holds data, False where zero."""
    def scan(txn: lmdb.Transaction) -> list[bool]:
        out = []
        for block, digest in store.block_digests(txn, volume, version, first, count):
            if overlay is not None and block in overlay:
                digest = overlay[block]
            out.append(digest is not None)
        return out
    return store.read(scan)


class Head:
    """The writable head of one volume. One per volume per server process; thread-safe."""

    def __init__(self, store: Store, volume: VolumeInfo,
                 batch_bytes: int = DEFAULT_BATCH_BYTES) -> None:
        self.store = store
        self.volume = volume
        self.batch_bytes = batch_bytes
        self._blocks: Overlay = {}
        self._data: dict[bytes, bytes] = {}
        self._data_bytes = 0
        self.last_write = time.monotonic()
        self._counters = store.write(lambda txn: store.pending_counters(txn, volume))
        self.zero_block = bytes(volume.block_size)

    @property
    def pending_version(self) -> int:
        return self._counters.version

    @property
    def has_pending(self) -> bool:
        with self.store.lock:
            return bool(self._blocks) or self._counters.blocks_changed > 0

    def read_into(self, buf: memoryview, offset: int) -> None:
        with self.store.lock:
            read_into(self.store, self.volume, self.pending_version, buf, offset,
                      self._blocks, self._data)

    def block_is_data(self, first: int, count: int) -> list[bool]:
        with self.store.lock:
            return block_is_data(self.store, self.volume, self.pending_version, first, count,
                                 self._blocks)

    def write(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``: whole blocks hashed outside the lock, partial blocks
        read-modified-written under it (two sub-block writes to one block never lose each
        other's bytes)."""
        self._apply(offset, len(data), data)

    def zero(self, length: int, offset: int) -> None:
        self._apply(offset, length, None)

    def _apply(self, offset: int, length: int, data: memoryview | None) -> None:
        bs = self.volume.block_size
        size = self.volume.size
        staged: list[tuple[int, bytes | None, bytes | None]] = []
        partial: list[int] = []
        block = offset // bs
        end = offset + length
        while block * bs < end:
            start = block * bs
            block_end = min(start + bs, size)
            if offset <= start and end >= block_end:
                if data is None:
                    staged.append((block, None, None))
                else:
                    piece = bytes(data[start - offset : block_end - offset])
                    if block_end - start < bs:
                        piece += bytes(bs - (block_end - start))
                    staged.append(_hashed(block, piece, self.zero_block))
            else:
                partial.append(block)
            block += 1
        with self.store.lock:
            for block in partial:
                current = bytearray(bs)
                self.read_into(memoryview(current), block * bs)
                start = max(block * bs, offset)
                stop = min((block + 1) * bs, end)
                if data is None:
                    current[start - block * bs : stop - block * bs] = bytes(stop - start)
                else:
                    current[start - block * bs : stop - block * bs] = data[start - offset : stop - offset]
                staged.append(_hashed(block, bytes(current), self.zero_block))
            self._stage(staged)

    def _stage(self, staged: Iterable[tuple[int, bytes | None, bytes | None]]) -> None:
        self.last_write = time.monotonic()
        for block, digest, piece in staged:
            self._blocks[block] = digest
            if digest is not None and digest not in self._data:
                assert piece is not None
                self._data[digest] = piece
                self._data_bytes += len(piece)
        if self._data_bytes >= self.batch_bytes:
            self.save()

    @property
    def unsaved(self) -> bool:
        return bool(self._blocks)

    def save(self) -> None:
        """Save the in-memory batch to LMDB as part of the pending version."""
        with self.store.lock:
            if not self._blocks:
                return
            counters = self.store.write(self._save_in)
            self._after_save(counters)

    def _save_in(self, txn: lmdb.Transaction) -> PendingCounters:
        # Work on a copy: if the transaction aborts (map full, disk full), the counters and
        # the batch stay as they were and the next attempt redoes the whole batch.
        counters = PendingCounters(**self._counters.__dict__)
        for block, digest in self._blocks.items():
            data = self._data.get(digest) if digest is not None else None
            self.store.stage_block(txn, self.volume, counters, block, digest, data)
        self.store.put_pending_counters(txn, self.volume, counters)
        return counters

    def _after_save(self, counters: PendingCounters) -> None:
        self._counters = counters
        self._blocks = {}
        self._data = {}
        self._data_bytes = 0

    def commit(self, consistency: str = "none",
               labels: dict[str, str] | None = None) -> VersionInfo | None:
        """Commit everything pending as the next version; None when nothing changed.

        When this returns, the version is durable (fsynced, meta page included).
        """
        with self.store.lock:
            def commit_in(txn: lmdb.Transaction) -> tuple[PendingCounters, VersionInfo | None]:
                counters = self._save_in(txn)
                info = self.store.commit_pending(txn, self.volume, counters, consistency,
                                                 dict(labels or {}))
                return counters, info

            counters, info = self.store.write(commit_in)
            self._after_save(counters)
            if info is not None:
                self._counters = PendingCounters(version=info.version + 1)
                self.store.sync()
            else:
                self._counters = PendingCounters(version=counters.version)
            return info


def _hashed(block: int, piece: bytes, zero_block: bytes) -> tuple[int, bytes | None, bytes | None]:
    if piece == zero_block:
        return block, None, None
    return block, chunk_digest(piece), piece
