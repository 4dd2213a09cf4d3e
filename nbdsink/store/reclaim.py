"""Giving space back: pruning versions, sweeping unreferenced chunks, compacting segments,
deleting volumes. Part of the store layer: it works on :class:`Store`'s databases directly.

The rule (docs/store.md, "Reclaiming space"): a chunk is deleted only when nothing can reach
it: no committed version, no pending version, no pin, no clone base and no open reader. Each
step keeps it:

- **Pruning** version V (never the newest, a pinned one, a clone's base, or one a connection
  is reading: see :mod:`nbdsink.store.readers`) first deletes V's record and leaves a
  tombstone naming the next version W, in one transaction; then, in short transactions, each
  of V's map entries is moved to W when W has no entry of its own for that block (W went on
  showing it), or dropped (one reference less) when W has one. The oldest version is the
  exception: its entries stay where they are (the versions above read them), and only those
  W shadows are dropped, so pruning it costs what W changed, not the volume's size. A crash
  leaves the tombstone, and the next pass finishes the merge. Readers of every other version
  see the same bytes before, during and after.
- **Sweeping**: a chunk whose reference count fell to zero is deleted from the index once it
  has been unreferenced for a grace period, re-checked in the deleting transaction; a writer
  that took it as stored revives it first (see ``GARBAGE_GRACE_SECONDS``).
- **Compacting** a sealed segment copies its live chunks into the active segment (durably),
  repoints the index in one transaction, and retires the segment only if nothing points into
  it any more, in that same transaction; the file is deleted once no reader uses it.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from nbdsink.store import holes, keys
from nbdsink.store.chunks import HEADER_SIZE
from nbdsink.store.errors import StoreError, UnknownVolume
from nbdsink.store.readers import PruneLock
from nbdsink.store.retention import Candidate, Policy, select
from nbdsink.store.segments import SegmentGone
from nbdsink.store.store import (
    _TIME,
    FLAG_DAMAGED,
    FLAG_NO_CHECKSUM,
    GARBAGE_GRACE_SECONDS,
    Location,
    Reading,
    Store,
    VolumeInfo,
    _data_check,
    _seg_key,
    _u32,
    _unpack_u32,
    checksum,
)

BATCH = 2000
"""Entries per transaction: each stays a few milliseconds, so ingest and reads go on."""
COPY_BATCH_BYTES = 16 << 20
"""Data copied per step of a compaction."""
ALMOST_EMPTY = 0.1
"""A sealed segment with less live data than this fraction of it is compacted whatever was
punched out of it: copying the little left keeps the number of files (and their B-tree
pages) in proportion to the data."""


# -- pruning --------------------------------------------------------------------------------


@dataclass
class PruneReport:
    """What a prune decided (``kept``: version -> the rule or protection that kept it)."""

    volume: str
    policy: str
    kept: dict[int, str] = field(default_factory=dict)
    pruned: list[int] = field(default_factory=list)
    dry_run: bool = False

    def to_json(self, versions: list[tuple[int, str]]) -> dict[str, Any]:
        return {
            "volume": self.volume,
            "policy": self.policy,
            "dry_run": self.dry_run,
            "versions": [
                {"version": v, "time": t, "kept": v in self.kept, "rule": self.kept.get(v)}
                for v, t in versions
            ],
            "pruned": self.pruned,
        }


def protections(store: Store, volume: VolumeInfo) -> dict[int, str]:
    """Versions that no policy may prune, with why: pinned, clone bases."""
    out: dict[int, str] = {}
    for v in store.versions(volume):
        if v.pinned is not None:
            out[v.version] = "pinned"
    for other in store.volumes():
        if other.parent == volume.name and other.base is not None:
            out.setdefault(other.base, f"base of clone {other.name}")
    return out


def prune(store: Store, volume: VolumeInfo, override: Policy | None = None,
          dry_run: bool = False) -> PruneReport:
    """Apply the volume's policy (``override``'s rules win) and prune what it does not keep.

    A volume with no policy (and no override) keeps everything. Versions a connection is
    reading are kept this time ("open reader") and pruned by a later pass.
    """
    finish_pruning(store)
    stored = Policy.from_json(volume.retention or {})
    policy = stored.merged(override) if override is not None else stored
    report = PruneReport(volume.name, policy.describe(), dry_run=dry_run)
    versions = store.versions(volume)
    if policy.is_empty():
        report.kept = {v.version: "no policy" for v in versions}
        return report
    protected = protections(store, volume)
    candidates = [Candidate(v.version, v.timestamp, protected.get(v.version)) for v in versions]
    decided = select(candidates, policy)
    report.kept = {v: r for v, r in decided.items() if r is not None}
    doomed = sorted(v for v, r in decided.items() if r is None)
    if dry_run:
        report.pruned = doomed
        return report
    locks = PruneLock(store.path)
    try:
        for version in doomed:
            if not locks.try_take(volume.id, version):
                report.kept[version] = "open reader"
                continue
            try:
                if _start_prune(store, volume, version):
                    report.pruned.append(version)
                else:
                    report.kept[version] = "newest"
            finally:
                locks.give_back(volume.id, version)
            finish_pruning(store)
    finally:
        locks.close()
    return report


def _start_prune(store: Store, volume: VolumeInfo, version: int) -> bool:
    """Delete ``version``'s record and leave the tombstone (one transaction)."""
    vid = volume.id

    def mark(txn: lmdb.Transaction) -> bool:
        key = keys.version_key(vid, version)
        record = txn.get(key, db=store._versions)
        if record is None or txn.get(key, db=store._pins) is not None:
            return False
        into = _next_version(store, txn, vid, version)
        if into is None:
            return False  # the newest: never pruned
        changed = int(json.loads(bytes(record))["blocks_changed"])
        txn.delete(key, db=store._versions)
        txn.put(key, json.dumps({"into": into, "time": time.time(),
                                 "blocks_changed": changed}).encode(), db=store._pruning)
        return True
    done = store.write(mark)
    if done:
        store.sync()
    return done


