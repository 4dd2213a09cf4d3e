"""In-process implementations of the cycle's interfaces, for testing the algorithm itself.

They are real implementations, not canned answers: :class:`FileTracker` records the writes
the test makes to a device file, generation by generation, as the tracker contract says;
:class:`MemoryRemote` keeps a head and committed versions of a volume in memory, like the
server does, and can be told to fail after some requests (a connection cut).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from nbdsink.sender.plan import Extent
from nbdsink.tracker.base import DirtySet, Tracker, TrackerStatus, merge_chunks


class FileTracker(Tracker):
    """Tracks writes made through :meth:`write` to a regular file standing in for a device."""

    backend = "test"

    def __init__(self, path: str, chunk_size: int) -> None:
        self.device = path
        self.chunk_size = chunk_size
        self.size = os.path.getsize(path)
        self.device_size = self.size
        self.generation = 1
        self.acked = 0
        self.dirty: dict[int, set[int]] = {1: set()}
        # checkpoint() runs in a worker thread while the test's writer keeps writing: a
        # write and its marking are atomic with respect to closing a generation.
        self.lock = threading.Lock()

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self._write(offset, data)

    def _write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.device, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        first, last = offset // self.chunk_size, (offset + len(data) - 1) // self.chunk_size
        self.dirty[self.generation].update(range(first, last + 1))

    def tracking_id(self) -> str:
        return f"test:{id(self)}"

    def checkpoint(self) -> DirtySet:
        with self.lock:
            return self._checkpoint()

    def _checkpoint(self) -> DirtySet:
        gen = self.generation
        self.generation += 1
        self.dirty[self.generation] = set()
        chunks = sorted(set().union(*(s for g, s in self.dirty.items() if self.acked < g <= gen)))
        return DirtySet(gen, self.chunk_size, merge_chunks(chunks, self.chunk_size, self.size))

    def acknowledge(self, generation: int) -> None:
        with self.lock:
            self._acknowledge(generation)

    def _acknowledge(self, generation: int) -> None:
        self.acked = max(self.acked, generation)
        for g in [g for g in self.dirty if g <= self.acked]:
            del self.dirty[g]

    def status(self) -> TrackerStatus:
        n = len(set().union(*self.dirty.values()))
        return TrackerStatus(self.device, self.backend, self.chunk_size, self.generation,
                             n * self.chunk_size)

    def stop(self) -> None:
        pass


class ConnectionCut(Exception):
    pass


@dataclass
class Version:
    number: int
    consistency: str
    labels: dict[str, str]
    image: bytes


@dataclass
class MemoryRemote:
    """A volume: a writable head over the committed versions."""

    size: int
    chunk_size: int
    head: bytearray = field(init=False)
    versions: list[Version] = field(default_factory=list)
    fail_after: int | None = None
    requests: int = 0
    written: int = 0

    def __post_init__(self) -> None:
        self.head = bytearray(self.size)

    def restart(self) -> None:
        """A server restart: uncommitted head writes are gone, versions stay."""
        self.head = bytearray(self.versions[-1].image if self.versions else bytes(self.size))
        self.fail_after = None

    def _request(self) -> None:
        if self.fail_after is not None and self.requests >= self.fail_after:
            raise ConnectionCut("connection reset by peer")
        self.requests += 1

    async def pwrite(self, data: bytes, offset: int) -> None:
        await trio.sleep(0)
        self._request()
        self.head[offset : offset + len(data)] = data
        self.written += len(data)

    async def zero(self, length: int, offset: int) -> None:
        await trio.sleep(0)
        self._request()
        self.head[offset : offset + length] = bytes(length)

    async def pread(self, length: int, offset: int) -> bytes:
        self._request()
        return bytes(self.head[offset : offset + length])

    async def chunk_digests(self, offset: int, length: int) -> bytes | None:
        return None  # like a server without the digests view: the data are compared

    async def zero_extents(self) -> list[Extent]:
        cs, zero = self.chunk_size, bytes(self.chunk_size)
        out: list[Extent] = []
        for off in range(0, self.size, cs):
            if self.head[off : off + cs] == zero[: min(cs, self.size - off)]:
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1] = (out[-1][0], out[-1][1] + min(cs, self.size - off))
                else:
                    out.append((off, min(cs, self.size - off)))
        return out

    async def commit(self, consistency: str, labels: Mapping[str, str]) -> int | None:
        self._request()
        image = bytes(self.head)
        if self.versions and self.versions[-1].image == image:
            return None
        self.versions.append(Version(len(self.versions) + 1, consistency, dict(labels), image))
        return len(self.versions)
