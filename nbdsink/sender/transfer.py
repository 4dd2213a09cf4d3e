"""Moving chunks from the device to the remote: read, classify, a window of requests in flight.

The extents are cut into pieces of at most ``max_request`` bytes and the pieces grouped
into *batches* of at most ``max_request`` bytes (a large extent is one piece per batch; up
to ``max_request / chunk_size`` scattered dirty chunks share one). Each batch is read in a
single worker-thread call (O_DIRECT, under a :class:`trio.CapacityLimiter` of
``read_threads``), and up to ``read_threads`` batches are read at once, ahead of the one
being turned into requests, so the device's latency overlaps itself and the sending. The
producer takes the batches in device order, splits each piece into zero and data runs, and
puts the requests on a bounded channel; ``window`` writer tasks take them off and issue
them concurrently on the NBD connection. The read-ahead, the channel bound and the window
bound the memory in use (about ``(2 * window + read_threads + 2) * max_request`` bytes)
whatever the size of the work.

In *compare* mode (the first sync against a remote that may already hold data, or a resync
after the tracker lost track) each piece is compared with the remote first: chunks the
remote already holds (equal blake3 digests, or zero on both sides) are not sent. An nbdsink
server gives the digests (:mod:`nbdsink.contract`), so only they cross the network; with
another server the data are read and hashed here.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import blake3
import trio

from nbdsink.sender.device import Device
from nbdsink.sender.groups import open_nursery
from nbdsink.sender.plan import (
    Extent,
    Op,
    Write,
    Zero,
    ZeroMerger,
    batches,
    ops_for_buffer,
    split,
)
from nbdsink.sender.progress import Progress
from nbdsink.sender.ratelimit import RateLimiter

log = logging.getLogger(__name__)

# A request header costs about this much on the wire; WRITE_ZEROES is charged only that.
REQUEST_OVERHEAD = 28


class Sink(Protocol):
    """Where requests go: the remote head (or anything with the same two calls)."""

    async def pwrite(self, data: bytes, offset: int) -> None: ...

    async def zero(self, length: int, offset: int) -> None: ...


class RemoteView(Protocol):
    """What compare mode needs to know about the remote's current content."""

    async def zero_extents(self) -> list[Extent]:
        """Every range the remote reports as reading zeros (holes or zero extents)."""
        ...

    async def pread(self, length: int, offset: int) -> bytes: ...

    async def chunk_digests(self, offset: int, length: int) -> bytes | None:
        """blake3 of each chunk of ``[offset, offset+length)`` as the remote holds it (a
        damaged chunk never matches), or None when the remote cannot tell: then its data are
        read and hashed here."""
        ...


Note = Callable[[int, bytes | None, int], None]
"""``note(offset, data, length)``: the remote now holds ``data`` (None: zeros) at ``offset``.

Called for every range a transfer made (or found) equal on the remote; the scan tracker
uses it to learn the digests of what was sent.
"""


@dataclass
class TransferStats:
    """What one transfer did."""

    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    requests: int = 0

    def add(self, other: TransferStats) -> None:
        self.bytes_written += other.bytes_written
        self.bytes_zeroed += other.bytes_zeroed
        self.bytes_skipped += other.bytes_skipped
        self.requests += other.requests


@dataclass
class TransferConfig:
    chunk_size: int
    max_request: int = 4 << 20
    """Largest WRITE; a multiple of the chunk size, within the remote's maximum."""
    max_zero: int = 1 << 30
    window: int = 8
    """Requests in flight at once."""
    read_threads: int = 2
    """Batches of device reads in flight at once."""


class ZeroMap:
    """The remote's zero ranges, for O(log n) "is this range all zero remotely?" questions."""

    def __init__(self, extents: Sequence[Extent]) -> None:
        self._starts = [o for o, _ in extents]
        self._ends = [o + n for o, n in extents]

    def covers(self, offset: int, length: int) -> bool:
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and self._ends[i] >= offset + length


