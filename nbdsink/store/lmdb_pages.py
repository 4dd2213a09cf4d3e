"""LMDB's own pages, read from the file without LMDB: the structural check of an environment.

LMDB keeps no checksums of its pages. Its C code trusts what it finds in the map: a damaged
B-tree page can make it return an error, return a wrong record, or read outside the page
(outside the file: SIGBUS; outside the map: SIGSEGV), and the process dies for every client.
So the check of an environment's structure must not go through LMDB: this module reads the
data file with ``pread`` (a short file is an error, never a fault) and walks every tree as
LMDB would, checking what LMDB assumes:

- both meta pages parse; the file covers every page the committed meta says is in use;
- every page reachable from the roots (LMDB's main tree, the free-page tree, each named
  database) stores its own number, has exactly one kind (branch, leaf, overflow), sane
  bounds, nodes inside the page, keys in order and inside the range its parent gives it;
- every large value's overflow pages are in range and their header says how many they are
  (LMDB frees that many pages when the value is deleted: a wrong count would later hand
  pages still in use to a new value);
- each named database's counters (pages, entries, depth) match what the walk found;
- no page is reachable twice, and no page is both in use and listed free (the next write
  would overwrite it). Pages neither in use nor free are a leak (space only).

Every finding names the database and, as exactly as the tree allows, the range of keys it
puts in doubt: a leaf or branch page covers the keys between its parent's separators; an
overflow page holds the value of one key. The caller turns keys into volumes, versions,
blocks and chunks.

Scope: LMDB 0.9 files (16-byte page header, data version 1) written on a 64-bit
little-endian host, without duplicate-key databases: what py-lmdb writes for nbdsink.

A walk can be of one snapshot: :func:`check_env` with the ``txnid`` of a read transaction
held open meanwhile reads the tree of that transaction, whose pages LMDB does not reuse while
the reader lives, so a server may go on writing during the check.
"""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

PAGE_HEADER = 16
"""LMDB 0.9's page header: pgno u64, pad u16, flags u16, lower u16 and upper u16 (an
overflow page keeps its page count, u32, where lower and upper are)."""
NODE_HEADER = 8
"""A node: lo u16, hi u16, flags u16, key size u16 (a branch node's child page number is
lo | hi << 16 | flags << 32; a leaf node's data size is lo | hi << 16)."""
DB_RECORD = 48
"""An MDB_db: pad u32, flags u16, depth u16, branch, leaf and overflow pages, entries and
root page, u64 each."""
NUM_METAS = 2
MAGIC = 0xBEEFC0DE
DATA_VERSION = 1
P_INVALID = (1 << 64) - 1
"""The root of an empty tree."""
MAX_DEPTH = 32
"""LMDB's cursor stack: no tree is deeper."""

P_BRANCH = 0x01
P_LEAF = 0x02
P_OVERFLOW = 0x04
P_META = 0x08
P_DIRTY = 0x10
P_LEAF2 = 0x20
P_SUBP = 0x40
F_BIGDATA = 0x01
F_SUBDATA = 0x02
F_DUPDATA = 0x04
MDB_DUPSORT = 0x04
MDB_INTEGERKEY = 0x08

FREE_DB = "(free pages)"
"""The name findings in LMDB's free-page tree carry."""
MAIN_DB = "(main)"
"""The name findings in LMDB's main tree (the one holding the named databases) carry."""

_HEADER = struct.Struct("<QHHHH")
_OVERFLOW_HEADER = struct.Struct("<QHHI")
_NODE = struct.Struct("<HHHH")
_DB = struct.Struct("<IHHQQQQQ")
_META = struct.Struct("<IIQQ")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_META_DBS = PAGE_HEADER + _META.size
"""Where a meta page's free-tree and main-tree records start."""

_KINDS = {P_BRANCH: "branch", P_LEAF: "leaf", P_OVERFLOW: "overflow"}


class EnvUnreadable(Exception):
    """The file is no LMDB environment this module can check (no magic, an impossible page
    size, a meta page beyond the end): nothing in it can be trusted."""


