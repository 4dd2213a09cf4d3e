"""Checking chunks for ``nbdsink verify``: each indexed chunk is in the segment the index
names, with the length it says, and (``full``) its data match their checksum and hash
(blake3) to the chunk's digest.

Chunks are checked in batches, each in one read snapshot, in this process
(:func:`check_batch`) or, for ``verify --full`` of a store on disk, in worker processes
(:class:`CheckPool`): blake3 lets the GIL go, but everything around it in a check is
Python that holds it, so threads cannot run checks side by side; processes can, each with
the store open itself (LMDB readers in several processes are what it is made for).
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.pool
import multiprocessing.util
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import blake3

from nbdsink.store import structure, workers
from nbdsink.store.chunks import HEADER_SIZE
from nbdsink.store.errors import StoreError
from nbdsink.store.lmdb_pages import Damage as PageDamage
from nbdsink.store.segments import SegmentGone
from nbdsink.store.store import (
    _INDEX_SIZE,
    FLAG_DAMAGED,
    FLAG_NO_CHECKSUM,
    Location,
    Reading,
    Store,
    _data_check,
    _unpack_index,
)
from nbdsink.store.structure import StoreDamaged

Indexed = tuple[bytes, int, int, int, int]
"""An index entry, as verify goes through them: digest, segment, length, checksum, flags."""


@dataclass
class BatchFound:
    """What one batch of chunk checks found (applied once the batch has run through)."""

    checked: int = 0
    records: list[PageDamage] = field(default_factory=list)
    problems: list[tuple[bytes, str]] = field(default_factory=list)
    error: str | None = None
    """Set by a worker whose batch could not be checked (the store did not open, say)."""

    def absorb(self, other: BatchFound) -> None:
        self.checked += other.checked
        self.records += other.records
        self.problems += other.problems


def _check_entry(store: Store, r: Reading, entry: Indexed, full: bool,
                 found: BatchFound) -> None:
    """Check one chunk of the listing in snapshot ``r``.

    The listing is an older snapshot than ``r``: a server may have compacted the chunk into
    another segment since (the index and the segments' lists change in one transaction) or
    swept it. What looks wrong is judged by ``r``'s own index entry, so that a live server's
    upkeep is never taken for damage. A segment whose file went (compacted away after ``r``
    began) raises SegmentGone: Store.read reads again, from a snapshot where the index has
    moved on."""
    digest, segment, length, checksum, flags = entry
    if flags & FLAG_DAMAGED:
        found.problems.append((digest, "damaged (found earlier), not yet healed"))
        return
    unlisted = _unlisted(store, r, digest, segment)
    if unlisted and _moved(store, r, entry, full, found):
        return
    problem = _check_one(store, r, digest, segment, length, checksum, flags, full)
    if problem and not unlisted and _moved(store, r, entry, full, found):
        return
    if unlisted:
        found.records.append(unlisted)
    if problem:
        found.problems.append((digest, problem))
    found.checked += length if full else 1


def _moved(store: Store, r: Reading, entry: Indexed, full: bool, found: BatchFound) -> bool:
    """Whether ``r``'s index entry for the chunk differs from the listing's (then that one is
    checked instead, or nothing when it was swept)."""
    now = _index_entry(store, r, entry[0])
    if now == entry:
        return False
    if now is not None:
        _check_entry(store, r, now, full, found)
    return True


def indexed(digest: bytes, raw: Any) -> Indexed:
    """An index entry as a plain tuple (a Location per chunk cost a twentieth of verify
    --full); one of the wrong size raises as Location.decode does."""
    if len(raw) != _INDEX_SIZE:
        Location.decode(raw)  # raises StoreDamaged, naming the size
    segment, length, checksum, flags = _unpack_index(raw)
    return digest, segment, length, checksum, flags


def _index_entry(store: Store, r: Reading, digest: bytes) -> Indexed | None:
    """``digest``'s index entry in this snapshot (None: not indexed, or behind known damage)."""
    try:
        raw = r.txn.get(digest, db=store._index)
    except StoreDamaged:
        return None
    return None if raw is None else indexed(digest, raw)


def _unlisted(store: Store, r: Reading, digest: bytes, segment: int) -> PageDamage | None:
    """The segment's list of chunks (what compaction copies before it deletes the segment)
    holds every chunk the index places there: a damaged entry would let compaction delete
    a chunk still in use. The damage to record when it does not (like damaged map records:
    the store is then read-only, so nothing is compacted until it is restored)."""
    key = struct.pack(">I", segment) + digest
    try:
        if r.txn.get(key, db=store._seg_chunks) is not None:
            return None
    except StoreDamaged:
        return None  # behind known damage: the structural report covers it
    return PageDamage(
        "seg_chunks", None, f"chunk {digest.hex()}: the index places it in segment "
        f"{segment}, whose list of chunks lacks it (a damaged page): compacting the "
        "segment would lose it", key=key, guard_low=key, guard_high=key + b"\0")


def _check_one(store: Store, r: Reading, digest: bytes, segment: int, length: int,
               checksum: int, flags: int, full: bool) -> str | None:
    if segment == 0:
        stored, tail = r.txn.get(digest, db=store._chunks), r.txn.get(digest, db=store._tails)
    else:
        try:
            stored, tail = r.segments.get(segment, digest)
        except SegmentGone:
            raise  # compacted away: the caller reads again
        except StoreError as exc:
            return f"segment {segment} unreadable: {exc}"
    if stored is None:
        return f"missing from segment {segment}"
    held = len(stored) - HEADER_SIZE + (len(tail) if tail is not None else 0)
    if held != length:
        return f"holds {held} bytes in segment {segment}, the index says {length}"
    if not full:
        return None
    # The checksum first: it reads the data from memory at least as fast as blake3 would,
    # and blake3 then finds them in the CPU's cache (measured: both together take less
    # time than blake3 alone; the other order, a tenth more).
    if not flags & FLAG_NO_CHECKSUM and _data_check(stored, tail) != checksum:
        return f"fails its checksum in segment {segment}: damaged on disk"
    h = blake3.blake3(memoryview(stored)[HEADER_SIZE:])
    if tail is not None:
        h.update(tail)
    if h.digest() != digest:
        return f"data in segment {segment} do not hash to the chunk's digest"
    return None


def check_batch(store: Store, part: list[Indexed], full: bool) -> BatchFound:
    """Check the chunks of ``part`` in one read snapshot of ``store``."""
    def check(r: Reading, part: list[Indexed] = part) -> BatchFound:
        found = BatchFound()
        for entry in part:
            _check_entry(store, r, entry, full, found)
        return found

    try:
        return store.read(check)
    except StoreDamaged:
        # A segment file is missing (Store.read gave up reading again): chunk by chunk,
        # so that the other segments' chunks are checked and the missing ones are named.
        found = BatchFound()
        for entry in part:
            try:
                one = store.read(functools.partial(check, part=[entry]))
            except StoreDamaged as exc:
                found.problems.append((entry[0], str(exc)))
                continue
            found.absorb(one)
        return found


# -- worker processes ---------------------------------------------------------------------


class CheckPool:
    """Worker processes for ``nbdsink verify``: they walk environments (:attr:`pool`, given
    to :func:`structure.check_store`) and check batches of chunks (:meth:`check`), each
    worker with the store at ``path`` open itself.

    Workers are forked (see :mod:`nbdsink.store.workers`): create the pool before this
    process opens the store with LMDB, and only when :func:`workers.can_fork`.
    """

    def __init__(self, path: Path, full: bool, jobs: int) -> None:
        self.jobs = jobs
        self.pool = workers.fork_pool(jobs, _start_worker, (str(path), full))

    def check(self, batches: Iterable[list[Indexed]],
              walk: structure.StructureReport | None = None) -> Iterator[BatchFound]:
        """Start checking ``batches`` (at once: the workers go on while the caller does
        other work); what each found, in the batches' order, as the caller takes it.

        Workers open the store when they get their first batch, and keep away from the
        damage recorded in it then (the caller records its walk first); ``walk``: the
        damage to keep away from instead, when the walk could not be recorded."""
        return _raising(self.pool.imap(_check_in_worker, ((part, walk) for part in batches)))

    def __enter__(self) -> CheckPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.pool.close()  # workers close their store and leave
        else:
            self.pool.terminate()  # an error or Ctrl-C: the server forgets dead readers
        self.pool.join()


def _raising(found: Iterator[BatchFound]) -> Iterator[BatchFound]:
    for one in found:
        if one.error is not None:
            raise StoreError(one.error)
        yield one


_worker: dict[str, Any] = {}
"""In a worker: the store's path and ``full``; the store once opened, and whether the walk
handed with the batches was taken."""


def _start_worker(path: str, full: bool) -> None:
    _worker.update(path=path, full=full)


def _check_in_worker(task: tuple[list[Indexed], structure.StructureReport | None]
                     ) -> BatchFound:
    part, walk = task
    try:
        store = _worker.get("store")
        if store is None:
            # Opened here, not in the initializer: a pool replaces a worker whose
            # initializer fails, for ever. Opening loads the damage recorded.
            store = Store(_worker["path"])
            multiprocessing.util.Finalize(store, store.close, exitpriority=10)
            _worker["store"] = store
        if walk is not None and not _worker.get("walk_taken"):
            # The same walk comes with every batch of this pool's one verify: once is enough.
            store.reload_damage(walk)
            _worker["walk_taken"] = True
        return check_batch(store, part, _worker["full"])
    except StoreError as exc:
        # Returned, not raised: our errors carry objects that need not survive pickling.
        return BatchFound(error=str(exc))
