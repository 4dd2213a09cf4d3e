"""The on-disk form of one stored chunk: a small versioned header, then the data.

header: format (u8) | codec (u8) | length (u32), big-endian. Codec 0 is raw. A reader that
meets a format or codec it does not know fails loudly instead of returning wrong bytes.

Format 1 keeps the whole chunk in one value of the ``chunks`` database. Format 2 (what is
written now) keeps header and data up to :func:`split_point` there and the last few bytes in
``chunk_tails``: LMDB puts a large value on whole pages behind a 16-byte page header, so a
value of header + 64 KiB of data would take 17 pages of 4 KiB, and a 4 KiB block would take
two. Without its tail the value fills its pages exactly, and the tails pack densely into
ordinary leaf pages. Stores written by earlier versions hold format 1 chunks, which stay
readable.
"""

from __future__ import annotations

import struct

import blake3

from nbdsink.store.errors import StoreFormatError

FORMAT_WHOLE = 1
FORMAT_SPLIT = 2
CODEC_RAW = 0
_HEADER = struct.Struct(">BBI")
HEADER_SIZE = _HEADER.size
DIGEST_SIZE = 32
LMDB_PAGE_HEADER = 16
"""Bytes of LMDB's page header in front of a value stored on its own (overflow) pages."""


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's content address: its blake3 digest."""
    return blake3.blake3(data).digest()


def split_point(length: int, page_size: int) -> int:
    """How many data bytes of a chunk of ``length`` go in the ``chunks`` value, so that the
    value (header and data) fills its LMDB pages exactly; the rest is the chunk's tail."""
    # For a block (a power of two from 4 KiB) and 4 KiB pages the tail is 22 bytes.
    return length - min(length, (HEADER_SIZE + length + LMDB_PAGE_HEADER) % page_size)


def encode_chunk(data: bytes | bytearray | memoryview, pad_to: int = 0) -> bytearray:
    """Header and data in one buffer (one copy of ``data``), zero-padded to ``pad_to`` bytes
    of data when ``data`` is shorter (the partial last block of a volume).

    The header says format 2; :meth:`nbdsink.store.Store.stage_blocks` stores the buffer up
    to the split point and the rest as the tail (which may be empty)."""
    length = max(len(data), pad_to)
    # Header, then append: no zero-fill of the data part before it is overwritten.
    out = bytearray(_HEADER.pack(FORMAT_SPLIT, CODEC_RAW, length))
    out += data
    if length > len(data):
        out += bytes(length - len(data))
    return out


_unpack_header = _HEADER.unpack_from


def check_header(stored: bytes | memoryview) -> tuple[int, int]:
    """``(format, length)`` of a stored ``chunks`` value (header and the data it holds: all
    of a format 1 chunk, the part before the split point of a format 2 chunk)."""
    fmt, codec, length = _unpack_header(stored)
    held = len(stored) - HEADER_SIZE
    if codec != CODEC_RAW or not (held == length if fmt == FORMAT_WHOLE
                                  else fmt == FORMAT_SPLIT and held <= length):
        raise StoreFormatError(
            f"chunk in unknown format {fmt}/codec {codec}, or of the wrong length")
    return fmt, length
