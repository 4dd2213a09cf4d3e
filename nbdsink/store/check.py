"""``nbdsink verify``: find what is damaged in a store, and say what it affects.

Structure (always): every map entry's chunk is indexed and its segment holds it with the
length the index says; every version record parses and has a number; index, references and
segments agree. ``full`` also reads every chunk and checks it against its checksum and, by
re-hashing (blake3), against its digest.

A damaged chunk is quarantined (reads of it give EIO; the next write of the same content
replaces it: the sender's next cycle or ``replicate --once --verify`` heals it), and reported
with the volumes, versions and blocks that use it, and whether the newest version of a volume
still uses it (then its content is likely still on the source, and a comparison from the
source heals it).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import operator
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from nbdsink.store import keys, structure, workers
from nbdsink.store.chunk_check import BatchFound, CheckPool, Indexed, check_batch, indexed
from nbdsink.store.errors import StoreError, StoreFormatError, UnknownVolume
from nbdsink.store.lmdb_pages import MAIN_DB
from nbdsink.store.lmdb_pages import Damage as PageDamage
from nbdsink.store.store import (
    _REF,
    Reading,
    Store,
    VolumeInfo,
)
from nbdsink.store.structure import StoreDamaged

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``."""


@dataclass
class Damage:
    digest: str
    problem: str
    uses: list[dict[str, Any]] = field(default_factory=list)
    heal_from_source: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.digest, "problem": self.problem, "uses": self.uses,
                "heal_from_source": self.heal_from_source}


@dataclass
class VerifyReport:
    volumes: int = 0
    versions: int = 0
    map_entries: int = 0
    chunks: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    full: bool = False
    damaged: list[Damage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    structure: structure.StructureReport | None = None
    """The walk of LMDB's own pages (None: not done, e.g. by an in-process caller)."""
    structural: list[dict[str, Any]] = field(default_factory=list)
    """Per damaged environment: what is damaged, and what that makes unreadable."""
    records: list[PageDamage] = field(default_factory=list)
    """Blocks whose map entries and change records disagree (see :func:`_cross_check`):
    kept away from like damaged pages once recorded."""
    refs: list[str] = field(default_factory=list)
    """Chunks whose reference count disagrees with the map entries using it (see
    :func:`_check_refs`)."""
    refs_repaired: int = 0
    """How many of those counts were set back to the map's (then the store is safe again)."""
    workers: int = 0
    """Worker processes that re-hashed the chunks (0: this process did)."""

    @property
    def clean(self) -> bool:
        return (not self.damaged and not self.problems and not self.structural
                and not self.records and not self.refs)

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean, "full": self.full, "volumes": self.volumes,
            "versions": self.versions, "map_entries": self.map_entries, "chunks": self.chunks,
            "bytes_checked": self.bytes_checked, "seconds": round(self.seconds, 3),
            "damaged_chunks": [d.to_json() for d in self.damaged],
            "damaged_records": [d.problem for d in self.records],
            "damaged_refs": self.refs, "refs_repaired": self.refs_repaired,
            "problems": self.problems, "workers": self.workers,
            "structure": {
                "environments": self.structure.environments if self.structure else 0,
                "pages": self.structure.pages if self.structure else 0,
                "damaged": self.structural,
            },
        }