def _first_at_or_after(txn: lmdb.Transaction, db: Any, vid: int, version: int) -> int | None:
    """The lowest version number of volume ``vid`` keyed in ``db`` (versions or tombstones)
    at or above ``version``."""
    cur = txn.cursor(db=db)
    if not cur.set_range(keys.version_key(vid, version)):
        return None
    key_vid, found = keys.unpack_version_key(bytes(cur.key()))
    return found if key_vid == vid else None


def _next_version(store: Store, txn: lmdb.Transaction, vid: int, version: int) -> int | None:
    return _first_at_or_after(txn, store._versions, vid, version + 1)


def finish_pruning(store: Store) -> int:
    """Merge the entries of every version whose pruning started (after a crash too).

    Tombstones are finished in version order, so a version's merge always sees the ones
    below it done (a step re-checks that in its own transaction, so two processes finishing
    at once stay correct)."""
    todo = store.read(lambda r: [keys.unpack_version_key(bytes(k))
                                 for k, _ in r.txn.cursor(db=store._pruning)])
    for vid, version in todo:
        after = [0]
        while not _merge_step(store, vid, version, after):
            pass
    return len(todo)


def _last_before(txn: lmdb.Transaction, db: Any, vid: int, version: int) -> int | None:
    """The highest version number of volume ``vid`` keyed in ``db`` below ``version``."""
    cur = txn.cursor(db=db)
    found = cur.prev() if cur.set_range(keys.version_key(vid, version)) else cur.last()
    if not found:
        return None
    key_vid, number = keys.unpack_version_key(bytes(cur.key()))
    return number if key_vid == vid and number < version else None


def _below(store: Store, txn: lmdb.Transaction, vid: int, version: int) -> int | None:
    """The newest version or tombstone of volume ``vid`` older than ``version``."""
    found = [_last_before(txn, db, vid, version) for db in (store._versions, store._pruning)]
    return max((v for v in found if v is not None), default=None)


