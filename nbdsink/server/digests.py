"""The digests view of an export (see :mod:`nbdsink.contract`): 32 bytes per block, the blake3
of what a reader of the version sees there, each one checked against the chunk's data."""

from __future__ import annotations

import blake3

from nbdsink.contract import DAMAGED, DIGEST_SIZE
from nbdsink.store import Store, VolumeInfo
from nbdsink.store.head import Head
from nbdsink.store.store import ChunkDamaged, Reading


def _zero_digest(n: int, cache: dict[int, bytes]) -> bytes:
    d = cache.get(n)
    if d is None:
        d = cache[n] = blake3.blake3(bytes(n)).digest()
    return d


def read_version_digests(store: Store, volume: VolumeInfo, version: int, buf: memoryview,
                         offset: int) -> None:
    """Fill ``buf`` with bytes ``offset``.. of the digests view of ``volume`` at ``version``.

    Each chunk is read and checked (its checksum, and blake3 against its digest): a damaged
    one reads as DAMAGED and is quarantined, so the next write of that content heals it."""
    first, count, skip = _span(offset, len(buf))
    bs = volume.block_size
    zeros: dict[int, bytes] = {}
    scratch = bytearray(bs)
    damaged: list[bytes] = []

    def fill(r: Reading) -> bytes:
        out = bytearray()
        for i, digest in enumerate(store.block_digests(r, volume, version, first, count)):
            block = first + i
            n = min(bs, volume.size - block * bs)
            if n <= 0:
                out += bytes(DIGEST_SIZE)
                continue
            if digest is None:
                out += _zero_digest(n, zeros)
                continue
            view = memoryview(scratch)[:n]
            try:
                store.copy_chunk(r, digest, view, 0)
            except ChunkDamaged:
                damaged.append(digest)
                out += DAMAGED
                continue
            seen = blake3.blake3(view).digest()
            if n == bs and seen != digest:
                damaged.append(digest)  # data that are not what they are filed under
                out += DAMAGED
                continue
            out += seen
        return bytes(out)

    data = store.read(fill)
    for digest in damaged:
        store.mark_damaged(digest)
    buf[:] = data[skip : skip + len(buf)]


def read_head_digests(head: Head, buf: memoryview, offset: int) -> None:
    """The digests view of a volume's pending head (computed from its data)."""
    volume = head.volume
    first, count, skip = _span(offset, len(buf))
    bs = volume.block_size
    out = bytearray()
    scratch = bytearray(bs)
    for block in range(first, first + count):
        n = min(bs, volume.size - block * bs)
        if n <= 0:
            out += bytes(DIGEST_SIZE)
            continue
        view = memoryview(scratch)[:n]
        try:
            head.read_into(view, block * bs)
        except ChunkDamaged:
            out += DAMAGED
            continue
        out += blake3.blake3(view).digest()
    buf[:] = bytes(out)[skip : skip + len(buf)]


def _span(offset: int, length: int) -> tuple[int, int, int]:
    first = offset // DIGEST_SIZE
    last = (offset + length - 1) // DIGEST_SIZE
    return first, last - first + 1, offset - first * DIGEST_SIZE