class SnapshotGone(Exception):
    """Neither meta page holds the transaction asked for any more (a writer committed twice
    meanwhile): open a fresh read transaction and ask again."""


@dataclass(frozen=True)
class DbRecord:
    """A tree's record: in a meta page (free-page and main trees) or in a node of the main
    tree (a named database)."""

    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int

    @classmethod
    def unpack(cls, buf: bytes, offset: int) -> DbRecord:
        _, flags, depth, branch, leaf, overflow, entries, root = _DB.unpack_from(buf, offset)
        return cls(flags, depth, branch, leaf, overflow, entries, root)


@dataclass(frozen=True)
class Meta:
    """The committed state a meta page describes."""

    slot: int
    txnid: int
    last_pgno: int
    page_size: int
    map_size: int
    free: DbRecord
    main: DbRecord


@dataclass(frozen=True)
class Page:
    """A page found by the walk: which tree it belongs to and which keys it may hold."""

    pgno: int
    kind: str
    """"branch", "leaf" or "overflow"."""
    db: str
    """The named database (or :data:`MAIN_DB`, :data:`FREE_DB`)."""
    depth: int
    """1 for a root; an overflow page has its leaf's depth plus one."""
    low: bytes | None
    """The smallest key it may hold (None: no bound)."""
    high: bytes | None
    """Its keys are below this (None: no bound)."""
    key: bytes | None = None
    """An overflow page: the key whose value it holds."""
    pages: int = 1
    """An overflow page: the pages of the value (this one and those after it)."""


@dataclass(frozen=True)
class Damage:
    """A structural fault, and the keys of one database it puts in doubt."""

    db: str
    pgno: int | None
    """The damaged page (None: the database as a whole, e.g. its counters)."""
    problem: str
    low: bytes | None = None
    high: bytes | None = None
    key: bytes | None = None
    """Set when exactly one key's record is in doubt (its value's overflow pages)."""
    header_only: bool = False
    """An overflow page's header is wrong but the value's pointer and size are sound: reads
    get the right bytes (checked against the chunk's checksum anyway); only deleting the
    value would free the wrong pages."""
    guard_low: bytes | None = None
    guard_high: bytes | None = None
    """The keys whose lookups could reach the damaged page: its range, widened by the leaf
    just before and the leaf just after it. LMDB steps from a leaf to its neighbour when a
    search key lies past the leaf's last key (and a cursor does when it moves on), so a
    lookup in either neighbour may read the damaged page too. For one key's value, that key
    alone. None: no bound."""

    def guards(self, key: bytes) -> bool:
        """Could a lookup of ``key`` (or a cursor step from it) reach the damage?"""
        return ((self.guard_low is None or key >= self.guard_low)
                and (self.guard_high is None or key < self.guard_high))

    def describe(self) -> str:
        where = f"page {self.pgno}" if self.pgno is not None else "tree"
        if self.key is not None:
            span = f"key {self.key.hex()}"
        elif self.low is None and self.high is None:
            span = "all keys"
        else:
            span = (f"keys {self.low.hex() if self.low else '(start)'}"
                    f"..{self.high.hex() if self.high else '(end)'}")
        return f"{self.db}: {where}: {self.problem} ({span})"