def _above(store: Store, txn: lmdb.Transaction, vid: int, version: int) -> int | None:
    """The oldest version or tombstone of volume ``vid`` newer than ``version``."""
    found = [_first_at_or_after(txn, db, vid, version + 1)
             for db in (store._versions, store._pruning)]
    return min((v for v in found if v is not None), default=None)


def _merge_step(store: Store, vid: int, version: int, after: list[int]) -> bool:
    """One transaction of finishing ``version``'s tombstone; True when done.

    A pruned version's entries stay under its number: an entry is what every version at or
    above its own number shows of its block, up to the block's next entry, and no version is
    left between the pruned one and the next version or tombstone above (S). So they go on
    being read by S and the versions above it, and never by those below. Only the entries S
    makes invisible are dropped: for each block S changed, every entry older than S and newer
    than the version or tombstone below (P) (the entries of P and older stay visible to P).
    That costs what S changed, whatever the pruned version and the ones pruned before it
    changed. (Moving the entries into S instead, as earlier formats did, made the version
    after a protected one, a pin, a clone base or an open reader, collect every block
    written since, and move them all again at each prune: in the churn benchmark with a
    reader on version 1, prunes took ten times as long.)

    Between two versions left, a block has at most one entry (a prune drops what the next
    one shadows), so the dropped entries count the blocks by which the pruned version's
    ``blocks_changed`` overstates what S changed since P.
    """
    def step(txn: lmdb.Transaction) -> bool:
        raw = txn.get(keys.version_key(vid, version), db=store._pruning)
        if raw is None:
            return True  # finished meanwhile (another process)
        shadow = _above(store, txn, vid, version)
        if shadow is None:
            # Nothing above: the newest version is never pruned, so only a volume being
            # deleted gets here; its entries go with it.
            txn.delete(keys.version_key(vid, version), db=store._pruning)
            return True
        floor = _below(store, txn, vid, version)
        done, dropped = _drop_shadowed(store, txn, vid, shadow, floor, after)
        if floor is not None:
            # The blocks S now shows changed since P: its own and the pruned version's,
            # but for the ones it shadowed (counted as they are dropped).
            _add_changed(store, txn, vid, shadow, -dropped)
        if done:
            tomb = json.loads(bytes(raw))
            if floor is not None and "blocks_changed" in tomb:
                _add_changed(store, txn, vid, shadow, int(tomb["blocks_changed"]))
            txn.delete(keys.version_key(vid, version), db=store._pruning)
        return done
    return store.write(step)


def _add_changed(store: Store, txn: lmdb.Transaction, vid: int, version: int,
                 delta: int) -> None:
    """Add ``delta`` to the ``blocks_changed`` of ``version`` (a version's record, or a
    tombstone's, which hands it on when it is finished)."""
    if not delta:
        return
    key = keys.version_key(vid, version)
    for db in (store._versions, store._pruning):
        raw = txn.get(key, db=db)
        if raw is not None:
            rec = json.loads(bytes(raw))
            if "blocks_changed" in rec:
                rec["blocks_changed"] = max(0, int(rec["blocks_changed"]) + delta)
                txn.put(key, json.dumps(rec).encode(), db=db)
            return


