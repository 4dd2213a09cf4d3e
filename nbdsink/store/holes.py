"""Giving back the disk space of dead chunks in sealed segments without copying anything:
punch holes (``fallocate(FALLOC_FL_PUNCH_HOLE)``) over their LMDB overflow pages.

A chunk is stored in its segment as one LMDB value of more than a page, which LMDB keeps
in a run of consecutive *overflow pages* that hold nothing else. Once the chunk is dead
(swept from the index) and its segment is sealed (never written again, so LMDB never reuses
those pages), nothing reads those pages any more: the file's blocks under them can be
freed. The segment stays a valid LMDB file (its B-tree pages are untouched; the freed range
reads as zeros, and is never read).

LMDB does not say where a value lives, so the page is found from the value's address in
the memory map (the mapping of the file in ``/proc/self/maps``), and checked against the
page header in the file (page number, overflow flag, page count) before anything is
punched; any mismatch means "do not touch" (compaction remains the fallback).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

PAGE_HEADER = 16
"""LMDB's page header: pgno (u64), pad (u16), flags (u16), page count (u32) for overflow."""
P_OVERFLOW = 0x04
_HEADER = struct.Struct("<QHHI")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# The C library is already loaded into every Python process: no search for it (which
# ctypes.util.find_library does by running ldconfig, 40 ms at every start of the CLI).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def buffer_address(view: memoryview) -> int:
    """The address of a (read-only) buffer's first byte: where LMDB's map holds a value."""
    buf = _PyBuffer()
    if _get_buffer(view, ctypes.byref(buf), 0) != 0:
        raise OSError("cannot get the buffer's address")
    try:
        return int(buf.buf or 0)
    finally:
        _release_buffer(ctypes.byref(buf))


class FileMapping:
    """Where this process maps a file: address ranges and the file offsets they start at."""

    def __init__(self, path: Path) -> None:
        st = os.stat(path)
        inode = f" {st.st_ino} "
        self.ranges: list[tuple[int, int, int]] = []
        with open("/proc/self/maps") as maps:
            for line in maps:
                if inode not in line:  # most lines: skip them before parsing
                    continue
                fields = line.split(maxsplit=5)
                if len(fields) < 6:
                    continue
                dev_major, dev_minor = (int(x, 16) for x in fields[3].split(":"))
                if int(fields[4]) != st.st_ino or os.makedev(dev_major, dev_minor) != st.st_dev:
                    continue
                start, end = (int(x, 16) for x in fields[0].split("-"))
                self.ranges.append((start, end, int(fields[2], 16)))

    def offset_of(self, address: int) -> int | None:
        for start, end, offset in self.ranges:
            if start <= address < end:
                return address - start + offset
        return None


def overflow_run(fd: int, offset: int, length: int, page_size: int) -> tuple[int, int] | None:
    """The byte range of the overflow pages holding the ``length``-byte value that starts at
    file offset ``offset``, checked against the page header in the file; None when the value
    is not alone in an overflow run (a small value in a leaf page) or anything disagrees."""
    start = offset - PAGE_HEADER
    if start < 0 or start % page_size:
        return None
    header = os.pread(fd, PAGE_HEADER, start)
    if len(header) < PAGE_HEADER:
        return None
    pgno, _pad, flags, pages = _HEADER.unpack(header)
    expected = -(-(PAGE_HEADER + length) // page_size)
    if pgno != start // page_size or not flags & P_OVERFLOW or pages != expected:
        return None
    return start, pages * page_size


def coalesce(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges sorted, with touching ones merged into one."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(runs):
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def punch(fd: int, offset: int, length: int) -> bool:
    """Free the file's blocks under [offset, offset + length) (they then read as zeros);
    False when the filesystem cannot (the caller keeps compaction for that)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"cannot punch a hole: {os.strerror(err)}")