@dataclass
class EnvCheck:
    """What :func:`check_env` found in one environment."""

    path: Path
    meta: Meta | None = None
    file_pages: int = 0
    pages_walked: int = 0
    free_pages: int = 0
    leaked_pages: int = 0
    """Pages neither in use nor listed free: lost space, not a danger."""
    damage: list[Damage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Faults of the environment as a whole (unreadable meta, a file too short)."""
    pages: list[Page] = field(default_factory=list)
    """Every page walked, when asked for (tests use it to find pages to damage)."""
    named: dict[str, DbRecord] = field(default_factory=dict)
    zeroed: list[tuple[str, bytes]] = field(default_factory=list)
    """(database, key) of the values whose overflow pages read as zeros: holes punched on
    purpose where ``punched`` was given (the caller checks that no live record is among
    them)."""

    @property
    def clean(self) -> bool:
        return not self.damage and not self.problems

    def summary(self) -> list[str]:
        return [*self.problems, *(d.describe() for d in self.damage)]


def read_meta(path: Path, txnid: int | None = None) -> Meta:
    """The committed meta page of the data file at ``path`` (the newer of the two, or the one
    of transaction ``txnid``). Two ``pread`` calls: cheap enough to run before every open."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_meta(fd, os.fstat(fd).st_size, txnid)
    finally:
        os.close(fd)


def _read_meta(fd: int, size: int, txnid: int | None) -> Meta:
    if sys.byteorder != "little":
        raise EnvUnreadable("only little-endian LMDB files are checked")
    first = os.pread(fd, PAGE_HEADER + _META.size + 2 * DB_RECORD + 16, 0)
    meta0 = _parse_meta(first, 0)
    psize = meta0.page_size
    if psize < 512 or psize > 32768 or psize & (psize - 1):
        raise EnvUnreadable(f"meta page 0 gives an impossible page size {psize}")
    second = os.pread(fd, PAGE_HEADER + _META.size + 2 * DB_RECORD + 16, psize)
    meta1 = _parse_meta(second, 1)
    if txnid is not None:
        for m in (meta0, meta1):
            if m.txnid == txnid:
                return m
        raise SnapshotGone(f"no meta page holds transaction {txnid} any more")
    return meta1 if meta1.txnid > meta0.txnid else meta0


def _parse_meta(buf: bytes, slot: int) -> Meta:
    if len(buf) < _META_DBS + 2 * DB_RECORD + 16:
        raise EnvUnreadable(f"meta page {slot} is beyond the end of the file")
    magic, version, _, map_size = _META.unpack_from(buf, PAGE_HEADER)
    if magic != MAGIC:
        raise EnvUnreadable(f"meta page {slot}: not an LMDB meta page (magic {magic:#x})")
    if version != DATA_VERSION:
        raise EnvUnreadable(f"meta page {slot}: LMDB data version {version}, not "
                            f"{DATA_VERSION}")
    page_size = _DB.unpack_from(buf, _META_DBS)[0]  # the free tree's pad is the page size
    free = DbRecord.unpack(buf, _META_DBS)
    main = DbRecord.unpack(buf, _META_DBS + DB_RECORD)
    last_pgno, txnid = struct.unpack_from("<QQ", buf, _META_DBS + 2 * DB_RECORD)
    return Meta(slot, txnid, last_pgno, page_size, map_size, free, main)


def check_file_covers(path: Path) -> None:
    """Raise :class:`EnvUnreadable` when the data file is shorter than the pages its
    committed meta says are in use.

    LMDB maps the whole map size and checks a page number only against the meta's last
    page, not against the file: a tree page beyond the end of a truncated file is a SIGBUS
    in the first reader that follows a pointer there, which kills the process. Checked
    before an environment is opened, it is a clear error instead."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return  # created but never written (a crash right after): LMDB initializes it
        meta = _read_meta(fd, size, None)
    finally:
        os.close(fd)
    need = (meta.last_pgno + 1) * meta.page_size
    if size < need:
        raise EnvUnreadable(
            f"{path} is truncated: {size} bytes, but its pages in use reach {need} bytes "
            f"(pages {size // meta.page_size}..{meta.last_pgno} missing)")


def check_env(path: Path, *, txnid: int | None = None, collect: bool = False,
              punched: bool = False) -> EnvCheck:
    """Walk every tree of the LMDB data file at ``path`` (see the module docstring).

    ``txnid``: check that transaction's snapshot (hold it open meanwhile), else the newest
    committed one. ``collect``: also list every page walked, in :attr:`EnvCheck.pages`.
    ``punched``: an overflow page that reads as zeros is a hole punched on purpose (a
    segment's dead chunks), not damage.
    Never raises for damage (it is reported); :class:`SnapshotGone` asks for a retry.
    """
    report = EnvCheck(Path(path))
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        report.problems.append(f"cannot open {path}: {exc}")
        return report
    try:
        size = os.fstat(fd).st_size
        try:
            meta = _read_meta(fd, size, txnid)
        except EnvUnreadable as exc:
            report.problems.append(str(exc))
            return report
        report.meta = meta
        report.file_pages = size // meta.page_size
        _Walker(fd, size, meta, report, collect, punched).run()
    finally:
        os.close(fd)
    return report


class _Walker:
    """One walk of one snapshot: every tree, then the accounting of every page."""

    def __init__(self, fd: int, size: int, meta: Meta, report: EnvCheck, collect: bool,
                 punched: bool) -> None:
        self.fd = fd
        self.punched = punched
        self.size = size
        self.meta = meta
        self.psize = meta.page_size
        self.next_pgno = meta.last_pgno + 1
        self.report = report
        self.collect = collect
        self.used = bytearray(self.next_pgno)
        self.freed = bytearray(self.next_pgno)
        self.free_lists: list[bytes] = []
        # Per-tree tallies, compared with its record at the end of its walk.
        self.counts = [0, 0, 0, 0, 0]  # branch, leaf, overflow, entries, depth
        # Per tree, in key order: the range of each leaf walked, or of a damaged page with the
        # index of its damage (to widen each damage's guard by its neighbours).
        self.spans: list[tuple[bytes | None, bytes | None, int | None]] = []

    def run(self) -> None:
        report = self.report
        if self.size < self.next_pgno * self.psize:
            report.problems.append(
                f"file is truncated: {self.size} bytes, but the pages in use reach "
                f"{self.next_pgno * self.psize} (pages {self.size // self.psize}.."
                f"{self.next_pgno - 1} are missing): LMDB would fault (SIGBUS) on a page "
                "past the end")
        self.tree(FREE_DB, self.meta.free, integer_keys=True)
        named: list[tuple[str, DbRecord]] = []
        self.tree(MAIN_DB, self.meta.main, named=named)
        for name, record in named:
            report.named[name] = record
            self.tree(name, record, integer_keys=bool(record.flags & MDB_INTEGERKEY))
        for raw in self.free_lists:
            self.free_list(raw)
        # One byte per page, 1 where set (meta pages are never claimed nor listed free):
        # counted by C loops, since a Python loop over every page of a large segment
        # cost a fifth of the walk.
        used, freed = self.used, self.freed
        overlap = int.from_bytes(used, "little") & int.from_bytes(freed, "little")
        both = overlap.bit_count()
        report.free_pages = freed.count(1)
        report.leaked_pages = (self.next_pgno - NUM_METAS - used.count(1) - report.free_pages
                               + both)
        if both:
            first_both = overlap.to_bytes(len(used), "little").find(1)
            report.damage.append(Damage(
                FREE_DB, first_both, f"{both} page(s) in use are also listed as free: the "
                "next write would overwrite them"))

    # -- reading ------------------------------------------------------------------------

    def page(self, pgno: int) -> bytes | None:
        off = pgno * self.psize
        if off + self.psize > self.size:
            return None
        buf = os.pread(self.fd, self.psize, off)
        return buf if len(buf) == self.psize else None

    def claim(self, pgno: int, db: str, low: bytes | None, high: bytes | None,
              key: bytes | None = None) -> str | None:
        """Mark ``pgno`` in use; the problem, if it cannot be."""
        if not NUM_METAS <= pgno < self.next_pgno:
            return f"points to page {pgno}, outside the pages in use (2..{self.next_pgno - 1})"
        if self.used[pgno]:
            return f"points to page {pgno}, which another pointer reaches too"
        self.used[pgno] = 1
        return None

    def damage(self, db: str, pgno: int | None, problem: str, low: bytes | None,
               high: bytes | None, key: bytes | None = None) -> None:
        """Record damage. A page that cannot be walked (no key given) becomes a span of its
        tree, whose guard :meth:`widen` sets; one key's damage guards that key only."""
        if key is not None:
            self.report.damage.append(Damage(db, pgno, problem, low, high, key,
                                             guard_low=key, guard_high=key + b"\0"))
            return
        self.spans.append((low, high, len(self.report.damage)))
        self.report.damage.append(Damage(db, pgno, problem, low, high, guard_low=low,
                                         guard_high=high))

    def widen(self, first: int) -> None:
        """Widen the guards of this tree's damage (from ``first`` on) by the neighbouring
        leaves' ranges (see :attr:`Damage.guard_low`)."""
        spans = self.spans
        for i, (_, _, index) in enumerate(spans):
            if index is None or index < first:
                continue
            d = self.report.damage[index]
            # Widen, never narrow: an unbounded side stays unbounded.
            low = spans[i - 1][0] if i > 0 and d.low is not None else d.low
            high = spans[i + 1][1] if i + 1 < len(spans) and d.high is not None else d.high
            self.report.damage[index] = replace(d, guard_low=low, guard_high=high)

    # -- trees ----------------------------------------------------------------------------

    def tree(self, db: str, record: DbRecord, *, integer_keys: bool = False,
             named: list[tuple[str, DbRecord]] | None = None) -> None:
        if record.root == P_INVALID:
            if record.entries or record.leaf_pages or record.branch_pages or record.depth:
                self.damage(db, None, "empty tree with non-zero counters", None, None)
            return
        if record.flags & MDB_DUPSORT:
            self.damage(db, None, "duplicate-key database: not checked", None, None)
            return
        if record.depth > MAX_DEPTH:
            self.damage(db, None, f"depth {record.depth} is impossible", None, None)
            return
        self.counts = [0, 0, 0, 0, 0]
        self.spans = []
        problem = self.claim(record.root, db, None, None)
        if problem:
            self.damage(db, None, f"root {problem}", None, None)
            return
        before = len(self.report.damage)
        self.walk(db, record.root, 1, None, None, integer_keys, named)
        self.widen(before)
        if len(self.report.damage) > before:
            return  # counters of a damaged tree disagree anyway: the damage says more
        walked = dict(zip(("branch pages", "leaf pages", "overflow pages", "entries", "depth"),
                          self.counts, strict=True))
        recorded = {"branch pages": record.branch_pages, "leaf pages": record.leaf_pages,
                    "overflow pages": record.overflow_pages, "entries": record.entries,
                    "depth": record.depth}
        wrong = [f"{k} {recorded[k]} recorded, {walked[k]} found"
                 for k in walked if walked[k] != recorded[k]]
        if wrong:
            self.damage(db, None, "its record disagrees with its pages: " + ", ".join(wrong),
                        None, None)

    def walk(self, db: str, pgno: int, depth: int, low: bytes | None, high: bytes | None,
             integer_keys: bool, named: list[tuple[str, DbRecord]] | None) -> None:
        """Check page ``pgno`` (already claimed) and what it points to; its keys must lie in
        [low, high)."""
        buf = self.page(pgno)
        if buf is None:
            self.damage(db, pgno, "page lies beyond the end of the file", low, high)
            return
        self.report.pages_walked += 1
        stored, _, flags, lower, upper = _HEADER.unpack_from(buf, 0)
        kind = flags & ~P_DIRTY
        if stored != pgno:
            self.damage(db, pgno, f"page says it is page {stored}", low, high)
            return
        if flags & P_DIRTY:
            # Never on disk in a committed page: LMDB would write to it in place.
            self.damage(db, pgno, "page is marked dirty at rest", low, high)
            return
        if kind not in (P_BRANCH, P_LEAF):
            self.damage(db, pgno, f"a tree pointer reaches a page of kind {flags:#x}, not a "
                        "branch or leaf page", low, high)
            return
        if not PAGE_HEADER <= lower <= upper <= self.psize or (lower - PAGE_HEADER) % 2:
            self.damage(db, pgno, f"impossible bounds (lower {lower}, upper {upper})", low, high)
            return
        n = (lower - PAGE_HEADER) >> 1
        if n == 0:
            self.damage(db, pgno, "page holds no entries", low, high)
            return
        if depth > MAX_DEPTH:
            self.damage(db, pgno, "tree deeper than LMDB allows", low, high)
            return
        self.counts[4] = max(self.counts[4], depth)
        if self.collect:
            self.report.pages.append(Page(pgno, _KINDS[kind], db, depth, low, high))
        if kind == P_BRANCH:
            self.branch(db, pgno, buf, n, upper, depth, low, high, integer_keys, named)
        else:
            self.leaf(db, pgno, buf, n, upper, depth, low, high, integer_keys, named)

    def nodes(self, db: str, pgno: int, buf: bytes, n: int, upper: int, low: bytes | None,
              high: bytes | None, integer_keys: bool, branch: bool
              ) -> list[tuple[int, int, int, bytes]] | None:
        """The page's nodes as (offset, lo|hi, flags, key), checked: inside the page, keys
        in order and inside [low, high). None (and the damage recorded) if any is not."""
        out: list[tuple[int, int, int, bytes]] = []
        previous: bytes | None = None
        psize = self.psize
        unpack_node = _NODE.unpack_from
        # This loop runs once per node of every page of every walk (a verify, a server's
        # start): plain byte comparisons where keys are not integers, and the page's node
        # offsets unpacked at once, make the walk of a store of 64 KiB chunks half as long.
        if PAGE_HEADER + 2 * n > len(buf):
            self.damage(db, pgno, f"{n} nodes cannot fit the page", low, high)
            return None
        offsets = struct.unpack_from(f"<{n}H", buf, PAGE_HEADER)
        if not integer_keys:
            fast = _sound_nodes(buf, offsets, upper, psize, low, high, branch)
            if fast is not None:
                return fast
        # The slow way, node by node: integer keys, or something is wrong (named here).
        for i, offset in enumerate(offsets):
            if offset < upper or offset + NODE_HEADER > psize:
                self.damage(db, pgno, f"node {i} lies outside the page's node area", low, high)
                return None
            lo, hi, flags, ksize = unpack_node(buf, offset)
            if offset + NODE_HEADER + ksize > psize:
                self.damage(db, pgno, f"node {i}'s key runs past the page", low, high)
                return None
            key = buf[offset + NODE_HEADER : offset + NODE_HEADER + ksize]
            # A branch page's first key is not used (its child holds everything below the
            # second): LMDB leaves it empty.
            if not (branch and i == 0):
                if integer_keys:
                    if ksize != 8:
                        self.damage(db, pgno, f"node {i} has a {ksize}-byte integer key",
                                    low, high)
                        return None
                    in_order = previous is None or _less(previous, key, True)
                    inside = ((low is None or not _less(key, low, True))
                              and (high is None or _less(key, high, True)))
                else:
                    in_order = previous is None or previous < key
                    inside = (low is None or key >= low) and (high is None or key < high)
                if not in_order:
                    self.damage(db, pgno, f"keys out of order at node {i}", low, high)
                    return None
                if not inside:
                    self.damage(db, pgno, f"node {i}'s key {key.hex()} lies outside the "
                                "page's range", low, high)
                    return None
                previous = key
            out.append((offset, lo | hi << 16, flags, key))
        return out

    def branch(self, db: str, pgno: int, buf: bytes, n: int, upper: int, depth: int,
               low: bytes | None, high: bytes | None, integer_keys: bool,
               named: list[tuple[str, DbRecord]] | None) -> None:
        nodes = self.nodes(db, pgno, buf, n, upper, low, high, integer_keys, branch=True)
        if nodes is None:
            return
        self.counts[0] += 1
        for i, (_, lohi, flags, key) in enumerate(nodes):
            child = lohi | flags << 32
            child_low = low if i == 0 else key
            child_high = nodes[i + 1][3] if i + 1 < len(nodes) else high
            problem = self.claim(child, db, child_low, child_high)
            if problem:
                self.damage(db, pgno, f"node {i} {problem}", child_low, child_high)
                continue
            self.walk(db, child, depth + 1, child_low, child_high, integer_keys, named)

    def leaf(self, db: str, pgno: int, buf: bytes, n: int, upper: int, depth: int,
             low: bytes | None, high: bytes | None, integer_keys: bool,
             named: list[tuple[str, DbRecord]] | None) -> None:
        nodes = self.nodes(db, pgno, buf, n, upper, low, high, integer_keys, branch=False)
        if nodes is None:
            return
        self.spans.append((low, high, None))
        self.counts[1] += 1
        self.counts[3] += n
        if db != FREE_DB:
            # The two kinds of leaf nearly every page is (small records; a segment's chunks),
            # checked without the general loop below.
            kinds = {flags for _, _, flags, _ in nodes}
            if kinds == {0} and max(offset + NODE_HEADER + len(key) + size
                                    for offset, size, _, key in nodes) <= self.psize:
                return  # small values, each inside the page: nothing more to check
            if kinds == {F_BIGDATA}:
                self.overflows(db, pgno, buf, nodes, depth)
                return
        for i, (offset, size, flags, key) in enumerate(nodes):
            data = offset + NODE_HEADER + len(key)
            if flags & ~(F_BIGDATA | F_SUBDATA) or flags == F_BIGDATA | F_SUBDATA:
                self.damage(db, pgno, f"node {i} has impossible flags {flags:#x}", low, high, key)
                continue
            if flags & F_BIGDATA:
                value = self.overflow(db, pgno, i, buf, data, size, depth, key,
                                      want=db == FREE_DB)
                if value is not None:
                    self.free_lists.append(value)
                continue
            if data + size > self.psize:
                self.damage(db, pgno, f"node {i}'s value runs past the page", low, high, key)
                continue
            value = buf[data : data + size]
            if flags & F_SUBDATA:
                if named is None or size != DB_RECORD:
                    self.damage(db, pgno, f"node {i} is a database record where none can be",
                                low, high, key)
                    continue
                named.append((key.decode("utf-8", "backslashreplace"),
                              DbRecord.unpack(value, 0)))
            elif db == FREE_DB:
                self.free_lists.append(value)

    def overflows(self, db: str, pgno: int, buf: bytes,
                  nodes: list[tuple[int, int, int, bytes]], depth: int) -> None:
        """Check a leaf of large values only (a segment's chunks): :meth:`overflow`'s checks
        inlined for the value whose pages are plainly sound; any other goes through
        :meth:`overflow`, which names what is wrong (or finds a punched hole). A walk of a
        store of 64 KiB chunks took a fifth less time."""
        psize, fd, used, next_pgno = self.psize, self.fd, self.used, self.next_pgno
        unpack_pgno, unpack_head = _U64.unpack_from, _OVERFLOW_HEADER.unpack_from
        pages = 0
        for i, (offset, size, _, key) in enumerate(nodes):
            data = offset + NODE_HEADER + len(key)
            count = (PAGE_HEADER - 1 + size) // psize + 1
            if data + 8 <= psize:
                first = unpack_pgno(buf, data)[0]
                if first >= NUM_METAS and first + count <= next_pgno:
                    head = os.pread(fd, _OVERFLOW_HEADER.size, first * psize)
                    if len(head) == _OVERFLOW_HEADER.size:
                        stored, _, flags, run = unpack_head(head, 0)
                        if (stored == first and flags == P_OVERFLOW and run == count
                                and used.find(1, first, first + count) < 0):
                            used[first : first + count] = b"\1" * count
                            pages += count
                            if self.collect:
                                self.report.pages.append(Page(first, "overflow", db,
                                                              depth + 1, None, None, key,
                                                              count))
                            continue
            self.overflow(db, pgno, i, buf, data, size, depth, key, want=False)
        self.counts[2] += pages

    def overflow(self, db: str, pgno: int, i: int, buf: bytes, data: int, size: int,
                 depth: int, key: bytes, want: bool) -> bytes | None:
        """Check the overflow pages of a large value; its bytes when ``want``."""
        if data + 8 > self.psize:
            self.damage(db, pgno, f"node {i}'s overflow pointer runs past the page",
                        None, None, key)
            return None
        first = _U64.unpack_from(buf, data)[0]
        count = (PAGE_HEADER - 1 + size) // self.psize + 1
        if first < NUM_METAS or first + count > self.next_pgno:
            self.damage(db, pgno, f"node {i}'s value would lie on pages {first}.."
                        f"{first + count - 1}, outside the pages in use", None, None, key)
            return None
        head = os.pread(self.fd, _OVERFLOW_HEADER.size, first * self.psize)
        if len(head) < _OVERFLOW_HEADER.size:
            self.damage(db, first, "overflow page lies beyond the end of the file",
                        None, None, key)
            return None
        stored, _, flags, pages = _OVERFLOW_HEADER.unpack_from(head, 0)
        if self.punched and not any(head):
            # A dead chunk's pages punched out of a sealed segment (nbdsink.store.holes): they
            # read as zeros and are never read, nor freed (nothing writes a sealed segment).
            self.report.zeroed.append((db, key))
        elif stored != first or flags != P_OVERFLOW or pages != count:
            self.report.damage.append(Damage(
                db, first, f"overflow page header is wrong (says page {stored}, kind "
                f"{flags:#x}, {pages} pages; expected {first}, {P_OVERFLOW:#x}, {count})",
                None, None, key, True))
            return None
        p = self.used.find(1, first, first + count)
        if p >= 0:
            self.damage(db, first, f"overflow pages {first}..{first + count - 1} overlap "
                        f"page {p}, which another pointer reaches too", None, None, key)
            return None
        self.used[first : first + count] = b"\1" * count
        self.counts[2] += count
        if self.collect:
            self.report.pages.append(Page(first, "overflow", db, depth + 1, None, None, key,
                                          count))
        if not want:
            return None
        value = os.pread(self.fd, size, first * self.psize + PAGE_HEADER)
        return value if len(value) == size else None

    def free_list(self, raw: bytes) -> None:
        """One record of the free-page tree: a count, then that many page numbers."""
        if len(raw) < 8 or len(raw) % 8:
            self.damage(FREE_DB, None, f"a free-page list of {len(raw)} bytes", None, None)
            return
        count = _U64.unpack_from(raw, 0)[0]
        if count != len(raw) // 8 - 1:
            self.damage(FREE_DB, None, f"a free-page list says {count} pages but holds "
                        f"{len(raw) // 8 - 1}", None, None)
            return
        for (pgno,) in struct.iter_unpack("<Q", raw[8:]):
            if not NUM_METAS <= pgno < self.next_pgno or self.freed[pgno]:
                self.damage(FREE_DB, None, f"page {pgno} is listed free twice or is out of "
                            "range", None, None)
                return
            self.freed[pgno] = 1


def _sound_nodes(buf: bytes, offsets: tuple[int, ...], upper: int, psize: int,
                 low: bytes | None, high: bytes | None, branch: bool
                 ) -> list[tuple[int, int, int, bytes]] | None:
    """A page's nodes as :meth:`_Walker.nodes` gives them, when every check passes (None
    otherwise: the caller then goes node by node to name what is wrong). The same checks as
    there, by whole-page C loops: ``min``/``max`` of the offsets and key ends, keys in
    order by pairwise comparison, and only the outer keys against the page's range (keys in
    order lie inside it when those do). A walk of 64 KiB chunks took a third less time."""
    if min(offsets) < upper or max(offsets) + NODE_HEADER > psize:
        return None
    unpack_node = _NODE.unpack_from
    heads = [unpack_node(buf, offset) for offset in offsets]
    ends = [offset + NODE_HEADER + head[3] for offset, head in zip(offsets, heads, strict=True)]
    if max(ends) > psize:
        return None
    keys = [buf[offset + NODE_HEADER : end] for offset, end in zip(offsets, ends, strict=True)]
    # A branch page's first key is not used (see nodes()).
    ordered = keys[1:] if branch else keys
    if ordered:
        if not all(map(bytes.__lt__, ordered, ordered[1:])):
            return None
        if (low is not None and ordered[0] < low) or (high is not None and ordered[-1] >= high):
            return None
    return [(offset, head[0] | head[1] << 16, head[2], key)
            for offset, head, key in zip(offsets, heads, keys, strict=True)]


def _less(a: bytes, b: bytes, integer_keys: bool) -> bool:
    if integer_keys:
        return int.from_bytes(a, "little") < int.from_bytes(b, "little")
    return a < b