def _drop_shadowed(store: Store, txn: lmdb.Transaction, vid: int, shadow: int,
                   floor: int | None, after: list[int]) -> tuple[bool, int]:
    """Drop the entries newer than ``floor`` (None: all) and older than ``shadow`` of the
    blocks ``shadow`` has entries for, continuing from block ``after[0]``. Returns (done,
    entries dropped in this step)."""
    changes = txn.cursor(db=store._changes)
    entries = txn.cursor(db=store._map)
    prefix = keys.change_key(vid, shadow, 0)[:12]
    lowest = -1 if floor is None else floor
    n = dropped = 0
    if changes.set_range(keys.change_key(vid, shadow, after[0])):
        while n < BATCH and bytes(changes.key())[:12] == prefix:
            _, _, block = keys.unpack_change_key(bytes(changes.key()))
            # Entries of a block sort newest first: from the newest below ``shadow`` on.
            while entries.set_range(keys.map_key(vid, block, shadow - 1)):
                key_vid, key_block, old = keys.unpack_map_key(bytes(entries.key()))
                if (key_vid, key_block) != (vid, block) or old <= lowest:
                    break
                value = bytes(entries.value())
                if value:
                    store._decref(txn, value)
                txn.delete(keys.change_key(vid, old, block), db=store._changes)
                entries.delete()
                dropped += 1
            after[0] = block + 1
            n += 1
            if not changes.next():
                break
    return n < BATCH, dropped


def apply_policies(store: Store) -> list[PruneReport]:
    """Prune every volume that has a retention policy (what ``serve`` runs by itself)."""
    return [prune(store, v) for v in store.volumes() if v.retention]


# -- sweeping unreferenced chunks -----------------------------------------------------------


@dataclass
class SweepReport:
    chunks: int = 0
    bytes: int = 0


Guard = Callable[[], AbstractContextManager[set[bytes]]]
"""Holds writers back while one sweep transaction runs, giving the digests they rely on."""


@contextmanager
def _no_guard() -> Iterator[set[bytes]]:
    yield set()


def sweep(store: Store, grace: float = GARBAGE_GRACE_SECONDS,
          deadline: float | None = None, guard: Guard = _no_guard) -> SweepReport:
    """Delete from the index the chunks unreferenced for longer than ``grace`` seconds.

    ``guard`` (the server's heads) spares the chunks unsaved writes rely on, which lets the
    server sweep with no grace at all."""
    report = SweepReport()
    after = b""
    while deadline is None or time.monotonic() < deadline:
        def step(txn: lmdb.Transaction, after: bytes = after,
                 spare: AbstractSet[bytes] = frozenset()) -> tuple[bytes | None, int, int]:
            cur = txn.cursor(db=store._garbage)
            found = cur.set_range(after) if after else cur.first()
            limit = time.time() - grace
            live: dict[int, int] = {}
            chunks = nbytes = 0
            n = 0
            last = None
            while found and n < BATCH:
                digest = bytes(cur.key())
                last = digest
                n += 1
                since = _time(cur.value())
                if since > limit or digest in spare:
                    found = cur.next()
                    continue
                if txn.get(digest, db=store._refs) is None:
                    raw = txn.get(digest, db=store._index)
                    if raw is not None:
                        loc = Location.decode(raw)
                        txn.delete(digest, db=store._index)
                        txn.delete(_seg_key(loc.segment, digest), db=store._seg_chunks)
                        if loc.segment:
                            txn.put(_seg_key(loc.segment, digest), _TXN.pack(txn.id()),
                                    db=store._holes)
                        live[loc.segment] = live.get(loc.segment, 0) - loc.length
                        chunks += 1
                        nbytes += loc.length
                cur.delete()  # moves to the next record, if there is one
                found = bool(cur.key())
            store._add_live(txn, live)
            return (last if found else None), chunks, nbytes
        with guard() as spare:
            def guarded(txn: lmdb.Transaction) -> tuple[bytes | None, int, int]:
                return step(txn, spare=spare)
            nxt, chunks, nbytes = store.write(guarded)
        report.chunks += chunks
        report.bytes += nbytes
        if nxt is None:
            break
        after = nxt
    return report


_TXN = struct.Struct(">Q")


# -- punching dead chunks out of sealed segments ----------------------------------------------


@dataclass
class PunchReport:
    chunks: int = 0
    bytes: int = 0


