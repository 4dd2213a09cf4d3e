"""Reading versions and writing the head (the pending version) of a volume.

:func:`read_into` serves every read: historic versions straight from the map, the head through
overlays of the writes not yet saved to LMDB.

:class:`Head` batches writes in memory and saves them to LMDB as the pending version when the
batch grows past a bound, so the fsync that a durable LMDB commit costs is paid once per batch,
not once per NBD request. Two batches exist at most: one filling while the previous one is
being saved, so ingest goes on during the save (the LMDB commit releases the GIL). A commit
(an NBD FLUSH) saves the batch and writes the version record in one transaction. Pending writes
saved to LMDB survive a crash and resume as the pending version of the next server process; an
unsaved batch does not (an NBD client may assume nothing of unflushed writes), and nothing
half-written is ever visible in a committed version.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import lmdb

from nbdsink.metrics import INGEST_BYTES
from nbdsink.store.chunks import HEADER_SIZE, encode_chunk
from nbdsink.store.chunks import digest as chunk_digest
from nbdsink.store.errors import StoreError
from nbdsink.store.segments import SegmentGone
from nbdsink.store.store import (
    PendingCounters,
    Reading,
    Store,
    VersionInfo,
    VolumeInfo,
)

DEFAULT_BATCH_BYTES = 64 << 20
UNSAVED_BATCHES = 4
"""The most a head keeps unsaved, in batches: past it, writes are refused until a save works.

Unsaved writes pile up only while saves fail (a full disk; the failed batch goes back in
memory, in front of the newer writes). Without a bound, a client writing on through the
errors would grow the server until the kernel killed it, with every client's connection.
Past the bound a write first tries to save; when that fails too, the write fails with its
error (ENOSPC for a full disk) and is not kept. Once there is room again, the next write's
save works and writes go on by themselves."""
SAVE_RETRY_SECONDS = 1.0
"""After a failed save, how long writes wait before one of them tries again (each try writes
up to a whole batch before it fails: one per write would make a full disk also a slow one)."""
MAX_BATCH_AGE = 10.0
"""Seconds an unsaved batch may wait before it is saved even while writes go on. This bounds
how long a writer relies on a chunk it took as stored (see GARBAGE_GRACE_SECONDS)."""

_READ_TURN = threading.Lock()
"""NBD reads of this process take turns, a whole request at a time.

