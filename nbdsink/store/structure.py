"""Damage to LMDB's own pages in a store: finding it, recording it, and keeping away from it.

LMDB has no page checksums, and a damaged B-tree page can make its C code abort (a failed
assertion on a page of the wrong kind), fault (SIGBUS: an offset or pointer leading past the
end of the file) or read the wrong record. Measured cases are in docs/store.md. What nbdsink
does about it:

- :func:`check_store` walks every page of the main environment and of every segment with
  :mod:`nbdsink.store.lmdb_pages` (``pread``, never LMDB, so it cannot crash), each on a
  snapshot pinned by a read transaction (a server may go on writing meanwhile), and
  :func:`save` records what it found in ``structure.json`` in the store directory.
  ``nbdsink verify`` does this first, and ``nbdsink serve`` does it when it starts.
- :class:`StoreDamage`, loaded from that record by the store, keeps every read away from the
  damaged pages: a lookup of a key whose search could reach one (the damaged page's range,
  widened by its neighbouring leaves, which LMDB steps into) fails with
  :class:`StoreDamaged` (EIO) before LMDB is called. Damage in the main environment also
  makes the store read-only (a write could spread it: a damaged free-page list hands out
  pages in use), and a damaged segment's chunks are quarantined.

What cannot be avoided: the first read that meets damage nobody has found yet may still
crash the process, and a page that is damaged but still looks valid (a pointer that leads to
another valid page of the same tree) can make a lookup find the wrong record. The walk finds
both; see docs/store.md.

Never call :func:`check_store` in a process that has the same store open: it opens the
environments itself, and LMDB's locks do not survive a second handle closing in one process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing.pool
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from nbdsink.store.errors import StoreError
from nbdsink.store.lmdb_pages import (
    FREE_DB,
    MAIN_DB,
    Damage,
    EnvCheck,
    SnapshotGone,
    check_env,
)

STRUCTURE_FILE = "structure.json"
"""The record of the last structural check, in the store directory."""
SEGMENT_DIR = "segments"
MAIN = "main"
"""The name of the main environment in findings."""
RECORDS = "records"
"""The name of the findings of ``nbdsink verify``'s cross-check of the map's records (in the
main environment: reads keep away from them like from its damaged pages)."""

DB_ATTRIBUTES = {
    "_meta": "meta", "_volumes": "volumes", "_versions": "versions", "_map": "map",
    "_chunks": "chunks", "_tails": "chunk_tails", "_pending": "pending", "_index": "index",
    "_seg_chunks": "seg_chunks", "_segments_db": "segments", "_refs": "refs",
    "_garbage": "garbage", "_pins": "pins", "_changes": "changes", "_pruning": "pruning",
    "_holes": "holes",
}
"""The store's attributes holding main-environment database handles, and the databases'
names (LMDB's handles do not say which database they are)."""


class StoreDamaged(StoreError):
    """A read would reach a damaged LMDB page, or a write would change a damaged environment:
    refused (EIO) rather than risk a crash or wrong bytes."""

    def __init__(self, message: str, damage: Damage | None = None) -> None:
        super().__init__(message)
        self.damage = damage
        """The damage a lookup was kept from (a scan may resume past its guard)."""


class StoreReadOnly(StoreDamaged):
    """A write to a store whose main environment is damaged."""

    errno = errno.EROFS


@dataclass
class EnvFinding:
    """One environment's structural findings."""

    name: str
    """"main" or "segment N"."""
    file: str
    """Relative to the store directory."""
    segment: int | None
    txnid: int | None
    """The snapshot walked (None: the newest, unpinned)."""
    problems: list[str] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    leaked_pages: int = 0
    zeroed: list[bytes] = field(default_factory=list)
    """Chunks whose pages in this segment read as zeros: punched out when they died, or
    damaged if the index still points here (``nbdsink verify`` checks; not recorded)."""

    @property
    def clean(self) -> bool:
        return not self.problems and not self.damage

    @property
    def part(self) -> str:
        """Which check makes this finding: "main", "segments" or "records"."""
        return RECORDS if self.name == RECORDS else "main" if self.segment is None else \
            "segments"

    def lines(self) -> list[str]:
        return [*self.problems, *(d.describe() for d in self.damage)]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.file, "segment": self.segment,
                "txnid": self.txnid, "problems": self.problems,
                "damage": [_damage_json(d) for d in self.damage],
                "leaked_pages": self.leaked_pages}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> EnvFinding:
        return cls(str(raw["name"]), str(raw["file"]), raw.get("segment"), raw.get("txnid"),
                   [str(p) for p in raw.get("problems", [])],
                   [_damage_from(d) for d in raw.get("damage", [])],
                   int(raw.get("leaked_pages", 0)))