def punch_holes(store: Store, deadline: float | None = None) -> PunchReport:
    """Free the disk blocks of swept chunks in sealed segments (see :mod:`.holes`).

    A chunk's pages are punched only when (in one snapshot) its segment is sealed and the
    index does not point to that segment for it (it may have come back while the segment was
    active), and no read transaction of any process is older than the sweep that deleted
    it (an older one may have looked it up, and may still read it)."""
    report = PunchReport()
    oldest = store.oldest_reader()

    def scan(r: Reading) -> tuple[dict[int, list[bytes]], list[bytes]]:
        ready: dict[int, list[bytes]] = {}
        forget: list[bytes] = []
        states: dict[int, str] = {}
        for k, v in r.txn.cursor(db=store._holes):
            key = bytes(k)
            sid, digest = _unpack_u32(key[:4]), key[4:]
            if sid not in states:
                states[sid] = store._segment_record(r.txn, sid)["state"]
            raw = r.txn.get(digest, db=store._index)
            if states[sid] == "retired" or (raw is not None
                                            and Location.decode(raw).segment == sid):
                forget.append(key)  # the file is gone, or the chunk is live there again
            elif states[sid] == "sealed" and (oldest is None
                                              or oldest >= _TXN.unpack(bytes(v))[0]):
                ready.setdefault(sid, []).append(digest)
        return ready, forget
    ready, forget = store.read(scan)
    if ready:
        # The sweeps that unindexed these chunks must be durable before their pages go: after
        # a power cut that undid a sweep, the index would hold a chunk whose data are zeros,
        # and the next write of the same content would be taken as already stored.
        store.sync()
    for sid, digests in ready.items():
        if deadline is not None and time.monotonic() > deadline:
            break
        try:
            n, nbytes = _punch_segment(store, sid, digests)
        except SegmentGone:
            n, nbytes = 0, 0
        report.chunks += n
        report.bytes += nbytes
        forget.extend(_seg_key(sid, d) for d in digests)

    def done(txn: lmdb.Transaction) -> None:
        for key in forget:
            txn.delete(key, db=store._holes)
    if forget:
        store.write(done)
    return report


def _punch_segment(store: Store, sid: int, digests: list[bytes]) -> tuple[int, int]:
    seg = store.segments.acquire(sid)
    try:
        fd = os.open(seg.path, os.O_RDWR)
        try:
            mapping = holes.FileMapping(seg.path)
            runs: list[tuple[int, int]] = []
            with seg.env.begin(buffers=True) as txn:
                for digest in digests:
                    value = txn.get(digest, db=seg.chunks)
                    if value is None:
                        continue
                    offset = mapping.offset_of(holes.buffer_address(value))
                    if offset is None:
                        mapping = holes.FileMapping(seg.path)  # the map moved: look again
                        offset = mapping.offset_of(holes.buffer_address(value))
                    run = None if offset is None else holes.overflow_run(
                        fd, offset, len(value), seg.page_size)
                    if run is not None:  # else not alone in its pages: compaction's to free
                        runs.append(run)
            # Neighbouring dead chunks go in one call: a punch costs a journal transaction.
            nbytes = 0
            for start, length in holes.coalesce(runs):
                if not holes.punch(fd, start, length):
                    break  # the filesystem cannot: compaction will
                nbytes += length
            return (len(runs), nbytes) if nbytes else (0, 0)
        finally:
            os.close(fd)
    finally:
        store.segments.release(seg)


def _time(raw: bytes | memoryview) -> float:
    return float(_TIME.unpack(bytes(raw))[0])


# -- compacting segments --------------------------------------------------------------------


@dataclass
class SegmentUsage:
    id: int
    state: str
    live: int
    used: int
    """Bytes of the file LMDB uses (pages holding dead chunks included)."""
    disk: int = 0
    """Bytes of the file allocated on disk (punched-out pages of dead chunks excluded)."""

    @property
    def dead_fraction(self) -> float:
        return 0.0 if self.used <= 0 else max(0.0, 1.0 - self.live / self.used)

    @property
    def wasted_fraction(self) -> float:
        """Of the disk space the segment takes, the part that holds no live chunk."""
        return 0.0 if self.disk <= 0 else max(0.0, 1.0 - self.live / self.disk)