def verify_store(path: str | Path, volume: str | None = None, version: int | None = None,
                 full: bool = False, progress: Progress | None = None,
                 jobs: int | None = None) -> VerifyReport:
    """``nbdsink verify``: walk LMDB's pages of every environment first (without LMDB, so
    that damage there is reported, never a crash), record what was found for servers, then
    open the store, kept away from that damage, and :func:`verify` it.

    ``jobs``: with ``full``, the chunks are checked by that many worker processes (default:
    one per CPU, see :func:`workers.default_jobs`), and the walk of the environments is
    shared among as many; 1, or a caller running other threads, does all in this
    process."""
    path = Path(path)
    if not (path / "data.mdb").exists():
        raise StoreFormatError(f"no nbdsink store at {path}")
    jobs = workers.default_jobs() if jobs is None else jobs
    with contextlib.ExitStack() as stack:
        pool = None
        if jobs > 1 and workers.can_fork():
            # Before anything here opens the store with LMDB: the workers are forked.
            pool = stack.enter_context(CheckPool(path, full, jobs))
        found = structure.check_store(path, pool=pool.pool if pool else None)
        unrecorded = None
        try:
            found = structure.save(path, found)
        except OSError as exc:  # a read-only copy, say: the report still says everything
            unrecorded = f"the structural findings could not be recorded for servers: {exc}"
        try:
            store = stack.enter_context(Store(path))
        except StoreError as exc:  # unreadable, or damaged where opening must read
            report = VerifyReport(full=full, structure=found)
            report.problems.append(str(exc))
            _structural(None, found, report, {})
            return report
        report = verify(store, volume, version, full, progress, walk=found,
                        pool=pool if full else None, pool_walk=None if unrecorded is None
                        else found)
    if unrecorded is not None:
        report.problems.append(unrecorded)
    elif volume is None and version is None:
        # Every map entry was cross-checked: this is the record of disagreeing ones (a
        # server keeps reads of those blocks away, as from a damaged page).
        structure.save(path, structure.StructureReport(
            checked=found.checked, parts=("records",),
            findings=[structure.EnvFinding(structure.RECORDS, "data.mdb", None, None,
                                           damage=report.records)] if report.records else []))
    return report


def quarantine(store: Store, walk: structure.StructureReport) -> int:
    """Act on a segment's structural damage found by ``walk`` (the server does this when a
    check found some): mark the chunks whose lookups could reach it damaged (reads give
    EIO without looking; the same content written again replaces them: healing), and seal
    a damaged segment that was taking new chunks. Needs a writable main environment.
    Returns how many chunks were marked."""
    suspects: dict[bytes, str] = {}
    for env in walk.damaged:
        if env.segment is None:
            continue
        whole = bool(env.problems) or any(d.db == MAIN_DB for d in env.damage)
        for d in [None] if whole else [d for d in env.damage
                                       if d.db in ("chunks", "tails") and not d.header_only]:
            _segment_suspects(store, env.segment, d, suspects)
        _seal_if_active(store, env.segment)
    return sum(store.mark_damaged(d) for d in suspects)


def _seal_if_active(store: Store, sid: int) -> None:
    """A damaged segment takes no more chunks (LMDB would write through its damaged pages)."""
    with store.segments.write_lock, store.segments.compaction_lock:
        store._seal(sid)


def pinner(store: Store) -> structure.Pinner:
    """Pins snapshots through the store's own environments (for walks in its process)."""
    @contextlib.contextmanager
    def pin(sid: int | None) -> Iterator[int | None]:
        if sid is None:
            with store.env.begin() as txn:
                yield int(txn.id())
            return
        seg = store.segments.acquire(sid)
        try:
            with seg.env.begin() as txn:
                yield int(txn.id())
        finally:
            store.segments.release(seg)
    return pin