A read is Python work under the GIL between LMDB calls, each of which lets the GIL go. Threads
reading at once (nbdkit runs several per connection, and clients open several connections)
trade the GIL at every one of those calls, a futex hand-over each: four threads read 2.4 times
slower than one. Waiting here instead, outside the GIL, they hand over once per request.
From the page cache nothing is lost: the copies and checks this serialises run under the GIL
anyway. From disk, the page faults LMDB takes with the GIL released no longer overlap: a full
read of a 512 MiB version just after a restart took 0.62-0.76 s with this lock, 0.55-0.70 s
without (three runs each; readahead does most of the work)."""


class UnsavedLimit(StoreError):
    """A write refused because too much is unsaved and saving fails (the errno is that of the
    failure: ENOSPC for a full disk)."""


@dataclass
class Batch:
    """Writes not yet saved to LMDB: block -> digest (None: zeros), digest -> encoded chunk.

    A digest without an entry in ``chunks`` is already in the store (it was looked up when
    the block was written), so a duplicate block costs no copy and no memory.
    """

    blocks: dict[int, bytes | None] = field(default_factory=dict)
    chunks: dict[bytes, bytearray] = field(default_factory=dict)
    nbytes: int = 0
    since: float = 0.0
    """When the oldest write of the batch arrived (monotonic), 0 while empty."""

    def absorb(self, newer: Batch) -> None:
        """Fold a newer batch into this one (used to put back a batch whose save failed)."""
        self.blocks.update(newer.blocks)
        self.chunks.update(newer.chunks)
        self.nbytes += newer.nbytes
        self.since = min([t for t in (self.since, newer.since) if t], default=0.0)


def read_into(store: Store, volume: VolumeInfo, version: int, buf: memoryview, offset: int,
              overlays: Sequence[Batch] = ()) -> None:
    """Fill ``buf`` with the bytes of ``volume`` at ``version`` from ``offset``; ``overlays``
    (newest first) hold unsaved writes that take precedence over the map."""
    bs = volume.block_size
    length = len(buf)
    if length == 0:
        return
    first = offset // bs
    count = (offset + length - 1) // bs - first + 1

    def fill(r: Reading) -> None:
        digests = store.block_digests(r, volume, version, first, count)
        skip = offset - first * bs
        if not overlays:
            store.copy_blocks(r, digests, buf, skip, bs)
            return
        pos = 0  # where the current block's bytes go in buf
        for i, digest in enumerate(digests):
            block = first + i
            digest, chunk = _overlay_lookup(overlays, block, digest)
            n = min(bs - skip, length - pos)
            if chunk is not None:
                buf[pos : pos + n] = memoryview(chunk)[HEADER_SIZE + skip : HEADER_SIZE + skip + n]
            else:
                store.copy_blocks(r, [digest], buf[pos : pos + n], skip, bs)
            pos += n
            skip = 0

    with _READ_TURN:
        store.read(fill)


def block_is_data(store: Store, volume: VolumeInfo, version: int, first: int, count: int,
                  overlays: Sequence[Batch] = ()) -> list[bool]:
    """For blocks first..first+count-1: True where the block holds data, False where zero."""
    def scan(r: Reading) -> list[bool]:
        digests = store.block_digests(r, volume, version, first, count)
        if not overlays:
            return [digest is not None for digest in digests]
        return [_overlay_lookup(overlays, first + i, digest)[0] is not None
                for i, digest in enumerate(digests)]
    return store.read(scan)


def _overlay_lookup(overlays: Sequence[Batch], block: int, digest: bytes | None
                    ) -> tuple[bytes | None, bytearray | None]:
    for batch in overlays:
        if block in batch.blocks:
            found = batch.blocks[block]
            if found is None:
                return None, None
            for b in overlays:
                chunk = b.chunks.get(found)
                if chunk is not None:
                    return found, chunk
            return found, None
    return digest, None


class DedupGate:
    """Lets the server's own sweeper delete unreferenced chunks at once, safely.

    A writer holds it shared from looking digests up in the store until it has staged the
    blocks that rely on them; the sweeper holds it exclusively while it collects the digests
    every unsaved batch relies on and deletes what is unreferenced and not among them. So no
    chunk a writer took as stored can disappear before its batch gives it a reference.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if self._shared == 0:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._shared:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class Head:
    """The writable head of one volume. One per volume per server process; thread-safe."""

    def __init__(self, store: Store, volume: VolumeInfo,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, gate: DedupGate | None = None) -> None:
        self.store = store
        self.volume = volume
        self.batch_bytes = batch_bytes
        self.max_unsaved_bytes = UNSAVED_BATCHES * batch_bytes
        self.max_unsaved_blocks = UNSAVED_BATCHES * max(1024, batch_bytes // volume.block_size)
        self.gate = gate or DedupGate()
        # _lock guards the batches and makes read-modify-write of a partial block atomic;
        # _save_lock keeps saves and commits in order, one at a time.
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._filling = Batch()
        self._saving: Batch | None = None
        # When the last save failed, and why (None: it worked).
        self._failed: tuple[float, BaseException] | None = None
        self._counters = store.write(lambda txn: store.pending_counters(txn, volume))
        self.last_write = time.monotonic()
        zero = bytes(volume.block_size)
        self._zero_digest = chunk_digest(zero)

    @property
    def pending_version(self) -> int:
        return self._counters.version

    @property
    def unsaved(self) -> bool:
        return bool(self._filling.blocks)

    def relied_upon(self) -> set[bytes]:
        """Digests the unsaved batches point to (what a sweep must spare)."""
        with self._lock:
            return {d for b in self._overlays() for d in b.blocks.values() if d is not None}

    @property
    def unsaved_age(self) -> float:
        """Seconds since the oldest unsaved write (0 when nothing is unsaved)."""
        since = self._filling.since
        return time.monotonic() - since if since and self._filling.blocks else 0.0

    def _overlays(self) -> list[Batch]:
        return [self._filling] if self._saving is None else [self._filling, self._saving]

    def read_into(self, buf: memoryview, offset: int) -> None:
        with self._lock:
            overlays, version = self._overlays(), self.pending_version
        read_into(self.store, self.volume, version, buf, offset, overlays)

    def block_is_data(self, first: int, count: int) -> list[bool]:
        with self._lock:
            overlays, version = self._overlays(), self.pending_version
        return block_is_data(self.store, self.volume, version, first, count, overlays)

    def write(self, data: memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``. ``data`` may be a view of a buffer that is reused
        after this returns: whatever is kept is copied."""
        self._apply(offset, len(data), data)
        INGEST_BYTES.inc(len(data))

    def zero(self, length: int, offset: int) -> None:
        self._apply(offset, length, None)

    def _apply(self, offset: int, length: int, data: memoryview | None) -> None:
        filling = self._filling
        if (filling.nbytes >= self.max_unsaved_bytes
                or len(filling.blocks) >= self.max_unsaved_blocks):
            self._save_before_more()
        bs = self.volume.block_size
        size = self.volume.size
        whole: list[tuple[int, bytes | None, memoryview | None]] = []
        partial: list[int] = []
        block = offset // bs
        end = offset + length
        while block * bs < end:
            start = block * bs
            block_end = min(start + bs, size)
            if offset <= start and end >= block_end:
                if data is None:
                    whole.append((block, None, None))
                else:
                    view = data[start - offset : block_end - offset]
                    whole.append((block, self._digest(view), view))
            else:
                partial.append(block)
            block += 1
        # Duplicates need no copy. A digest counts as stored only when it is durable in the
        # store and referenced (the gate keeps the server's sweeper off it until this batch
        # references it; other processes' sweeps wait a grace period). A digest that an
        # unsaved batch holds is *not* stored yet: that batch may be saved without it (its
        # block was overwritten) or fail, so the block takes a reference to the same encoded
        # chunk, and its own batch stores it (LMDB's overwrite=False makes a second put free).
        with self.gate.shared():
            known = self._known_chunks([d for _, d, _ in whole if d is not None])
            staged: list[tuple[int, bytes | None, bytearray | None]] = []
            for block, digest, piece in whole:
                if digest is None:
                    staged.append((block, None, None))
                elif digest in known:
                    staged.append((block, digest, known[digest]))
                else:
                    assert piece is not None
                    staged.append((block, digest, encode_chunk(piece, pad_to=bs)))
            with self._lock:
                for block in partial:
                    staged.append(self._modified_block(block, offset, end, data))
                self._stage(staged)
                full = self._filling.nbytes >= self.batch_bytes
        if full and self._recent_failure() is None:
            self._save(only_if_full=True)

    def _recent_failure(self) -> BaseException | None:
        """Why the last save failed, if it did less than SAVE_RETRY_SECONDS ago."""
        failed = self._failed
        if failed is not None and time.monotonic() - failed[0] < SAVE_RETRY_SECONDS:
            return failed[1]
        return None

    def _save_before_more(self) -> None:
        """Too much is unsaved (see :data:`UNSAVED_BATCHES`): save it, or refuse the write
        that asked (it is not kept) with the error that keeps saves from working."""
        error = self._recent_failure()
        if error is None:
            self._save(only_if_full=False)
            return
        refused = UnsavedLimit(
            f"{self._filling.nbytes >> 20} MiB of writes to {self.volume.name!r} are waiting "
            f"to be saved and saving fails ({error}): this write is refused, not kept")
        refused.errno = getattr(error, "errno", None) or refused.errno
        raise refused from error

    def _digest(self, view: memoryview) -> bytes | None:
        """The block's digest, or None when it is all zeros (hashing tells us for free)."""
        if len(view) < self.volume.block_size:
            view = memoryview(bytes(view) + bytes(self.volume.block_size - len(view)))
        digest = chunk_digest(view)
        return None if digest == self._zero_digest else digest

    def _known_chunks(self, digests: list[bytes]) -> dict[bytes, bytearray | None]:
        """Digests that need no new encoding: None where the store holds the chunk durably,
        the encoded chunk where only an unsaved batch holds it."""
        if not digests:
            return {}
        with self._lock:
            overlays = self._overlays()
        known: dict[bytes, bytearray | None] = {}
        for d in digests:
            for b in overlays:
                chunk = b.chunks.get(d)
                if chunk is not None:
                    known[d] = chunk
                    break
        rest = [d for d in digests if d not in known]
        if rest:
            stored = self.store.read(lambda r: [d for d in rest if self.store.has_chunk(r, d)])
            known.update(dict.fromkeys(stored))
        return known

    def _modified_block(self, block: int, offset: int, end: int, data: memoryview | None
                        ) -> tuple[int, bytes | None, bytearray | None]:
        """Read-modify-write of a block that a request covers only in part (under _lock)."""
        bs = self.volume.block_size
        current = bytearray(bs)
        read_into(self.store, self.volume, self.pending_version, memoryview(current), block * bs,
                  self._overlays())
        start = max(block * bs, offset)
        stop = min((block + 1) * bs, end)
        if data is None:
            current[start - block * bs : stop - block * bs] = bytes(stop - start)
        else:
            current[start - block * bs : stop - block * bs] = data[start - offset : stop - offset]
        digest = self._digest(memoryview(current))
        return block, digest, (None if digest is None else encode_chunk(current))

    def _stage(self, staged: list[tuple[int, bytes | None, bytearray | None]]) -> None:
        self.last_write = time.monotonic()
        batch = self._filling
        if not batch.since:
            batch.since = self.last_write
        for block, digest, chunk in staged:
            batch.blocks[block] = digest
            if chunk is not None and digest is not None and digest not in batch.chunks:
                batch.chunks[digest] = chunk
                batch.nbytes += len(chunk)

    def save(self) -> None:
        """Save the unsaved writes to LMDB as part of the pending version."""
        self._save(only_if_full=False)

    def make_durable(self) -> None:
        """Make every write acknowledged so far durable as part of the pending version,
        without committing a version (what an NBD FUA write asks for).

        The writes survive a crash and power loss and are in the version the next FLUSH
        commits (of this server process or the next one).
        """
        self._save(only_if_full=False)
        self.store.sync()

    def _save(self, only_if_full: bool) -> None:
        with self._save_lock:
            with self._lock:
                if not self._filling.blocks or (
                        only_if_full and self._filling.nbytes < self.batch_bytes):
                    return
                batch = self._take_filling()
            counters = self._write_batch(batch, lambda txn, c: None)[0]
            with self._lock:
                self._counters = counters
                self._saving = None
                self._failed = None

    def _take_filling(self) -> Batch:
        batch = self._filling
        self._saving = batch
        self._filling = Batch()
        return batch

    def _write_batch(self, batch: Batch,
                     then: Callable[[lmdb.Transaction, PendingCounters], VersionInfo | None]
                     ) -> tuple[PendingCounters, VersionInfo | None]:
        """Save ``batch`` (and run ``then`` in the same transaction). On failure the batch is
        put back in front of the newer writes, and nothing any version shows changed.

        Two steps: the chunks the batch's blocks point to go to a segment and are made
        durable first; then one main transaction indexes them and records the blocks."""
        def save_in(txn: lmdb.Transaction) -> tuple[PendingCounters, VersionInfo | None]:
            # A copy: if the transaction aborts, the counters stay as they were.
            counters = PendingCounters(**self._counters.__dict__)
            self.store.stage_blocks(txn, self.volume, counters, sorted(batch.blocks.items()),
                                    located)
            self.store.put_pending_counters(txn, self.volume, counters)
            return counters, then(txn, counters)

        try:
            referenced = {d for d in batch.blocks.values() if d is not None}
            chunks = {d: c for d, c in batch.chunks.items() if d in referenced}
            for attempt in range(3):
                located = self.store.save_chunks(chunks)
                try:
                    return self.store.write(save_in)
                except SegmentGone:
                    # Another process compacted the segment these went to: write them again.
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        except BaseException as exc:
            with self._lock:
                batch.absorb(self._filling)
                self._filling = batch
                self._saving = None
                self._failed = (time.monotonic(), exc)
            raise

    def commit(self, consistency: str = "none",
               labels: dict[str, str] | None = None) -> VersionInfo | None:
        """Commit everything written so far as the next version; None when nothing changed.

        When this returns, the version is durable (fsynced, meta page included).
        """
        def make_version(txn: lmdb.Transaction, counters: PendingCounters) -> VersionInfo | None:
            return self.store.commit_pending(txn, self.volume, counters, consistency,
                                             dict(labels or {}))

        with self._save_lock:
            with self._lock:
                batch = self._take_filling()
            counters, info = self._write_batch(batch, make_version)
            with self._lock:
                self._saving = None
                self._failed = None
                if info is not None:
                    self._counters = PendingCounters(version=info.version + 1)
                else:
                    self._counters = PendingCounters(version=counters.version)
            if info is not None:
                self.store.sync()
            return info
