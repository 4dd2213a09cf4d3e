"""``nbdsink restore``: make a device hold a version, writing only the blocks that differ.

The source is a version in a local store (``VOL@N``, on the backup host) or on an nbdsink
server (``nbds://host/VOL@N``, from anywhere). The plan:

- by default the destination's chunks are hashed (O_DIRECT, blake3) and compared with the
  version's digests (over the network: the digests view, 32 bytes per block), so what
  crosses the wire and what is written is what differs; a restore interrupted and run again
  continues where it was, since what it already wrote now compares equal;
- with ``--assume VOL@M``, the destination is trusted to hold VOL@M plus what the tracker on
  it recorded since its last acknowledgement (the failback after a failover: the original
  device, whose replica was VOL@M): the blocks to write are those whose digests differ
  between VOL@M and the source version (known from the store, nothing of the destination is
  read) and the tracker's dirty blocks.

It refuses a mounted destination, one smaller than the version, and one a running sender is
replicating, each with a clear error. The destination is fsynced at the end.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import mmap
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import trio

from nbdsink import nbd
from nbdsink.contract import DIGEST_SIZE, digests_export
from nbdsink.errors import NbdsinkError, UsageError
from nbdsink.nbd import TLSConfig
from nbdsink.sender.remote import block_size_from_description, with_export
from nbdsink.store import Store, VolumeInfo
from nbdsink.store.diff import candidate_blocks
from nbdsink.store.head import read_into
from nbdsink.store.store import Reading

RANGE = 16 << 20
"""Destination bytes hashed, or blocks planned, per step."""


class RestoreError(NbdsinkError):
    """The restore cannot be done as asked; the message says why."""


@dataclass
class RestorePlan:
    version: str
    block_size: int
    size: int
    blocks: list[int] = field(default_factory=list)
    compared: int = 0
    assumed: str | None = None

    @property
    def bytes(self) -> int:
        return sum(min(self.block_size, self.size - b * self.block_size) for b in self.blocks)

    def to_json(self) -> dict[str, object]:
        return {"version": self.version, "assume": self.assumed, "block_size": self.block_size,
                "blocks_compared": self.compared, "blocks_to_write": len(self.blocks),
                "bytes_to_write": self.bytes}


# -- sources -----------------------------------------------------------------------------------


class Source:
    """A version to restore from: its size, its blocks' digests, its data."""

    name: str
    size: int
    block_size: int

    async def digests(self, first: int, count: int) -> bytes:
        raise NotImplementedError

    async def assumed_digests(self, first: int, count: int) -> bytes:
        raise NotImplementedError

    async def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError


class LocalSource(Source):
    """``VOL@N`` in a store on this host (``--assume`` names a version of the same store)."""

    def __init__(self, store: Store, spec: str, assume: str | None) -> None:
        self.store = store
        self.name = spec
        self.volume, self.version = resolve_version(store, spec)
        self.size = self.volume.size
        self.block_size = self.volume.block_size
        self.assumed = resolve_version(store, assume) if assume else None
        self._candidates: set[int] | None = None
        self._candidates_known = False

    async def digests(self, first: int, count: int) -> bytes:
        return await trio.to_thread.run_sync(self._digests, self.volume, self.version, first, count)

    async def assumed_digests(self, first: int, count: int) -> bytes:
        assert self.assumed is not None
        vol, version = self.assumed
        return await trio.to_thread.run_sync(self._digests, vol, version, first, count)

    def _digests(self, volume: VolumeInfo, version: int, first: int, count: int) -> bytes:
        from nbdsink.server.digests import read_version_digests

        buf = bytearray(count * DIGEST_SIZE)
        read_version_digests(self.store, volume, version, memoryview(buf), first * DIGEST_SIZE)
        return bytes(buf)

    async def changed_blocks(self, first: int, count: int) -> list[int]:
        """With --assume: the blocks whose map digests differ between the assumed version and
        the source version, from the store's maps alone (no chunk is read). Where the
        change lists tell which blocks may differ (the same volume, or a clone against its
        base), only those are compared; else every block's digests are."""
        assert self.assumed is not None
        vol, version = self.assumed
        if not self._candidates_known:
            self._candidates = await trio.to_thread.run_sync(self.store.read, lambda r: (
                candidate_blocks(self.store, r, self.volume, self.version, vol, version)))
            self._candidates_known = True
        candidates = self._candidates
        end = first + count

        def compare(r: Reading) -> list[int]:
            if candidates is not None:
                return [b for b in sorted(b for b in candidates if first <= b < end)
                        if self.store.block_digests(r, self.volume, self.version, b, 1)
                        != self.store.block_digests(r, vol, version, b, 1)]
            mine = self.store.block_digests(r, self.volume, self.version, first, count)
            theirs = self.store.block_digests(r, vol, version, first, count)
            return [first + i for i, (a, b) in enumerate(zip(mine, theirs, strict=True)) if a != b]
        return await trio.to_thread.run_sync(self.store.read, compare)

    async def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        await trio.to_thread.run_sync(functools.partial(
            read_into, self.store, self.volume, self.version, memoryview(buf), offset))
        return bytes(buf)