def verify(store: Store, volume: str | None = None, version: int | None = None,
           full: bool = False, progress: Progress | None = None,
           walk: structure.StructureReport | None = None,
           pool: CheckPool | None = None,
           pool_walk: structure.StructureReport | None = None) -> VerifyReport:
    """Check the store (or one volume, or one version's chunks); see the module docstring.

    ``walk``: the walk of LMDB's pages done before the store was opened
    (:func:`verify_store`). Its damage is kept away from (what it makes unreadable is
    reported, and is not looked up), so nothing here reads a damaged page. ``pool``:
    worker processes that check the chunks, keeping away from the damage recorded in the
    store, or from ``pool_walk``'s when given (see :meth:`CheckPool.check`)."""
    started = time.monotonic()
    report = VerifyReport(full=full, structure=walk, workers=pool.jobs if pool else 0)
    suspects: dict[bytes, str] = {}
    if walk is not None:
        store.reload_damage(walk)
        _structural(store, walk, report, suspects)
    try:
        volumes = [store.volume(volume)] if volume else store.volumes()
    except UnknownVolume:
        if walk is None or walk.clean:
            raise  # a name the store does not have, not damage: the user's error
        report.problems.append(f"volume {volume!r} not found (the store is damaged)")
        volumes = []
    except StoreError as exc:
        report.problems.append(f"volumes: {exc}")
        volumes = []
    report.volumes = len(volumes)
    wanted: set[bytes] | None = None
    # The whole store: every indexed chunk is listed, so the digests the maps use are
    # compared with that listing instead of each looked up. It is listed first, so that
    # worker processes check chunks while the maps are cross-checked here.
    whole = volume is None
    checks: _ChunkChecks | StoreError | None = None
    if whole:
        checks = _start_chunks(store, None, full, pool, pool_walk)
    for v in volumes:
        try:
            if version is None:
                report.versions += len(store.versions(v))
            else:
                store.version(v, version)
                report.versions += 1
        except StoreError as exc:
            report.problems.append(f"volume {v.name}: {exc}")
        try:
            digests = store.read(functools.partial(_map_digests, store, volume=v,
                                                   version=version, report=report,
                                                   suspects=suspects, look_up=not whole))
        except StoreError as exc:
            report.problems.append(f"volume {v.name}: map not fully read: {exc}")
            digests = set()
        wanted = digests if wanted is None else wanted | digests
    used = wanted or set()
    counted = None
    if whole:
        wanted = None  # the whole store: every indexed chunk
        if not _main_damaged(walk):
            counted = _count_refs(store)  # while the workers, if any, check chunks
    listed: set[bytes] = set()
    if checks is None:
        checks = _start_chunks(store, wanted, full, pool, pool_walk)
    try:
        if isinstance(checks, StoreError):
            raise checks
        _finish_chunks(checks, full, report, suspects, progress, listed)
    except StoreError as exc:
        report.problems.append(f"chunk index not fully read: {exc}")
    if whole:
        # Looked up one by one: an entry the listing skipped (behind known damage) is told
        # apart from one that is missing.
        with contextlib.suppress(StoreError):
            store.read(lambda r: _missing(store, r, used - listed, suspects, recount=True))
        _check_refs(store, report, walk, counted)
    for digest, problem in suspects.items():
        # Quarantined, so reads give EIO without looking (a store whose main environment
        # is damaged is read-only: those chunks' lookups are refused by the guard instead).
        with contextlib.suppress(StoreError):
            store.mark_damaged(digest)
        report.damaged.append(Damage(digest.hex(), problem))
    if report.damaged:
        try:
            _who_uses(store, report)
        except StoreError as exc:
            report.problems.append(f"users of the damaged chunks not all found: {exc}")
    report.seconds = time.monotonic() - started
    return report


_MEANING = {
    "map": "which chunk each block of each version holds",
    "versions": "the records of committed versions",
    "volumes": "the records of volumes",
    "index": "where each chunk is, and its checksum",
    "changes": "which blocks each version changed (pruning)",
    "refs": "chunk reference counts (garbage collection)",
    "garbage": "unreferenced chunks (garbage collection)",
    "seg_chunks": "which chunks each segment holds (compaction)",
    "segments": "segment states (compaction)",
    "pins": "pinned versions", "pending": "the pending version's counters",
    "pruning": "prunes in progress", "meta": "the store's header and counters",
    "holes": "punched-out space of segments",
    "chunks": "chunk data", "tails": "the last bytes of split chunks",
    "chunk_tails": "the last bytes of format-2 chunks",
}
"""What each database holds: the report says what its damage puts in doubt."""


def _structural(store: Store | None, found: structure.StructureReport, report: VerifyReport,
                suspects: dict[bytes, str]) -> None:
    """Report each structurally damaged environment, and what it makes unreadable: volumes'
    blocks and versions for the main environment's map and versions, chunks (quarantined,
    with their users, like any damaged chunk) for a segment or the index."""
    names = {}
    if store is not None:
        with contextlib.suppress(StoreError):
            names = {v.id: v for v in store.volumes()}
    if store is not None:
        _zeroed_suspects(store, found, suspects)
    for env in found.damaged:
        entry: dict[str, Any] = {"environment": env.name, "file": env.file,
                                 "problems": env.lines(), "unreadable": []}
        report.structural.append(entry)
        if env.segment is not None and store is not None:
            with contextlib.suppress(StoreError):  # a read-only store: the guard serves
                _seal_if_active(store, env.segment)
        if env.problems or any(d.db == MAIN_DB for d in env.damage):
            entry["unreadable"].append(
                "everything in it" if env.segment is None else
                f"every chunk of segment {env.segment}")
            if env.segment is not None and store is not None:
                _segment_suspects(store, env.segment, None, suspects)
            continue
        for d in env.damage:
            if env.segment is not None:
                if store is not None and d.db in ("chunks", "tails") and not d.header_only:
                    _segment_suspects(store, env.segment, d, suspects)
                continue
            what = _MEANING.get(d.db, "")
            if d.db == "map":
                entry["unreadable"].extend(_map_span(d, names))
            elif d.db in ("versions", "pins", "pruning"):
                entry["unreadable"].extend(_version_span(d, names))
            elif d.db == "index":
                entry["unreadable"].append(f"chunks {_span(d)} (their index entries)")
                if store is not None:
                    _index_suspects(store, d, suspects)
            elif d.db != "(free pages)":
                entry["unreadable"].append(f"database {d.db} ({what}), keys {_span(d)}")
        if env.segment is None:
            entry["unreadable"].append("no writes: the store is read-only until restored")