def segment_usage(store: Store) -> list[SegmentUsage]:
    records = store.read(lambda r: {
        _unpack_u32(k): json.loads(bytes(v)) for k, v in r.txn.cursor(db=store._segments_db)})
    out = []
    for sid, rec in sorted(records.items()):
        if rec["state"] == "retired":
            continue
        if sid == 0:
            used = disk = _legacy_bytes(store)
        else:
            try:
                seg = store.segments.acquire(sid)
            except SegmentGone:
                continue
            except StoreError:
                used = 0
            else:
                try:
                    used = seg.used_bytes()
                finally:
                    store.segments.release(seg)
            disk = store.segments.file_bytes(sid)
        out.append(SegmentUsage(sid, rec["state"], int(rec.get("live", 0)), used, disk))
    return out


def _legacy_bytes(store: Store) -> int:
    def measure(r: Reading) -> int:
        total = 0
        for db in (store._chunks, store._tails):
            st = r.txn.stat(db)
            total += (st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]) * st["psize"]
        return total
    return store.read(measure)


def compact(store: Store, min_dead: float = 0.25, seal_active: bool = False,
            deadline: float | None = None) -> list[int]:
    """Compact away every sealed segment that wastes at least ``min_dead`` of its disk space
    on dead data, or that is almost empty; with ``seal_active``, seal the active segments
    first when they hold dead data (so that all of it can go). Returns the segments retired.

    Dead chunks whose pages were punched out (:func:`punch_holes`) waste nothing, so a
    segment is copied only for what punching cannot give back (dead data sharing pages
    with live data), or when the filesystem cannot punch at all: copying live data to free
    dead data costs (1 - d) / d bytes written per byte freed at dead fraction d.
    """
    if seal_active:
        seal_dirty(store, min_dead)
    retired = []
    for u in segment_usage(store):
        if deadline is not None and time.monotonic() > deadline:
            break
        wanted = u.state == "sealed" and (
            u.live == 0 or u.live < ALMOST_EMPTY * u.used
            or (u.dead_fraction >= min_dead and u.wasted_fraction >= min_dead))
        if wanted and compact_segment(store, u.id):
            retired.append(u.id)
    return retired


def seal_dirty(store: Store, min_dead: float) -> list[int]:
    """Seal the active segments that hold at least ``min_dead`` dead data (and more than a
    MiB), so that punching and compaction can give it back now (``nbdsink gc``)."""
    sealed = []
    for u in segment_usage(store):
        if u.state == "active" and u.live < u.used * (1 - min_dead) and u.used > (1 << 20):
            with store.segments.write_lock, store.segments.compaction_lock:
                store._seal(u.id)
            sealed.append(u.id)
    return sealed


def compact_segment(store: Store, sid: int) -> bool:
    """Move segment ``sid``'s live chunks to the active segment and retire it."""
    while True:
        digests = store.read(lambda r: _live_digests(store, r, sid, limit=4096))
        if not digests:
            break
        batch: list[tuple[bytes, bytes, Location]] = []
        size = 0
        for d in digests:
            found = _read_encoded(store, sid, d)
            if found is None:
                continue
            encoded, loc = found
            batch.append((d, encoded, loc))
            size += len(encoded)
            if size >= COPY_BATCH_BYTES:
                _move(store, sid, batch)
                batch, size = [], 0
        if batch:
            _move(store, sid, batch)

    def retire(txn: lmdb.Transaction) -> bool:
        cur = txn.cursor(db=store._seg_chunks)
        if cur.set_range(_u32(sid)) and bytes(cur.key())[:4] == _u32(sid):
            return False  # something was indexed into it meanwhile: another pass
        rec = store._segment_record(txn, sid)
        rec.update(state="retired", live=0)
        txn.put(_u32(sid), json.dumps(rec).encode(), db=store._segments_db)
        if sid == 0:
            txn.drop(store._chunks, delete=False)
            txn.drop(store._tails, delete=False)
        return True
    if not store.write(retire):
        return False
    store.sync()
    if sid != 0:
        store.segments.retire(sid)
    return True