def resolve_version(store: Store, spec: str) -> tuple[VolumeInfo, int]:
    """The volume and version number ``VOL@N`` or ``VOL@latest`` names in ``store``."""
    name, sep, selector = spec.rpartition("@")
    if not sep or not name:
        raise UsageError(f"expected VOLUME@N or VOLUME@latest, not {spec!r}")
    volume = store.volume(name)
    if selector == "latest":
        version = store.latest_version(volume)
        if not version:
            raise RestoreError(f"volume {name!r} has no committed version")
    elif selector.isascii() and selector.isdigit():
        version = int(selector)
        store.version(volume, version)
    else:
        raise UsageError(f"expected VOLUME@N or VOLUME@latest, not {spec!r}")
    return volume, version


class RemoteSource(Source):
    """``nbd[s]://host/VOL@N``: data and digests over NBD from an nbdsink server."""

    def __init__(self, uri: str, tls: TLSConfig | None, assume: str | None) -> None:
        self.uri = uri
        self.tls = tls
        export = nbd.parse_uri(uri).export
        if "@" not in export:
            raise UsageError(f"{uri!r} must name a version (VOL@N or VOL@latest)")
        self.name = export
        self.assume = assume
        self._conns: dict[str, nbd.Connection] = {}

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[RemoteSource]:
        async with contextlib.AsyncExitStack() as stack:
            data = await stack.enter_async_context(nbd.connect(self.uri, self.tls))
            self._conns["data"] = data
            self.size = data.size
            volume, _, selector = self.name.partition("@")
            head = await stack.enter_async_context(
                nbd.connect(with_export(self.uri, volume), self.tls))
            self.block_size = block_size_from_description(head.description) or head.block_size[1]
            try:
                self._conns["digests"] = await stack.enter_async_context(
                    nbd.connect(with_export(self.uri, digests_export(volume, selector)), self.tls))
                if self.assume:
                    vol, _, sel = self.assume.partition("@")
                    self._conns["assumed"] = await stack.enter_async_context(
                        nbd.connect(with_export(self.uri, digests_export(vol, sel)), self.tls))
            except nbd.NBDOptionError as exc:
                raise RestoreError(f"the server gives no digests ({exc}): restore needs an "
                                   "nbdsink server") from exc
            yield self

    async def _read_digests(self, which: str, first: int, count: int) -> bytes:
        conn = self._conns[which]
        return bytes(await conn.pread(count * DIGEST_SIZE, first * DIGEST_SIZE))

    async def digests(self, first: int, count: int) -> bytes:
        return await self._read_digests("digests", first, count)

    async def assumed_digests(self, first: int, count: int) -> bytes:
        return await self._read_digests("assumed", first, count)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(await self._conns["data"].pread(length, offset))


# -- the destination ---------------------------------------------------------------------------