def _zeroed_suspects(store: Store, found: structure.StructureReport,
                     suspects: dict[bytes, str]) -> None:
    """A chunk whose pages in a segment read as zeros is a hole punched after it died,
    unless the index still points there: then its data are lost if they fail their
    checksum (only the page header may be zeros: reads are right, and nothing frees the
    pages of a chunk that is not damaged)."""
    for env in found.findings:
        if env.segment is None or not env.zeroed:
            continue

        def live(r: Reading, sid: int = env.segment, zeroed: list[bytes] = env.zeroed
                 ) -> list[bytes]:
            out = []
            for digest in zeroed:
                with contextlib.suppress(StoreDamaged):
                    loc = store.locate(r, digest)
                    if loc is None or loc.segment != sid:
                        continue
                    try:
                        store.read_chunk(r, digest)
                    except StoreError:
                        out.append(digest)
            return out
        for digest in store.read(live):
            suspects.setdefault(digest, f"its pages in segment {env.segment} read as zeros "
                                "(a hole where live data should be)")


def _span(d: PageDamage) -> str:
    lo, hi = d.guard_low, d.guard_high
    return f"{lo.hex() if lo else '(first)'}..{hi.hex() if hi else '(last)'}"


def _map_span(d: PageDamage, names: dict[int, VolumeInfo]) -> list[str]:
    """The blocks (of which volumes) whose lookups reach the damaged map page."""
    lo = keys.unpack_map_key(d.guard_low) if d.guard_low and len(d.guard_low) == 20 else None
    hi = keys.unpack_map_key(d.guard_high) if d.guard_high and len(d.guard_high) == 20 else None
    out = []
    for vid, vol in sorted(names.items()):
        if (lo and vid < lo[0]) or (hi and vid > hi[0]):
            continue
        first = lo[1] if lo and vid == lo[0] else 0
        last = hi[1] if hi and vid == hi[0] else vol.blocks - 1
        if hi and vid == hi[0] and hi[2] == (1 << 64) - 1:
            last -= 1  # the guard ends where block hi[1] begins
        out.append(f"volume {vol.name}: blocks {first}..{last} (offsets {first * vol.block_size}"
                   f"..{(last + 1) * vol.block_size - 1}), any version")
    return out or [f"map keys {_span(d)}"]


def _version_span(d: PageDamage, names: dict[int, VolumeInfo]) -> list[str]:
    def unpack(k: bytes | None) -> tuple[int, int] | None:
        return keys.unpack_version_key(k) if k and len(k) == 12 else None
    lo, hi = unpack(d.guard_low), unpack(d.guard_high)
    out = []
    for vid, vol in sorted(names.items()):
        if (lo and vid < lo[0]) or (hi and vid > hi[0]):
            continue
        first = lo[1] if lo and vid == lo[0] else 1
        last = f"{hi[1]}" if hi and vid == hi[0] else "(newest)"
        out.append(f"volume {vol.name}: {d.db} records of versions {first}..{last}")
    return out or [f"{d.db} keys {_span(d)}"]