def _live_digests(store: Store, r: Reading, sid: int, limit: int) -> list[bytes]:
    cur = r.txn.cursor(db=store._seg_chunks)
    out: list[bytes] = []
    prefix = _u32(sid)
    if cur.set_range(prefix):
        for k in cur.iternext(keys=True, values=False):
            k = bytes(k)
            if k[:4] != prefix or len(out) >= limit:
                break
            out.append(k[4:])
    return out


def _read_encoded(store: Store, sid: int, digest: bytes) -> tuple[bytes, Location] | None:
    def get(r: Reading) -> tuple[bytes, Location] | None:
        loc = store.locate(r, digest)
        if loc is None or loc.segment != sid:
            return None
        if sid == 0:
            stored, tail = r.txn.get(digest, db=store._chunks), r.txn.get(digest, db=store._tails)
        else:
            stored, tail = r.segments.get(sid, digest)
        if stored is None:
            return bytes(HEADER_SIZE), Location(sid, loc.length, 0, FLAG_DAMAGED)
        encoded = bytes(stored) + (bytes(tail) if tail is not None else b"")
        flags = loc.flags & FLAG_DAMAGED
        if not loc.flags & FLAG_NO_CHECKSUM and _data_check(stored, tail) != loc.check:
            flags |= FLAG_DAMAGED  # moved as it is, and still known to be damaged
        return encoded, Location(sid, loc.length, loc.check, flags)
    return store.read(get)


def _move(store: Store, sid: int, batch: list[tuple[bytes, bytes, Location]]) -> None:
    """Copy ``batch`` to the compaction segment (durably), then repoint what still points here."""
    for _attempt in range(3):
        with store.segments.compaction_lock:
            active = store._active_segment(b"compaction_segment")
            items = [(d, e) for d, e, loc in batch if len(e) > HEADER_SIZE]
            used = store.segments.write(active, items) if items else 0
            if used >= store.segments.segment_bytes:
                store._seal(active)

        def repoint(txn: lmdb.Transaction, active: int = active) -> None:
            if store._segment_record(txn, active)["state"] == "retired":
                raise SegmentGone(f"segment {active} was compacted away")
            live: dict[int, int] = {}
            for d, encoded, old in batch:
                raw = txn.get(d, db=store._index)
                if raw is None or Location.decode(raw).segment != sid:
                    continue  # swept or moved meanwhile
                if len(encoded) <= HEADER_SIZE:
                    new = Location(sid, old.length, old.check, FLAG_DAMAGED)
                    txn.put(d, new.encode(), db=store._index)
                    continue
                flags = old.flags & FLAG_DAMAGED
                data = memoryview(encoded)[HEADER_SIZE:]
                new = Location(active, old.length, checksum(data) if not flags else old.check, flags)
                store._repoint(txn, d, Location.decode(raw), new, live)
                if sid == 0:
                    txn.delete(d, db=store._chunks)
                    txn.delete(d, db=store._tails)
            store._add_live(txn, live)
        try:
            store.write(repoint)
            return
        except SegmentGone:
            continue
    raise StoreError(f"could not move the chunks of segment {sid}")


# -- deleting a volume ----------------------------------------------------------------------


def delete_volume(store: Store, name: str) -> None:
    """Delete volume ``name`` and every version of it (the space comes back with the next
    sweep and compaction). Refused while a clone is based on one of its versions."""
    volume = store.volume(name)
    clones = [v.name for v in store.volumes() if v.parent == name]
    if clones:
        raise StoreError(f"volume {name!r} is the base of clone(s) {', '.join(clones)}: "
                         "delete those first")

    def mark(txn: lmdb.Transaction) -> None:
        if txn.get(name.encode(), db=store._volumes) is None:
            raise UnknownVolume(f"no volume named {name!r}")
        txn.delete(name.encode(), db=store._volumes)
        txn.put(b"deleting:" + _u32(volume.id), name.encode(), db=store._meta)
    store.write(mark)
    store.sync()
    finish_deletions(store)


