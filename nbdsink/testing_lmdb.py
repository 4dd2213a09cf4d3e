"""Helpers for tests: find LMDB pages of a store by database and kind, and damage them.

Only ever on a copy of a store that no process has open: these write into LMDB's files
behind its back, which is the point (disks and filesystems do it too).
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

from nbdsink.store.lmdb_pages import (
    DB_RECORD,
    NODE_HEADER,
    PAGE_HEADER,
    Page,
    check_env,
    read_meta,
)

_META_LAST_PGNO = PAGE_HEADER + 24 + 2 * DB_RECORD
"""Where a meta page keeps the number of the last page in use."""


def main_file(store: Path) -> Path:
    return Path(store) / "data.mdb"


def segment_file(store: Path, sid: int = 1) -> Path:
    return Path(store) / "segments" / f"{sid:08d}.mdb"


def find_pages(data_file: Path, db: str, kind: str, depth: int | None = None) -> list[Page]:
    """The pages of database ``db`` of ``kind`` ("branch", "leaf", "overflow"; at ``depth``,
    1 being the root), in key order."""
    found = check_env(data_file, collect=True, punched=data_file.name != "data.mdb")
    return [p for p in found.pages
            if p.db == db and p.kind == kind and (depth is None or p.depth == depth)]


def page_size(data_file: Path) -> int:
    return read_meta(data_file).page_size


def write_at(data_file: Path, offset: int, data: bytes) -> None:
    fd = os.open(data_file, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_page(data_file: Path, pgno: int) -> bytes:
    size = page_size(data_file)
    fd = os.open(data_file, os.O_RDONLY)
    try:
        return os.pread(fd, size, pgno * size)
    finally:
        os.close(fd)


def zero_page(data_file: Path, pgno: int) -> None:
    """The page reads as zeros (a lost write, a hole): the damage that makes LMDB abort."""
    size = page_size(data_file)
    write_at(data_file, pgno * size, bytes(size))


def scramble_page(data_file: Path, pgno: int, seed: int = 0, keep_header: bool = True) -> None:
    """Random bytes over the page (after its header, when ``keep_header``)."""
    size = page_size(data_file)
    start = PAGE_HEADER if keep_header else 0
    write_at(data_file, pgno * size + start, random.Random(seed).randbytes(size - start))


def node_offset(data_file: Path, pgno: int, node: int) -> int:
    """Where node ``node`` of B-tree page ``pgno`` starts in the file."""
    page = read_page(data_file, pgno)
    offset: int = struct.unpack_from("<H", page, PAGE_HEADER + 2 * node)[0]
    return pgno * len(page) + offset


def redirect_child(data_file: Path, branch: int, node: int, target: int) -> None:
    """Make node ``node`` of branch page ``branch`` point to page ``target`` (a pointer
    damaged into another valid page number)."""
    write_at(data_file, node_offset(data_file, branch, node),
             struct.pack("<HHH", target & 0xFFFF, (target >> 16) & 0xFFFF, target >> 32))


def overflow_pointer(data_file: Path, leaf: int, node: int, target: int) -> None:
    """Make a large value of leaf page ``leaf`` point to overflow page ``target``."""
    offset = node_offset(data_file, leaf, node)
    page = read_page(data_file, leaf)
    ksize = struct.unpack_from("<H", page, offset - leaf * len(page) + 6)[0]
    write_at(data_file, offset + NODE_HEADER + ksize, struct.pack("<Q", target))


def truncate(data_file: Path, pages: int) -> None:
    """Cut the file ``pages`` pages short of the pages its meta says are in use."""
    meta = read_meta(data_file)
    os.truncate(data_file, (meta.last_pgno + 1 - pages) * meta.page_size)


def claim_pages(data_file: Path, extra: int) -> int:
    """Raise the committed meta's last page by ``extra`` (pages beyond the end of the file
    now count as in use); returns the first of them."""
    meta = read_meta(data_file)
    write_at(data_file, meta.slot * meta.page_size + _META_LAST_PGNO,
             struct.pack("<Q", meta.last_pgno + extra))
    return meta.last_pgno + 1