def _segment_suspects(store: Store, sid: int, d: PageDamage | None,
                      suspects: dict[bytes, str]) -> None:
    """The chunks of segment ``sid`` whose lookups could reach damage ``d`` (None: all)."""
    prefix = struct.pack(">I", sid)
    why = (f"segment {sid} is structurally damaged" if d is None else
           f"a page of segment {sid} its lookup reaches is damaged ({d.db}: {d.problem})")

    def scan(r: Reading) -> list[bytes]:
        cur = r.txn.cursor(db=store._seg_chunks)
        out = []
        if cur.set_range(prefix):
            for k in cur.iternext(keys=True, values=False):
                k = bytes(k)
                if k[:4] != prefix:
                    break
                if d is None or d.guards(k[4:]):
                    out.append(k[4:])
        return out
    try:
        for digest in store.read(scan):
            suspects.setdefault(digest, why)
    except StoreError:
        pass  # seg_chunks itself is damaged: the structural report says so


def _index_suspects(store: Store, d: PageDamage, suspects: dict[bytes, str]) -> None:
    """The chunks the map uses whose index entries lie behind damage ``d``."""
    def scan(r: Reading) -> set[bytes]:
        return {bytes(v) for _, v in _scan(r.txn, store._map)
                if len(v) == 32 and d.guards(bytes(v))}
    with contextlib.suppress(StoreError):
        for digest in store.read(scan):
            suspects.setdefault(digest, f"its index entry is on a damaged page ({d.problem})")


def _map_digests(store: Store, r: Reading, *, volume: VolumeInfo, version: int | None,
                 report: VerifyReport, suspects: dict[bytes, str],
                 look_up: bool = True) -> set[bytes]:
    """Digests the volume's map uses (of one version, or all); with ``look_up``, entries
    without a chunk (else the caller finds them: :func:`_missing`)."""
    out: set[bytes] = set()
    if version is not None:
        block = 0
        while block < volume.blocks:
            n = min(65536, volume.blocks - block)
            try:
                out.update(d for d in store.block_digests(r, volume, version, block, n) if d)
            except StoreDamaged:
                # Block by block, leaving out those whose lookup reaches known damage
                # (the structural report names them).
                for b in range(block, block + n):
                    with contextlib.suppress(StoreDamaged):
                        out.update(d for d in store.block_digests(r, volume, version, b, 1)
                                   if d)
            block += n
        report.map_entries += len(out)
    else:
        _cross_check(store, r, volume, report, out)
    if look_up:
        _missing(store, r, out, suspects)
    return out


def _missing(store: Store, r: Reading, digests: Iterable[bytes],
             suspects: dict[bytes, str], recount: bool = False) -> None:
    """Of ``digests`` (used by map entries), those the index does not have.

    ``recount``: ``digests`` were taken from an older snapshot than ``r``, and a server may
    have pruned their last users and swept them since: only those the map of ``r`` still uses
    are missing (one more walk of the map, only when some digest is not indexed)."""
    absent: dict[bytes, str] = {}
    for d in digests:
        try:
            if store.locate(r, d) is None:
                absent[d] = "missing: a version uses it but the store has no such chunk"
        except StoreDamaged as exc:
            absent[d] = f"its index entry cannot be read: {exc}"
    if recount and absent:
        still = _map_uses(store, r.txn, set(absent))
        absent = {d: problem for d, problem in absent.items() if d in still}
    for d, problem in absent.items():
        suspects.setdefault(d, problem)