class Transfer:
    """Sends extents of a device to a sink; see the module docstring."""

    def __init__(
        self,
        device: Device,
        sink: Sink,
        config: TransferConfig,
        *,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.device = device
        self.sink = sink
        self.config = config
        self.limiter = limiter or RateLimiter(0)
        self._read_limiter = trio.CapacityLimiter(config.read_threads)

    async def read_batch(self, pieces: Sequence[Extent]) -> list[bytes]:
        """The device's content at each of ``pieces``, read in one worker-thread call."""
        return await trio.to_thread.run_sync(
            self.device.pread_many, pieces, limiter=self._read_limiter
        )

    # -- producing requests -------------------------------------------------------------

    async def produce(
        self,
        extents: Iterable[Extent],
        out: trio.MemorySendChannel[Op],
        *,
        remote: RemoteView | None = None,
        on_skip: Callable[[int], None] | None = None,
        stats: TransferStats | None = None,
        note: Note | None = None,
    ) -> None:
        """Put on ``out`` the requests that make the remote equal the device over ``extents``.

        The requests come in device order; ``out`` is closed at the end.
        """
        async with out:
            await self._produce(extents, out, remote, on_skip, stats, note)

    async def _produce(
        self,
        extents: Iterable[Extent],
        out: trio.MemorySendChannel[Op],
        remote: RemoteView | None,
        on_skip: Callable[[int], None] | None,
        stats: TransferStats | None,
        note: Note | None,
    ) -> None:
        cs = self.config.chunk_size
        merger = ZeroMerger(self.config.max_zero)
        zeros = ZeroMap(await remote.zero_extents()) if remote is not None else None
        # The channel holds batches whose reads were started, in order: one being waited
        # for here, ``read_threads - 1`` queued, one more held by the reader that started
        # it. That keeps ``read_threads`` reads busy without reading further ahead.
        ahead_send, ahead_recv = trio.open_memory_channel[_Batch](
            max(0, self.config.read_threads - 1)
        )
        async with open_nursery() as nursery:
            nursery.start_soon(self._read_ahead, extents, ahead_send, nursery)
            async with ahead_recv:
                async for batch in ahead_recv:
                    await batch.done.wait()
                    data, batch.data = batch.data, []
                    for (off, _), buf in zip(batch.pieces, data, strict=True):
                        if remote is None or zeros is None:
                            produced = list(ops_for_buffer(off, buf, cs))
                        else:
                            produced, skipped = await self._compare(off, buf, remote, zeros, note)
                            if skipped:
                                if stats is not None:
                                    stats.bytes_skipped += skipped
                                if on_skip is not None:
                                    on_skip(skipped)
                        for op in produced:
                            for ready in merger.push(op):
                                await out.send(ready)
            for ready in merger.flush():
                await out.send(ready)

    async def _read_ahead(
        self,
        extents: Iterable[Extent],
        ahead: trio.MemorySendChannel[_Batch],
        nursery: trio.Nursery,
    ) -> None:
        """Start reading each batch of ``extents`` and queue it, in order, on ``ahead``."""
        max_request = self.config.max_request
        async with ahead:
            for pieces in batches(split(extents, max_request), max_request):
                batch = _Batch(pieces)
                nursery.start_soon(self._read_into, batch)
                await ahead.send(batch)

    async def _read_into(self, batch: _Batch) -> None:
        batch.data = await self.read_batch(batch.pieces)
        batch.done.set()

    async def _compare(
        self, off: int, buf: bytes, remote: RemoteView, zeros: ZeroMap, note: Note | None
    ) -> tuple[list[Op], int]:
        """Requests for the chunks of ``buf`` the remote does not already hold; bytes skipped."""
        cs = self.config.chunk_size
        if zeros.covers(off, len(buf)):
            # The remote reads zeros here: only local data needs sending.
            writes: list[Op] = []
            for op in ops_for_buffer(off, buf, cs):
                if isinstance(op, Write):
                    writes.append(op)
                elif note is not None:
                    note(op.offset, None, op.length)
            return writes, len(buf) - sum(op.length for op in writes)
        digests = await remote.chunk_digests(off, len(buf))
        if digests is None:
            theirs = await remote.pread(len(buf), off)
            digests = b"".join(blake3.blake3(theirs[p : p + cs]).digest()
                               for p in range(0, len(buf), cs))
        out: list[Op] = []
        skipped = 0
        run_start: int | None = None

        def close_run(end: int) -> None:
            nonlocal run_start
            if run_start is not None:
                out.extend(ops_for_buffer(off + run_start, buf[run_start:end], cs))
                run_start = None

        for i, pos in enumerate(range(0, len(buf), cs)):
            mine_chunk = buf[pos : pos + cs]
            if blake3.blake3(mine_chunk).digest() == digests[i * 32 : (i + 1) * 32]:
                close_run(pos)
                skipped += len(mine_chunk)
                if note is not None:
                    note(off + pos, mine_chunk, len(mine_chunk))
            elif run_start is None:
                run_start = pos
        close_run(len(buf))
        return out, skipped

    # -- sending requests ----------------------------------------------------------------

    async def send(
        self,
        extents: Iterable[Extent],
        *,
        remote: RemoteView | None = None,
        progress: Progress | None = None,
        note: Note | None = None,
    ) -> TransferStats:
        """Stream ``extents`` to the sink with ``window`` requests in flight."""
        stats = TransferStats()
        on_skip = progress.advance if progress is not None else None
        send_ch, recv_ch = trio.open_memory_channel[Op](self.config.window)
        async with open_nursery() as nursery:
            for _ in range(self.config.window):
                nursery.start_soon(self._writer, recv_ch.clone(), stats, progress, note)
            await recv_ch.aclose()
            await self.produce(
                extents, send_ch, remote=remote, on_skip=on_skip, stats=stats, note=note
            )
        return stats

    async def push(
        self, ops: Sequence[Op], *, progress: Progress | None = None, note: Note | None = None
    ) -> TransferStats:
        """Send requests already in memory (the remainder read during a freeze)."""
        stats = TransferStats()
        send_ch, recv_ch = trio.open_memory_channel[Op](self.config.window)
        async with open_nursery() as nursery:
            for _ in range(self.config.window):
                nursery.start_soon(self._writer, recv_ch.clone(), stats, progress, note)
            await recv_ch.aclose()
            async with send_ch:
                for op in ops:
                    await send_ch.send(op)
        return stats

    async def _writer(
        self,
        recv_ch: trio.MemoryReceiveChannel[Op],
        stats: TransferStats,
        progress: Progress | None,
        note: Note | None,
    ) -> None:
        async with recv_ch:
            async for op in recv_ch:
                if isinstance(op, Write):
                    await self.limiter.acquire(op.length + REQUEST_OVERHEAD)
                    await self.sink.pwrite(op.data, op.offset)
                    stats.bytes_written += op.length
                    if note is not None:
                        note(op.offset, op.data, op.length)
                else:
                    await self.limiter.acquire(REQUEST_OVERHEAD)
                    await self.sink.zero(op.length, op.offset)
                    stats.bytes_zeroed += op.length
                    if note is not None:
                        note(op.offset, None, op.length)
                stats.requests += 1
                if progress is not None:
                    progress.advance(op.length)


class _Batch:
    """Pieces being read together; ``data`` holds their contents once ``done`` is set."""

    def __init__(self, pieces: list[Extent]) -> None:
        self.pieces = pieces
        self.data: list[bytes] = []
        self.done = trio.Event()


async def collect(transfer: Transfer, extents: Iterable[Extent]) -> list[Op]:
    """Read ``extents`` into memory as requests (used while a filesystem is frozen)."""
    ops: list[Op] = []
    send_ch, recv_ch = trio.open_memory_channel[Op](transfer.config.window)
    async with open_nursery() as nursery:
        nursery.start_soon(transfer.produce, extents, send_ch)
        async with recv_ch:
            async for op in recv_ch:
                ops.append(op)
    return ops


__all__ = [
    "Note",
    "RemoteView",
    "Sink",
    "Transfer",
    "TransferConfig",
    "TransferStats",
    "Write",
    "Zero",
    "collect",
]
