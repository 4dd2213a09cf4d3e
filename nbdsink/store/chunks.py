"""The on-disk form of one stored chunk: a small versioned header, then the data.

header: format (u8) | codec (u8) | length (u32), big-endian. Codec 0 is raw. A reader that
meets a format or codec it does not know fails loudly instead of returning wrong bytes.

Format 1 keeps the whole chunk in one value of the ``chunks`` database. Format 2 keeps header
and data up to :func:`split_point` there and the last few bytes in ``chunk_tails``. LMDB puts
a large value on whole pages behind a 16-byte page header, so header and a 4 KiB block take
two pages of 4 KiB, a 16 KiB block five; without its tail the value fills its pages exactly,
and the tails pack densely into ordinary leaf pages.

A split chunk costs a second lookup on every read of it (a quarter more time in the store's
read path, measured in one thread). Chunks smaller than :data:`WHOLE_FROM` are split (the
page they would waste is 12% of a 32 KiB chunk and more for smaller ones); larger ones, the
default 64 KiB among them, stay whole (one page in 17, 6%, for a 64 KiB block).
"""

from __future__ import annotations

import functools
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
WHOLE_FROM = 64 << 10
"""Chunks of this many bytes or more are stored whole (format 1), smaller ones split."""


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's content address: its blake3 digest."""
    return blake3.blake3(data).digest()


def split_point(length: int, page_size: int) -> int:
    """How many data bytes of a split chunk of ``length`` go in the ``chunks`` value: as
    many as fill the value's LMDB pages exactly (the rest is the chunk's tail: 22 bytes for
    a block, a power of two, with 4 KiB pages). Whether a chunk is split at all is
    :func:`encode_chunk`'s choice, written in its header."""
    return length - min(length, (HEADER_SIZE + length + LMDB_PAGE_HEADER) % page_size)


def encode_chunk(data: bytes | bytearray | memoryview, pad_to: int = 0) -> bytearray:
    """Header and data in one buffer (one copy of ``data``), zero-padded to ``pad_to`` bytes
    of data when ``data`` is shorter (the partial last block of a volume).

    :meth:`nbdsink.store.Store.stage_blocks` stores a split chunk (format 2) up to the split
    point and the rest as the tail (which may be empty)."""
    length = max(len(data), pad_to)
    fmt = FORMAT_WHOLE if length >= WHOLE_FROM else FORMAT_SPLIT
    # Header, then append: no zero-fill of the data part before it is overwritten.
    out = bytearray(_HEADER.pack(fmt, CODEC_RAW, length))
    out += data
    if length > len(data):
        out += bytes(length - len(data))
    return out


_unpack_header = _HEADER.unpack_from


@functools.lru_cache(maxsize=64)
def whole_header(length: int) -> bytes:
    """The header of a whole (format 1), raw chunk of ``length`` data bytes: a read that
    finds exactly these bytes in front of exactly ``length`` more needs no other check of
    the header."""
    return _HEADER.pack(FORMAT_WHOLE, CODEC_RAW, length)


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