def _cross_check(store: Store, r: Reading, volume: VolumeInfo, report: VerifyReport,
                 digests: set[bytes]) -> None:
    """Every map entry of ``volume`` has its change record and every change record its map
    entry (both are written and deleted in the same transactions). The walk of the map
    also counts its entries and adds the digests they use to ``digests``.

    A damaged map page whose keys still sort in order passes the structural walk, but a
    key that changed (a bit of its block or version number) moves an entry to another
    block or version: reads would serve another block's bytes, or an older version's,
    and every check of the data would pass. Its change record, written with the original
    key, no longer matches: each block on either side of a mismatch is reported."""
    vid = volume.id
    prefix = keys.volume_id_key(vid)
    bad: dict[int, str] = {}

    # One cursor per database: consecutive lookups mostly land on the leaf page of the one
    # before, where LMDB looks first (measured: an eighth less time than lookups from the
    # root).
    map_entries, change_records = r.txn.cursor(db=store._map), r.txn.cursor(db=store._changes)

    def has(key: bytes, cursor: Any) -> bool:
        try:
            return bool(cursor.set_key(key))
        except StoreDamaged:
            return True  # behind known damage: the structural report covers it

    for k, v in _scan(r.txn, store._map, prefix):
        if k[:4] != prefix:
            break
        report.map_entries += 1
        if len(v):
            digests.add(bytes(v))
        if len(k) != keys.MAP_KEY_SIZE:
            continue
        _, block, version = keys.unpack_map_key(k)
        if not has(keys.change_key(vid, version, block), change_records):
            bad.setdefault(block, f"a map entry of version {version} has no change record")
    for k, _ in _scan(r.txn, store._changes, prefix):
        if k[:4] != prefix:
            break
        if len(k) != keys.MAP_KEY_SIZE:
            continue
        _, version, block = keys.unpack_change_key(k)
        if not has(keys.map_key(vid, block, version), map_entries):
            bad.setdefault(block, f"version {version} changed it, but its map entry is gone")
    for block, problem in sorted(bad.items()):
        low = keys.map_key(vid, block, (1 << 64) - 1)  # the block's first key, any version
        high = keys.map_key(vid, block + 1, (1 << 64) - 1)
        report.records.append(PageDamage("map", None, f"volume {volume.name}, block {block}: "
                                         f"{problem} (a damaged page)", low, high,
                                         guard_low=low, guard_high=high))


def _main_damaged(walk: structure.StructureReport | None) -> bool:
    """Whether the walk found the main environment damaged (then the store is read-only and
    its reference counts are not checked)."""
    return walk is not None and any(f.segment is None for f in walk.damaged)


def _count_refs(store: Store) -> dict[bytes, tuple[int, int]] | StoreError:
    """The chunks whose reference count is not the number of map entries that use them,
    as (count, uses) (both 0: unused and not marked as garbage); the error if they could
    not all be read."""
    def disagreeing(r: Reading) -> dict[bytes, tuple[int, int]]:
        uses = _map_uses(store, r.txn)
        wrong: dict[bytes, tuple[int, int]] = {}
        # A chunk nothing uses is garbage (collected after a grace period); one that is not
        # would keep its space for ever.
        for digest, _ in _scan(r.txn, store._index):
            if (digest not in uses and r.txn.get(digest, db=store._refs) is None
                    and r.txn.get(digest, db=store._garbage) is None):
                wrong[digest] = (0, 0)
        for digest, raw in _scan(r.txn, store._refs):
            counted = _REF.unpack(raw)[0] if len(raw) == _REF.size else -1
            used = uses.pop(digest, 0)
            if counted != used:
                wrong[digest] = (counted, used)
        wrong.update((digest, (0, used)) for digest, used in uses.items())
        return wrong

    try:
        return store.read(disagreeing)
    except StoreError as exc:
        return exc


def _check_refs(store: Store, report: VerifyReport, walk: structure.StructureReport | None,
                counted: dict[bytes, tuple[int, int]] | StoreError | None = None) -> None:
    """Every chunk's reference count equals the number of map entries that use it, and
    every chunk nothing uses is garbage.

    Garbage collection deletes a chunk once its count reaches zero: a count too low (a
    damaged page, a bit flipped) would let it delete a chunk that versions still use, and a
    count too high keeps its space for ever. The counts are derived data, so a wrong one is
    set back to the map's, in one write transaction that counts again (a server may have
    written meanwhile). Not when the map itself is in doubt (damaged pages, or entries and
    change records that disagree): counting a damaged map could lower a count that is right.
    ``counted``: what :func:`_count_refs` found earlier (else it is called now).
    """
    if _main_damaged(walk):
        report.problems.append("reference counts not checked: the main environment is "
                               "damaged (garbage collection stops while the store is "
                               "read-only)")
        return
    wrong = _count_refs(store) if counted is None else counted
    if isinstance(wrong, StoreError):
        report.problems.append(f"reference counts not fully read: {wrong}")
        return
    for digest, (count, used) in sorted(wrong.items()):
        if count == used:  # both 0
            report.refs.append(f"chunk {digest.hex()}: unused, but not marked as garbage: "
                               "its space would never be reclaimed")
            continue
        danger = ("garbage collection could delete it while versions use it" if count < used
                  else "its space would never be reclaimed")
        report.refs.append(f"chunk {digest.hex()}: reference count {count}, used by {used} "
                           f"map entries: {danger}")
    if not wrong or report.records:
        return

    def repair(txn: Any) -> int:
        uses = _map_uses(store, txn, set(wrong))
        for digest in wrong:
            store.set_refs(txn, digest, uses.get(digest, 0))
        return len(wrong)
    try:
        report.refs_repaired = store.write(repair)
    except StoreError as exc:
        report.problems.append(f"reference counts not repaired: {exc}")


