"""Fixed-width big-endian keys, so LMDB's byte order is numeric order.

map key:      volume id (u32) | block (u64) | ~version (u64)
   Storing the version inverted makes the newest entry of a block sort first, so "the newest
   entry for block b at or below version V" is a single ``set_range`` to (b, ~V).
version key:  volume id (u32) | version (u64)
change key:   volume id (u32) | version (u64) | block (u64)
   The blocks a version has map entries for, in block order.
"""

from __future__ import annotations

import struct

_MAP = struct.Struct(">IQQ")
_VERSION = struct.Struct(">IQ")
_CHANGE = struct.Struct(">IQQ")
_U64_MAX = (1 << 64) - 1

MAP_KEY_SIZE = _MAP.size
BLOCK_PREFIX_SIZE = 12  # volume id + block


def map_key(volume_id: int, block: int, version: int) -> bytes:
    return _MAP.pack(volume_id, block, _U64_MAX - version)


def unpack_map_key(key: bytes) -> tuple[int, int, int]:
    volume_id, block, inverted = _MAP.unpack(key)
    return volume_id, block, _U64_MAX - inverted


def version_key(volume_id: int, version: int) -> bytes:
    return _VERSION.pack(volume_id, version)


def unpack_version_key(key: bytes) -> tuple[int, int]:
    volume_id, version = _VERSION.unpack(key)
    return volume_id, version


def volume_id_key(volume_id: int) -> bytes:
    return struct.pack(">I", volume_id)


def change_key(volume_id: int, version: int, block: int) -> bytes:
    return _CHANGE.pack(volume_id, version, block)


def unpack_change_key(key: bytes) -> tuple[int, int, int]:
    volume_id, version, block = _CHANGE.unpack(key)
    return volume_id, version, block
