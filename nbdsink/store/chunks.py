"""The on-disk form of one stored chunk: a small versioned header, then the data.

header: format (u8) | codec (u8) | length (u32), big-endian. Codec 0 is raw. A reader that
meets a format or codec it does not know fails loudly instead of returning wrong bytes.
"""

from __future__ import annotations

import struct

import blake3

from nbdsink.store.errors import StoreFormatError

CHUNK_FORMAT = 1
CODEC_RAW = 0
_HEADER = struct.Struct(">BBI")
HEADER_SIZE = _HEADER.size
DIGEST_SIZE = 32


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The chunk's content address: its blake3 digest."""
    return blake3.blake3(data).digest()


def encode_chunk(data: bytes | bytearray | memoryview, pad_to: int = 0) -> bytearray:
    """Header and data in one buffer (one copy of ``data``), zero-padded to ``pad_to`` bytes
    of data when ``data`` is shorter (the partial last block of a volume)."""
    length = max(len(data), pad_to)
    # Header, then append: no zero-fill of the data part before it is overwritten.
    out = bytearray(_HEADER.pack(CHUNK_FORMAT, CODEC_RAW, length))
    out += data
    if length > len(data):
        out += bytes(length - len(data))
    return out


def decode_chunk(stored: bytes | memoryview) -> memoryview:
    """The chunk's data, as a view into ``stored``."""
    fmt, codec, length = _HEADER.unpack_from(stored)
    if fmt != CHUNK_FORMAT or codec != CODEC_RAW:
        raise StoreFormatError(f"chunk in unknown format {fmt}/codec {codec}")
    view = memoryview(stored)[HEADER_SIZE : HEADER_SIZE + length]
    if len(view) != length:
        raise StoreFormatError("truncated chunk")
    return view