def _map_uses(store: Store, txn: Any, only: set[bytes] | None = None) -> dict[bytes, int]:
    """How many map entries (every volume, every version) use each chunk (of ``only``)."""
    uses: dict[bytes, int] = {}
    for _, value in _scan(txn, store._map):
        if len(value):
            digest = bytes(value)
            if only is None or digest in only:
                uses[digest] = uses.get(digest, 0) + 1
    return uses


def _scan(txn: Any, db: Any, start: bytes | None = None) -> Iterator[tuple[bytes, Any]]:
    """Every record of ``db`` (from ``start`` on), leaving out the keys whose lookups could
    reach known structural damage: the scan resumes past each one's guarded range."""
    cur = txn.cursor(db=db)
    if isinstance(cur, lmdb.Cursor):
        # No damage is known in this database (the cursor is LMDB's own, unguarded): one C
        # loop (a profile of verify --full: the scans took half as long as stepped one by one).
        if cur.set_range(start) if start is not None else cur.first():
            for key, value in cur.iternext():
                yield bytes(key), value
        return
    at = start
    while True:
        try:
            found = cur.set_range(at) if at is not None else cur.first()
            while found:
                yield bytes(cur.key()), cur.value()
                found = cur.next()
            return
        except StoreDamaged as exc:
            if exc.damage is None or exc.damage.guard_high is None:
                return
            at = exc.damage.guard_high


@dataclass
class _ChunkChecks:
    """Chunk checks under way: the batches, and what each found (in their order)."""

    batches: list[list[Indexed]]
    found: Iterator[BatchFound]
    total: int


def _start_chunks(store: Store, wanted: set[bytes] | None, full: bool, pool: CheckPool | None,
                  pool_walk: structure.StructureReport | None) -> _ChunkChecks | StoreError:
    """List every chunk of ``wanted`` (None: every indexed chunk) and start checking them:
    in ``pool``'s workers from now on if given, else here as the results are taken. The
    error, if the index could not be listed."""
    def listing(r: Reading) -> list[Indexed]:
        if wanted is not None:
            found = [(d, loc) for d in sorted(wanted) if (loc := store.locate(r, d)) is not None]
            return [(d, loc.segment, loc.length, loc.check, loc.flags) for d, loc in found]
        return [indexed(d, raw) for d, raw in _scan(r.txn, store._index)]
    try:
        chunks = store.read(listing)
    except StoreError as exc:
        return exc
    batch = 256
    # Segment by segment: a batch reads one segment's pages instead of every segment's.
    by_segment = sorted(chunks, key=operator.itemgetter(1))
    batches = [by_segment[i : i + batch] for i in range(0, len(by_segment), batch)]
    found = (pool.check(batches, pool_walk) if pool is not None
             else (check_batch(store, part, full) for part in batches))
    return _ChunkChecks(batches, found, sum(c[2] for c in chunks) if full else len(chunks))


def _finish_chunks(checks: _ChunkChecks, full: bool, report: VerifyReport,
                   suspects: dict[bytes, str], progress: Progress | None,
                   listed: set[bytes]) -> None:
    """Take what the chunk checks found into the report; adds the digests listed to
    ``listed``."""
    for part in checks.batches:
        listed.update(c[0] for c in part)
    done = 0
    for part, found in zip(checks.batches, checks.found, strict=True):
        done += found.checked
        report.records.extend(found.records)
        for digest, problem in found.problems:
            suspects.setdefault(digest, problem)
        report.chunks += len(part)
        if progress is not None:
            progress(done, checks.total)
    if full:
        report.bytes_checked = done