@dataclass
class StructureReport:
    """What one structural check found: the environments with findings (clean ones are only
    counted)."""

    checked: float = 0.0
    environments: int = 0
    pages: int = 0
    seconds: float = 0.0
    findings: list[EnvFinding] = field(default_factory=list)
    parts: tuple[str, ...] = ("main", "segments")
    """What was checked: the main environment, the segments, or both."""

    @property
    def clean(self) -> bool:
        return all(f.clean for f in self.findings)

    @property
    def damaged(self) -> list[EnvFinding]:
        return [f for f in self.findings if not f.clean]

    def to_json(self) -> dict[str, Any]:
        return {"checked": self.checked, "environments": self.environments,
                "pages": self.pages, "seconds": round(self.seconds, 3),
                "parts": list(self.parts), "findings": [f.to_json() for f in self.findings]}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StructureReport:
        return cls(float(raw.get("checked", 0.0)), int(raw.get("environments", 0)),
                   int(raw.get("pages", 0)), float(raw.get("seconds", 0.0)),
                   [EnvFinding.from_json(f) for f in raw.get("findings", [])],
                   tuple(raw.get("parts", ("main", "segments"))))


def _hex(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _unhex(s: object) -> bytes | None:
    return None if s is None else bytes.fromhex(str(s))


def _damage_json(d: Damage) -> dict[str, Any]:
    out = asdict(d)
    for k in ("low", "high", "key", "guard_low", "guard_high"):
        out[k] = _hex(out[k])
    return out


def _damage_from(raw: dict[str, Any]) -> Damage:
    return Damage(str(raw["db"]), raw.get("pgno"), str(raw["problem"]), _unhex(raw.get("low")),
                  _unhex(raw.get("high")), _unhex(raw.get("key")),
                  bool(raw.get("header_only", False)), _unhex(raw.get("guard_low")),
                  _unhex(raw.get("guard_high")))


# -- checking -------------------------------------------------------------------------------


def environments(store_dir: Path) -> list[tuple[str, Path, int | None]]:
    """(name, data file, segment id) of every environment of the store."""
    out: list[tuple[str, Path, int | None]] = [(MAIN, store_dir / "data.mdb", None)]
    seg_dir = store_dir / SEGMENT_DIR
    if seg_dir.is_dir():
        for p in sorted(seg_dir.glob("*.mdb")):
            with contextlib.suppress(ValueError):
                out.append((f"segment {int(p.stem)}", p, int(p.stem)))
    return out


Pinner = Callable[[int | None], contextlib.AbstractContextManager[int | None]]
"""``pin(segment)`` (None: the main environment) holds a read transaction of that
environment open while its block runs and gives its id (None: cannot pin)."""


def check_store(store_dir: Path, *, main: bool = True, segments: bool = True,
                pin: Pinner | None = None,
                pool: multiprocessing.pool.Pool | None = None) -> StructureReport:
    """Walk every page of the main environment and/or of every segment (see the module
    docstring). ``pin``: how to hold a snapshot of an environment during its walk; by
    default the environment is opened here (never do that with the store open in this
    process: pass a pinner using the store's own environments). ``pool``: worker processes
    that walk the environments (see :mod:`nbdsink.store.workers`; not with ``pin``)."""
    started = time.monotonic()
    report = StructureReport(checked=time.time(),
                             parts=tuple(p for p, on in (("main", main), ("segments", segments))
                                         if on))
    wanted = [(Path(store_dir), name, path, sid)
              for name, path, sid in environments(Path(store_dir))
              if (main if sid is None else segments)]
    if pool is not None and pin is None:
        # The main environment comes first and is the largest: one worker walks it while
        # the others share the segments.
        walked = pool.map(_walk_environment, wanted, chunksize=1)
    else:
        walked = [_walk_environment(env, pin) for env in wanted]
    for one in walked:
        if one is not None:
            finding, pages = one
            report.environments += 1
            report.pages += pages
            if not finding.clean or finding.leaked_pages or finding.zeroed:
                report.findings.append(finding)
    report.seconds = time.monotonic() - started
    return report


def _walk_environment(env: tuple[Path, str, Path, int | None], pin: Pinner | None = None
                      ) -> tuple[EnvFinding, int] | None:
    """What the walk of one environment found, and how many pages it walked; None when
    there is nothing to walk (a segment compacted away, or empty)."""
    store_dir, name, path, sid = env
    if not path.exists():
        return None  # a segment compacted away meanwhile
    try:
        if sid is not None and path.stat().st_size == 0:
            return None  # created by a crash before its first commit: nothing in it
    except FileNotFoundError:
        return None  # compacted away (and deleted) since it was listed
    found = _check_pinned(path, sid, pin)
    if sid is not None and found.problems and not path.exists():
        return None  # compacted away (and deleted) between the two looks: not damage
    return EnvFinding(name, str(path.relative_to(store_dir)), sid,
                      found.meta.txnid if found.meta else None, list(found.problems),
                      list(found.damage), found.leaked_pages,
                      [key for db, key in found.zeroed if db == "chunks"]), found.pages_walked


def _check_pinned(data_file: Path, sid: int | None, pin: Pinner | None) -> EnvCheck:
    """:func:`check_env` on the snapshot of a read transaction held meanwhile, so that a
    writer reusing pages during the walk cannot look like damage."""
    for _ in range(10):
        try:
            with (pin or _open_and_pin(data_file))(sid) as txnid:
                return check_env(data_file, txnid=txnid, punched=sid is not None)
        except SnapshotGone:
            continue  # two commits between the transaction and the meta read
        except (lmdb.Error, StoreError, OSError):
            break  # nothing to pin (a damaged or truncated file, no lock file)
    return check_env(data_file, punched=sid is not None)  # the newest snapshot, unpinned


def _open_and_pin(data_file: Path) -> Pinner:
    """A pinner that opens the environment here, read-only. Opening an environment and
    starting a read transaction touch no tree page (LMDB reads the meta pages with
    ``pread``), so even a damaged one can be pinned."""
    @contextlib.contextmanager
    def pin(sid: int | None) -> Iterator[int | None]:
        subdir = sid is None
        try:
            env = lmdb.open(str(data_file.parent if subdir else data_file), subdir=subdir,
                            readonly=True, create=False, max_dbs=0, readahead=False)
        except lmdb.Error:
            if not subdir and not data_file.exists():
                # Compacted away since it was listed; LMDB made its lock file anew (it
                # opens that one with O_CREAT even read-only): do not leave it behind.
                with contextlib.suppress(FileNotFoundError):
                    data_file.with_name(data_file.name + "-lock").unlink()
            raise
        try:
            with env.begin() as txn:
                yield int(txn.id())
        finally:
            env.close()
    return pin


# -- the record ------------------------------------------------------------------------------


def save(store_dir: Path, report: StructureReport) -> StructureReport:
    """Record ``report`` as the store's structural state (atomically: a server reloads it)
    and return the record: for a part ``report`` did not check (the main environment, or
    the segments), the previous record's findings stay."""
    previous = load(store_dir)
    if previous is not None:
        kept = [f for f in previous.findings if f.part not in report.parts]
        report = StructureReport(report.checked, report.environments, report.pages,
                                 report.seconds, [*kept, *report.findings],
                                 tuple(sorted({*report.parts, *previous.parts})))
    path = Path(store_dir) / STRUCTURE_FILE
    tmp = path.with_name(f".{STRUCTURE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=1))
    os.replace(tmp, path)
    return report


def load(store_dir: Path) -> StructureReport | None:
    """The recorded structural state; None when there is none (or it cannot be read, which
    is reported by the next check)."""
    try:
        raw = json.loads((Path(store_dir) / STRUCTURE_FILE).read_text())
        return StructureReport.from_json(raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_mtime(store_dir: Path) -> float:
    try:
        return os.stat(Path(store_dir) / STRUCTURE_FILE).st_mtime
    except OSError:
        return 0.0


# -- keeping away from damage ----------------------------------------------------------------


class StoreDamage:
    """What the store must avoid, from a structural record with damage.

    ``unreadable``: the main environment as a whole cannot be trusted (its meta pages, the
    tree of database names, a truncated file): the store refuses to open. ``read_only``: the
    main environment has damage somewhere: writes are refused (a write could spread it).
    ``main``: per database, the damage whose guarded keys reads must not look up.
    ``segments``: per segment, the damage in its chunk data trees; None for a segment whose
    whole structure is in doubt.
    """

    def __init__(self, report: StructureReport) -> None:
        self.report = report
        self.unreadable: str | None = None
        self.read_only: str | None = None
        self.main: dict[str, list[Damage]] = {}
        self.segments: dict[int, list[Damage] | None] = {}
        for f in report.damaged:
            if f.segment is None:
                self._main(f)
            else:
                self._segment(f)

    def _main(self, f: EnvFinding) -> None:
        first = (f.problems or [d.describe() for d in f.damage])[0]
        self.read_only = (f"the store's main environment is damaged ({first}); writes are "
                          "refused until it is restored (see 'nbdsink verify')")
        if f.problems or any(d.db == MAIN_DB for d in f.damage):
            self.unreadable = first
        for d in f.damage:
            # Only writers read the free-page tree, and only deleting a value reads an
            # overflow page's header.
            if d.db != FREE_DB and not d.header_only:
                self.main.setdefault(d.db, []).append(d)

    def _segment(self, f: EnvFinding) -> None:
        assert f.segment is not None
        if f.problems or any(d.db == MAIN_DB for d in f.damage):
            self.segments[f.segment] = None
            return
        data = [d for d in f.damage if d.db != FREE_DB and not d.header_only]
        if data:
            self.segments[f.segment] = data

    def check_segment(self, sid: int, digest: bytes) -> None:
        """Raise :class:`StoreDamaged` if reading ``digest`` from segment ``sid`` could reach
        a damaged page."""
        if sid not in self.segments:
            return
        damage = self.segments[sid]
        if damage is None:
            raise StoreDamaged(f"segment {sid} is structurally damaged: chunk {digest.hex()} "
                               "is not read (see 'nbdsink verify')")
        for d in damage:
            if d.guards(digest):
                raise StoreDamaged(f"chunk {digest.hex()} is not read: a page of segment {sid}"
                                   f" that its lookup could reach is damaged ({d.problem})")


def db_names(store: object) -> dict[int, str]:
    """id(handle) -> database name, for the store's main-environment handles."""
    return {id(handle): name for attr, name in DB_ATTRIBUTES.items()
            if (handle := getattr(store, attr, None)) is not None}


class GuardedTxn:
    """A read transaction that refuses lookups which could reach damaged pages.

    Only used while the store has damage (otherwise reads get the plain transaction and pay
    nothing). Every lookup is checked before LMDB sees it: ``get`` and ``set_range`` by the
    key searched; a cursor step (``next``, ``prev``, iteration) by the key it steps from, since
    the step may cross into the neighbouring leaf; ``first``/``last`` by whether damage is
    unbounded on that side.
    """

    def __init__(self, txn: lmdb.Transaction, damage: dict[str, list[Damage]],
                 names: dict[int, str]) -> None:
        self._txn = txn
        self._damage = damage
        self._names = names

    def _guards(self, db: object) -> list[Damage]:
        return self._damage.get(self._names.get(id(db), ""), []) if db is not None else []

    def get(self, key: bytes, default: Any = None, db: Any = None) -> Any:
        _check(self._guards(db), key)
        return self._txn.get(key, default, db=db)

    def cursor(self, db: Any = None) -> Any:
        cur = self._txn.cursor(db=db)
        guards = self._guards(db)
        return GuardedCursor(cur, guards) if guards else cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


class GuardedCursor:
    """A cursor whose every move is checked (see :class:`GuardedTxn`)."""

    def __init__(self, cur: Any, guards: list[Damage]) -> None:
        self._cur = cur
        self._guards = guards

    def _from_here(self) -> None:
        key = bytes(self._cur.key())
        _check(self._guards, key if key else b"")

    def set_range(self, key: bytes) -> bool:
        _check(self._guards, key)
        return bool(self._cur.set_range(key))

    def set_key(self, key: bytes) -> bool:
        _check(self._guards, key)
        return bool(self._cur.set_key(key))

    def first(self) -> bool:
        _check(self._guards, b"")
        return bool(self._cur.first())

    def last(self) -> bool:
        for d in self._guards:
            if d.guard_high is None:
                raise StoreDamaged(_message(d), d)
        return bool(self._cur.last())

    def next(self) -> bool:
        self._from_here()
        return bool(self._cur.next())

    def prev(self) -> bool:
        self._from_here()
        return bool(self._cur.prev())

    def key(self) -> Any:
        return self._cur.key()

    def _value_here(self) -> None:
        # The cursor read the page it stands on already; only a value of its own (overflow
        # pages) may be damaged where the key is not.
        key = bytes(self._cur.key())
        for d in self._guards:
            if d.key is not None and d.key == key:
                raise StoreDamaged(_message(d), d)

    def value(self) -> Any:
        self._value_here()
        return self._cur.value()

    def item(self) -> Any:
        self._value_here()
        return self._cur.item()

    def delete(self) -> bool:
        return bool(self._cur.delete())

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        if not self._cur.key() and not self.first():
            return
        while True:
            if values:
                self._value_here()
            k = self._cur.key()
            yield (k, self._cur.value()) if keys and values else (k if keys else
                                                                   self._cur.value())
            if not self.next():
                return

    def __iter__(self) -> Iterator[Any]:
        return self.iternext()


def _check(guards: list[Damage], key: bytes) -> None:
    for d in guards:
        if d.guards(key):
            raise StoreDamaged(_message(d), d)


def _message(d: Damage) -> str:
    return (f"LMDB page {d.pgno} of database {d.db!r} is damaged ({d.problem}); lookups "
            "that could reach it are refused (see 'nbdsink verify')")