class Destination:
    """The device (or image file) to restore into, opened for O_DIRECT reads and writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            st = os.stat(path)
        except OSError as exc:
            raise RestoreError(f"cannot open {path}: {exc.strerror}") from exc
        self.is_block = stat.S_ISBLK(st.st_mode)
        self.rdev = st.st_rdev if self.is_block else None
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if self.is_block else 0)
        try:
            self.fd = os.open(path, flags | (os.O_EXCL if self.is_block else 0))
        except OSError as exc:
            raise RestoreError(f"cannot open {path} for writing: {exc.strerror}"
                               + (" (mounted or in use?)" if exc.errno == 16 else "")) from exc
        if self.is_block:
            buf = bytearray(8)
            fcntl.ioctl(self.fd, 0x80081272, buf)  # BLKGETSIZE64
            self.size = int.from_bytes(buf, "little")
        else:
            self.size = st.st_size
        self._buf = mmap.mmap(-1, RANGE)
        self.bytes_written = 0

    def read(self, offset: int, length: int) -> bytes:
        view = memoryview(self._buf)[:length]
        try:
            n = os.preadv(self.fd, [view], offset)
            return bytes(view[:n])
        finally:
            view.release()

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(self._buf)[: len(data)]
        try:
            view[:] = data
            done = 0
            while done < len(data):
                done += os.pwritev(self.fd, [view[done:]], offset + done)
        finally:
            view.release()
        self.bytes_written += len(data)

    def close(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self._buf.close()


def check_destination(dest: Destination, size: int) -> None:
    """Refuse a destination smaller than the version, mounted, or being replicated."""
    if dest.size < size:
        raise RestoreError(f"{dest.path} is {dest.size} bytes, the version is {size}: too small")
    if dest.rdev is None:
        return
    major, minor = os.major(dest.rdev), os.minor(dest.rdev)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == f"{major}:{minor}":
                raise RestoreError(f"{dest.path} is mounted at {fields[4]}: unmount it first")
    name = Path(f"/sys/dev/block/{major}:{minor}").resolve().name
    for holder in Path(f"/sys/class/block/{name}/holders").glob("*"):
        raise RestoreError(f"{dest.path} is in use by {holder.name} (device-mapper or md)")
    for consumer in _running_senders(dest.path):
        raise RestoreError(f"{dest.path} is being replicated by a running sender (state "
                           f"{consumer}): stop it first")


def _running_senders(device: str) -> list[str]:
    from nbdsink.tracker import TrackerError, registry
    from nbdsink.tracker.consumers import consumer_records

    try:
        tracker = registry.open_tracker(device, consumer=None)
    except TrackerError:
        return []
    try:
        names = list(consumer_records(tracker))
    finally:
        tracker.close()
    running = []
    for name in names:
        lock = Path(name) / "lock"
        if not lock.exists():
            continue
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            running.append(name)
        finally:
            os.close(fd)
    return running


def tracked_dirty_blocks(device: str, block_size: int) -> set[int]:
    """Blocks the tracker of ``device`` holds as written since some consumer's last
    acknowledgement (nothing is acknowledged: the next cycle still sends them)."""
    from nbdsink.tracker import TrackerError, registry
    from nbdsink.tracker.consumers import ConsumerTracker, consumer_records

    try:
        tracker = registry.open_tracker(device, consumer=None)
    except TrackerError:
        return set()
    out: set[int] = set()
    try:
        consumers: list[str | None] = list(consumer_records(tracker))
        for name in consumers or [None]:
            view = tracker if name is None else ConsumerTracker(tracker, name)
            ds = view.checkpoint()
            for off, length in ds.extents:
                out.update(range(off // block_size, -(-(off + length) // block_size)))
    finally:
        tracker.close()
    return out


# -- planning and writing ----------------------------------------------------------------------


Progress = Callable[[str, int, int], None]


async def plan(source: Source, dest: Destination, assume: str | None,
               progress: Progress | None = None) -> RestorePlan:
    bs = source.block_size
    blocks = -(-source.size // bs)
    result = RestorePlan(source.name, bs, source.size, assumed=assume)
    step = max(1, RANGE // bs)
    dirty = (await trio.to_thread.run_sync(tracked_dirty_blocks, dest.path, bs)
             if assume and dest.is_block else set())
    for first in range(0, blocks, step):
        count = min(step, blocks - first)
        if assume:
            if isinstance(source, LocalSource):
                differ = await source.changed_blocks(first, count)
            else:
                theirs, before = (await source.digests(first, count),
                                  await source.assumed_digests(first, count))
                differ = [first + i for i in range(count)
                          if theirs[i * 32 : (i + 1) * 32] != before[i * 32 : (i + 1) * 32]]
            result.blocks.extend(sorted(set(differ) | {b for b in dirty if first <= b < first + count}))
        else:
            theirs = await source.digests(first, count)
            length = min(count * bs, source.size - first * bs)
            mine = await trio.to_thread.run_sync(dest.read, first * bs, length)
            for i in range(count):
                piece = mine[i * bs : (i + 1) * bs]
                if blake3.blake3(piece).digest() != theirs[i * 32 : (i + 1) * 32]:
                    result.blocks.append(first + i)
        result.compared += count
        if progress is not None:
            progress("compare", result.compared, blocks)
    return result


async def execute(source: Source, dest: Destination, restore_plan: RestorePlan,
                  progress: Progress | None = None) -> int:
    """Write the planned blocks (runs of them at once); returns the bytes written."""
    bs = restore_plan.block_size
    runs: list[tuple[int, int]] = []
    for b in restore_plan.blocks:
        if runs and runs[-1][0] + runs[-1][1] == b and runs[-1][1] * bs < RANGE:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    done = 0
    for first, n in runs:
        offset = first * bs
        length = min(n * bs, restore_plan.size - offset)
        data = await source.read(offset, length)
        await trio.to_thread.run_sync(dest.write, offset, data)
        done += n
        if progress is not None:
            progress("write", done, len(restore_plan.blocks))
    return dest.bytes_written