def _who_uses(store: Store, report: VerifyReport) -> None:
    """Fill each damage with the (volume, first version, block) entries that use it."""
    damaged = {bytes.fromhex(d.digest): d for d in report.damaged}
    names = {v.id: v for v in store.volumes()}

    def scan(r: Reading) -> None:
        for k, v in _scan(r.txn, store._map):
            d = damaged.get(bytes(v)) if len(v) else None
            if d is None:
                continue
            vid, block, version = keys.unpack_map_key(bytes(k))
            vol = names.get(vid)
            if vol is None:
                continue
            d.uses.append({"volume": vol.name, "block": block,
                           "offset": block * vol.block_size, "from_version": version})
    store.read(scan)
    latest = {v.name: store.latest_version(v) for v in names.values()}
    existing = {v.name: [i.version for i in store.versions(v)] for v in names.values()}
    by_name = {v.name: v for v in names.values()}
    for d in report.damaged:
        uses = []
        for use in d.uses:
            vol = by_name[use["volume"]]
            # The entry is what every version from its own up to the block's next entry
            # shows: does the newest version show it?
            try:
                nxt = store.read(functools.partial(_next_entry, store, vol=vol, use=use))
            except StoreDamaged:
                uses.append(use)
                continue  # the block's other entries lie behind known damage
            use["to_version"] = (nxt - 1) if nxt is not None else latest[vol.name]
            # Entries stay under the numbers of the pruned versions they were written in
            # (see reclaim._merge_step): name the versions that exist.
            numbers = existing[vol.name]
            first = bisect.bisect_left(numbers, use["from_version"])
            if first == len(numbers) or numbers[first] > use["to_version"]:
                continue  # shown by no version that is left
            use["from_version"] = numbers[first]
            if nxt is None or nxt > latest[vol.name]:
                d.heal_from_source = True
            uses.append(use)
        d.uses = uses


def _next_entry(store: Store, r: Reading, *, vol: VolumeInfo, use: dict[str, Any]) -> int | None:
    """The version of the next newer map entry of the block (None: none)."""
    block, version = use["block"], use["from_version"]
    cur = r.txn.cursor(db=store._map)
    # Entries of a block sort newest first: the one just before ours is the next newer.
    if not cur.set_key(keys.map_key(vol.id, block, version)) or not cur.prev():
        return None
    vid, b, v = keys.unpack_map_key(bytes(cur.key()))
    return v if (vid, b) == (vol.id, block) else None


def report_text(report: VerifyReport) -> str:
    lines = [f"{'clean' if report.clean else 'DAMAGE FOUND'}: {report.volumes} volume(s), "
             f"{report.versions} version(s), {report.map_entries} map entries, "
             f"{report.chunks} chunks{' re-hashed' if report.full else ''} in "
             f"{report.seconds:.1f}s"
             + (f" by {report.workers} worker processes" if report.workers else "")]
    for d in report.damaged:
        lines.append(f"damaged chunk {d.digest}: {d.problem}")
        for u in d.uses:
            lines.append(f"  used by {u['volume']} versions {u['from_version']}.."
                         f"{u.get('to_version', '?')} at block {u['block']} (offset {u['offset']})")
        lines.append("  heals when the source sends it again (replicate --once --verify)"
                     if d.heal_from_source else
                     "  not in any volume's newest version: heals only if that content is "
                     "written again")
    lines.extend(f"problem: {p}" for p in report.problems)
    lines.extend(f"damaged reference count: {p}" for p in report.refs)
    if report.refs_repaired:
        lines.append(f"repaired {report.refs_repaired} reference count(s) from the map")
    lines.extend(f"damaged record: {d.problem}; "
                 + ("reads of the block are refused" if d.db == "map" else "the store is "
                    "read-only") + " until it is restored" for d in report.records)
    for env in report.structural:
        lines.append(f"structural damage in the {env['environment']} environment "
                     f"({env['file']}):")
        lines.extend(f"  {p}" for p in env["problems"])
        lines.extend(f"  unreadable: {u}" for u in env["unreadable"])
    if report.structure is not None:
        lines.append(f"LMDB pages: {report.structure.pages} walked in "
                     f"{report.structure.environments} environment(s)")
        # LMDB accounts for every page (measured, kill -9 included): a page neither in use
        # nor free is lost space, a sign that a pointer to it was damaged.
        lines.extend(f"note: {f.leaked_pages} page(s) of {f.name} are neither in use nor "
                     "free (space lost)" for f in report.structure.findings if f.leaked_pages)
    return "\n".join(lines)

