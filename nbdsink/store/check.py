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

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import blake3

from nbdsink.store import keys
from nbdsink.store.chunks import HEADER_SIZE
from nbdsink.store.errors import StoreError
from nbdsink.store.store import (
    FLAG_DAMAGED,
    FLAG_NO_CHECKSUM,
    Location,
    Reading,
    Store,
    VolumeInfo,
    _data_check,
)

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

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": self.clean, "full": self.full, "volumes": self.volumes,
            "versions": self.versions, "map_entries": self.map_entries, "chunks": self.chunks,
            "bytes_checked": self.bytes_checked, "seconds": round(self.seconds, 3),
            "damaged_chunks": [d.to_json() for d in self.damaged],
            "problems": self.problems,
        }


def verify(store: Store, volume: str | None = None, version: int | None = None,
           full: bool = False, progress: Progress | None = None) -> VerifyReport:
    """Check the store (or one volume, or one version's chunks); see the module docstring."""
    started = time.monotonic()
    report = VerifyReport(full=full)
    volumes = [store.volume(volume)] if volume else store.volumes()
    report.volumes = len(volumes)
    suspects: dict[bytes, str] = {}
    wanted: set[bytes] | None = None
    for v in volumes:
        try:
            if version is None:
                report.versions += len(store.versions(v))
            else:
                store.version(v, version)
                report.versions += 1
        except StoreError as exc:
            report.problems.append(f"volume {v.name}: {exc}")
        digests = store.read(functools.partial(_map_digests, store, volume=v, version=version,
                                               report=report, suspects=suspects))
        wanted = digests if wanted is None else wanted | digests
    if volume is None:
        wanted = None  # the whole store: every indexed chunk
    _check_chunks(store, wanted, full, report, suspects, progress)
    for digest, problem in suspects.items():
        store.mark_damaged(digest)
        report.damaged.append(Damage(digest.hex(), problem))
    if report.damaged:
        _who_uses(store, report)
    report.seconds = time.monotonic() - started
    return report


def _map_digests(store: Store, r: Reading, *, volume: VolumeInfo, version: int | None,
                 report: VerifyReport, suspects: dict[bytes, str]) -> set[bytes]:
    """Digests the volume's map uses (of one version, or all); entries without a chunk."""
    out: set[bytes] = set()
    if version is not None:
        block = 0
        while block < volume.blocks:
            n = min(65536, volume.blocks - block)
            out.update(d for d in store.block_digests(r, volume, version, block, n) if d)
            block += n
        report.map_entries += len(out)
    else:
        cur = r.txn.cursor(db=store._map)
        prefix = keys.volume_id_key(volume.id)
        if cur.set_range(prefix):
            for k, v in cur:
                if bytes(k)[:4] != prefix:
                    break
                report.map_entries += 1
                if len(v):
                    out.add(bytes(v))
    for d in out:
        if store.locate(r, d) is None:
            suspects[d] = "missing: a version uses it but the store has no such chunk"
    return out


def _check_chunks(store: Store, wanted: set[bytes] | None, full: bool, report: VerifyReport,
                  suspects: dict[bytes, str], progress: Progress | None) -> None:
    def listing(r: Reading) -> list[tuple[bytes, Location]]:
        if wanted is not None:
            return [(d, loc) for d in sorted(wanted) if (loc := store.locate(r, d)) is not None]
        return [(bytes(d), Location.decode(raw)) for d, raw in r.txn.cursor(db=store._index)]
    chunks = store.read(listing)
    total = sum(loc.length for _, loc in chunks) if full else len(chunks)
    done = 0
    batch = 256
    for i in range(0, len(chunks), batch):
        part = chunks[i : i + batch]

        def check(r: Reading, part: list[tuple[bytes, Location]] = part) -> int:
            n = 0
            for digest, loc in part:
                if loc.flags & FLAG_DAMAGED:
                    suspects.setdefault(digest, "damaged (found earlier), not yet healed")
                    continue
                problem = _check_one(store, r, digest, loc, full)
                if problem:
                    suspects.setdefault(digest, problem)
                n += loc.length if full else 1
            return n
        done += store.read(check)
        report.chunks += len(part)
        if progress is not None:
            progress(done, total)
    if full:
        report.bytes_checked = done


def _check_one(store: Store, r: Reading, digest: bytes, loc: Location, full: bool) -> str | None:
    if loc.segment == 0:
        stored, tail = r.txn.get(digest, db=store._chunks), r.txn.get(digest, db=store._tails)
    else:
        try:
            stored, tail = r.segments.get(loc.segment, digest)
        except StoreError as exc:
            return f"segment {loc.segment} unreadable: {exc}"
    if stored is None:
        return f"missing from segment {loc.segment}"
    held = len(stored) - HEADER_SIZE + (len(tail) if tail is not None else 0)
    if held != loc.length:
        return f"holds {held} bytes in segment {loc.segment}, the index says {loc.length}"
    if not full:
        return None
    if not loc.flags & FLAG_NO_CHECKSUM and _data_check(stored, tail) != loc.check:
        return f"fails its checksum in segment {loc.segment}: damaged on disk"
    h = blake3.blake3(memoryview(stored)[HEADER_SIZE:])
    if tail is not None:
        h.update(tail)
    if h.digest() != digest:
        return f"data in segment {loc.segment} do not hash to the chunk's digest"
    return None


def _who_uses(store: Store, report: VerifyReport) -> None:
    """Fill each damage with the (volume, first version, block) entries that use it."""
    damaged = {bytes.fromhex(d.digest): d for d in report.damaged}
    names = {v.id: v for v in store.volumes()}

    def scan(r: Reading) -> None:
        for k, v in r.txn.cursor(db=store._map):
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
    by_name = {v.name: v for v in names.values()}
    for d in report.damaged:
        for use in d.uses:
            vol = by_name[use["volume"]]
            # The entry is what every version from its own up to the block's next entry
            # shows: does the newest version show it?
            nxt = store.read(functools.partial(_next_entry, store, vol=vol, use=use))
            if nxt is None or nxt > latest[vol.name]:
                d.heal_from_source = True
            use["to_version"] = (nxt - 1) if nxt is not None else latest[vol.name]


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
             f"{report.seconds:.1f}s"]
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
    return "\n".join(lines)