def finish_deletions(store: Store) -> int:
    """Remove what volumes being deleted still hold (after a crash too)."""
    todo = store.read(lambda r: [
        _unpack_u32(bytes(k)[len(b"deleting:"):]) for k, _ in _prefixed(r.txn.cursor(db=store._meta),
                                                                      b"deleting:")])
    for vid in todo:
        for db in (store._map, store._changes, store._versions, store._pins, store._pruning):
            while not _drop_prefix(store, db, _u32(vid), decref=db is store._map):
                pass

        def finish(txn: lmdb.Transaction, vid: int = vid) -> None:
            txn.delete(keys.volume_id_key(vid), db=store._pending)
            txn.delete(b"last_version:" + _u32(vid), db=store._meta)
            txn.delete(b"deleting:" + _u32(vid), db=store._meta)
        store.write(finish)
    if todo:
        store.sync()
    return len(todo)


def _prefixed(cur: Any, prefix: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    if cur.set_range(prefix):
        for k, v in cur:
            if not bytes(k).startswith(prefix):
                break
            out.append((bytes(k), bytes(v)))
    return out


def _drop_prefix(store: Store, db: Any, prefix: bytes, decref: bool) -> bool:
    def step(txn: lmdb.Transaction) -> bool:
        cur = txn.cursor(db=db)
        n = 0
        if not cur.set_range(prefix):
            return True
        while bytes(cur.key()).startswith(prefix):
            if decref and len(cur.value()):
                store._decref(txn, bytes(cur.value()))
            n += 1
            if not cur.delete() or n >= BATCH:
                break
        return n < BATCH
    return store.write(step)


# -- usage ----------------------------------------------------------------------------------


def usage(store: Store, per_volume: bool = True) -> dict[str, Any]:
    """What ``nbdsink df`` shows: per volume and in total, logical bytes (the newest version's
    data), referenced bytes (distinct chunks its versions use), and for the store the bytes
    its segments hold and the bytes on disk."""
    volumes = []
    if per_volume:
        for v in store.volumes():
            volumes.append(_volume_usage(store, v))

    def totals(r: Reading) -> int:
        referenced = 0
        for digest, raw in r.txn.cursor(db=store._index):
            if r.txn.get(bytes(digest), db=store._refs) is not None:
                referenced += Location.decode(raw).length
        return referenced
    referenced = store.read(totals)
    segments = segment_usage(store)
    return {
        "volumes": volumes,
        "total": {
            "logical_bytes": sum(int(v["logical_bytes"]) for v in volumes),
            "referenced_bytes": referenced,
            "stored_bytes": sum(u.used for u in segments),
            "disk_bytes": disk_usage(store.path),
            "segments": len(segments),
        },
    }


def _volume_usage(store: Store, volume: VolumeInfo) -> dict[str, Any]:
    latest = store.latest_version(volume)

    def scan(r: Reading) -> tuple[int, int]:
        digests: set[bytes] = set()
        cur = r.txn.cursor(db=store._map)
        prefix = _u32(volume.id)
        if cur.set_range(prefix):
            for k, v in cur:
                if bytes(k)[:4] != prefix:
                    break
                if len(v):
                    digests.add(bytes(v))
        referenced = 0
        for d in digests:
            loc = store.locate(r, d)
            if loc is not None:
                referenced += loc.length
        data_blocks = 0
        if latest:
            block = 0
            while block < volume.blocks:
                n = min(65536, volume.blocks - block)
                data_blocks += sum(1 for d in store.block_digests(r, volume, latest, block, n) if d)
                block += n
        return data_blocks * volume.block_size, referenced
    logical, referenced = store.read(scan)
    return {"name": volume.name, "versions": len(store.versions(volume)),
            "logical_bytes": logical, "referenced_bytes": referenced}


def disk_usage(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (what ``du`` says)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total

