"""Extent arithmetic and the coalescing of chunks into large NBD requests. Pure functions.

The sender works in chunks (the tracker's and the remote volume's block size). Dirty
extents arrive chunk-aligned; they are cut into reads of at most ``max_request`` bytes, and
each read buffer is split into runs: a run of all-zero chunks becomes one WRITE_ZEROES, a
run of data chunks one WRITE. Zero runs that touch are merged across reads, so an empty
stretch of the device costs one request, not one per read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

Extent = tuple[int, int]
"""(offset, length) in bytes."""


def union(*extent_lists: Iterable[Extent]) -> list[Extent]:
    """Sorted, merged union of extent lists (touching extents merge)."""
    items = sorted((o, n) for extents in extent_lists for o, n in extents if n > 0)
    out: list[Extent] = []
    for off, length in items:
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            out.append((off, length))
    return out


def total(extents: Iterable[Extent]) -> int:
    return sum(n for _, n in extents)


def align(extents: Iterable[Extent], chunk_size: int, size: int) -> list[Extent]:
    """Widen every extent to whole chunks, clip to ``size``, merge."""
    out = []
    for off, length in extents:
        start = off - off % chunk_size
        end = min(size, -(-(off + length) // chunk_size) * chunk_size)
        if end > start:
            out.append((start, end - start))
    return union(out)


def split(extents: Iterable[Extent], max_len: int) -> Iterator[Extent]:
    """Cut extents into pieces of at most ``max_len`` bytes (a multiple of the chunk)."""
    for off, length in extents:
        end = off + length
        while off < end:
            n = min(max_len, end - off)
            yield off, n
            off += n


def batches(pieces: Iterable[Extent], max_len: int) -> Iterator[list[Extent]]:
    """Group consecutive pieces into batches of at most ``max_len`` bytes, in order.

    A batch is read in one worker-thread call: scattered small chunks then cost one thread
    round trip per ``max_len`` bytes instead of one per chunk. A piece longer than
    ``max_len`` forms a batch of its own.
    """
    batch: list[Extent] = []
    nbytes = 0
    for off, length in pieces:
        if batch and nbytes + length > max_len:
            yield batch
            batch, nbytes = [], 0
        batch.append((off, length))
        nbytes += length
    if batch:
        yield batch


@dataclass(frozen=True)
class Write:
    """Data to write at ``offset``."""

    offset: int
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Zero:
    """A run of all-zero chunks: sent as WRITE_ZEROES, never as data."""

    offset: int
    length: int


Op = Write | Zero


def runs(buf: bytes | memoryview, chunk_size: int) -> Iterator[tuple[int, int, bool]]:
    """Split a buffer into maximal runs of zero / non-zero chunks: (start, end, is_zero)."""
    view = memoryview(buf)
    zero = bytes(chunk_size)
    start = 0
    current: bool | None = None
    for pos in range(0, len(view), chunk_size):
        piece = view[pos : pos + chunk_size]
        is_zero = piece == zero[: len(piece)]
        if current is None:
            current = is_zero
        elif is_zero != current:
            yield start, pos, current
            start, current = pos, is_zero
    if current is not None:
        yield start, len(view), current


def ops_for_buffer(offset: int, buf: bytes, chunk_size: int) -> Iterator[Op]:
    """The requests that make the remote range ``[offset, offset+len(buf))`` equal ``buf``."""
    for start, end, is_zero in runs(buf, chunk_size):
        if is_zero:
            yield Zero(offset + start, end - start)
        elif start == 0 and end == len(buf):
            yield Write(offset, buf)
        else:
            yield Write(offset + start, buf[start:end])


class ZeroMerger:
    """Holds back the last zero run so a touching one can extend it (up to ``max_zero``)."""

    def __init__(self, max_zero: int) -> None:
        self.max_zero = max_zero
        self._held: Zero | None = None

    def push(self, op: Op) -> list[Op]:
        """Feed one op; returns the ops that are final now."""
        held = self._held
        if isinstance(op, Zero):
            if (
                held is not None
                and held.offset + held.length == op.offset
                and held.length + op.length <= self.max_zero
            ):
                self._held = Zero(held.offset, held.length + op.length)
                return []
            self._held = op
            return [held] if held is not None else []
        self._held = None
        return [held, op] if held is not None else [op]

    def flush(self) -> list[Op]:
        held, self._held = self._held, None
        return [held] if held is not None else []
