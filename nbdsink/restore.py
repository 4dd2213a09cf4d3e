"""``nbdsink restore``: make a device hold a version, writing only the blocks that differ.

The source is a version in a local store (``VOL@N``, on the backup host: :class:`LocalSource`)
or on an nbdsink server (``nbds://host/VOL@N``, from anywhere:
:mod:`nbdsink.restore_remote`). The plan:

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

:func:`plan` and :func:`execute` are coroutines, written once for both kinds of source: a
remote source's awaits wait for the network (under trio, with the destination's I/O in worker
threads), while a local source never suspends, so :func:`drive` runs them to the end in one
thread: no event loop, no hand-off to a thread per step, trio is not imported (the command
does it in a thread of its own, :func:`run_local`, so that ^C stops it between two steps).
A local source's writing is done by :data:`LOCAL_WORKERS` threads, each reading a run of
blocks from the store (in turns) and writing it (at once, so that a destination opened
O_DIRECT has several writes to work on).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import functools
import mmap
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import blake3

from nbdsink.contract import DIGEST_SIZE
from nbdsink.errors import NbdsinkError, UsageError

if TYPE_CHECKING:
    from nbdsink.store import Store, VolumeInfo
    from nbdsink.store.store import Reading

RANGE = 16 << 20
"""Destination bytes hashed, or blocks planned, per step; the most written at once."""

LOCAL_RUN = 1 << 20
"""The most a local restore reads and writes at once (at least a block): small enough that a
long run of blocks to write is read by every worker, not by one."""

LOCAL_WORKERS = 4
"""Runs of blocks a local restore reads from the store and writes at once. They take turns
reading (Python work under the GIL: threads reading at once trade the GIL at every LMDB
call), and write at once (a destination opened O_DIRECT takes each write synchronously).
Measured, 655 chunks of 64 KiB written to a 4 GiB destination: to an image file, 0.023 s
with 1 worker, 0.03 s with 4, 0.054 s with 32 (and 0.058, 0.068, 0.088 s from a store not in
the page cache); to a loop device with direct I/O, 0.10 s with 1, 0.05-0.07 s with 2 or 4,
0.08-0.09 s with 8 or 32."""

Span = tuple[int, int]
"""(offset, length) of the version, to be written to the destination at the same offset."""

P = ParamSpec("P")
T = TypeVar("T")


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
    run_bytes = RANGE
    """The most :meth:`copy` is given in one span."""

    async def digests(self, first: int, count: int) -> bytes:
        """The version's digests of blocks first..first+count-1, 32 bytes each."""
        raise NotImplementedError

    async def changed_blocks(self, first: int, count: int) -> list[int]:
        """With --assume: the blocks of first..first+count-1 (in order) whose digests differ
        between the assumed version and this one."""
        raise NotImplementedError

    async def recorded_digests(self, first: int, count: int) -> bytes:
        """Like :meth:`digests` for whole blocks, where the source can tell them without
        reading the blocks' data (a local store's map records them)."""
        return await self.digests(first, count)

    async def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the version's bytes from ``offset`` (a block boundary)."""
        raise NotImplementedError

    async def blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn``, which blocks (on the destination: hashing, writing). Here, in the
        calling thread: only a source that waits for the network has other work meanwhile."""
        return fn(*args, **kwargs)

    async def copy(self, dest: Destination, spans: Sequence[Span],
                   finished: Callable[[Span], None]) -> None:
        """Write each span of the version to ``dest``, calling ``finished`` (in the calling
        thread) with each once it is written. Here one span after the other."""
        for offset, length in spans:
            with dest.buffer(length) as view:
                await self.read_into(view, offset)
                await self.blocking(dest.write, view, offset)
            finished((offset, length))


class LocalSource(Source):
    """``VOL@N`` in a store on this host (``--assume`` names a version of the same store).

    Nothing here suspends: the store is read in the calling thread (see :func:`drive`), and
    by worker threads while :meth:`copy` waits for them. Once :attr:`stopping` is set, the
    next step raises KeyboardInterrupt.
    """

    run_bytes = LOCAL_RUN

    def __init__(self, store: Store, spec: str, assume: str | None) -> None:
        self.store = store
        self.name = spec
        self.volume, self.version = resolve_version(store, spec)
        self.size = self.volume.size
        self.block_size = self.volume.block_size
        self.assumed = resolve_version(store, assume) if assume else None
        self.stopping = threading.Event()

    def _proceed(self) -> None:
        if self.stopping.is_set():
            raise KeyboardInterrupt

    async def digests(self, first: int, count: int) -> bytes:
        self._proceed()
        # The digests view's reader checks every chunk it reads against its digest, as a
        # server does for a remote restore.
        from nbdsink.server.digests import read_version_digests

        buf = bytearray(count * DIGEST_SIZE)
        read_version_digests(self.store, self.volume, self.version, memoryview(buf),
                             first * DIGEST_SIZE)
        return bytes(buf)

    async def recorded_digests(self, first: int, count: int) -> bytes:
        self._proceed()
        store, zero = self.store, blake3.blake3(bytes(self.block_size)).digest()
        found = store.read(lambda r: store.block_digests(r, self.volume, self.version, first,
                                                         count))
        return b"".join(zero if d is None else d for d in found)

    @functools.cached_property
    def _candidates(self) -> list[int] | None:
        """With --assume: the blocks the change lists say may differ, sorted (None: the
        lists cannot tell, every block is compared)."""
        from nbdsink.store.diff import candidate_blocks

        assert self.assumed is not None
        store, (theirs, version) = self.store, self.assumed
        found = store.read(lambda r: candidate_blocks(store, r, self.volume, self.version,
                                                      theirs, version))
        return None if found is None else sorted(found)

    async def changed_blocks(self, first: int, count: int) -> list[int]:
        """From the store's maps alone (no chunk is read). Where the change lists tell which
        blocks may differ (the same volume, or a clone against its base), only those are
        compared; else every block's digests are."""
        self._proceed()
        assert self.assumed is not None
        theirs, version = self.assumed
        mine = self.volume, self.version
        store = self.store
        candidates = self._candidates
        if candidates is None:
            def compare_all(r: Reading) -> list[int]:
                now = store.block_digests(r, *mine, first, count)
                then = store.block_digests(r, theirs, version, first, count)
                return [first + i for i, (a, b) in enumerate(zip(now, then, strict=True))
                        if a != b]
            return store.read(compare_all)
        # Sorted once: each step takes its slice (a volume of millions of blocks has as
        # many steps, and as many candidates).
        todo = candidates[bisect.bisect_left(candidates, first):
                          bisect.bisect_left(candidates, first + count)]
        if not todo:
            return []

        def compare(r: Reading) -> list[int]:
            return [b for b in todo if store.block_digests(r, *mine, b, 1)
                    != store.block_digests(r, theirs, version, b, 1)]
        return store.read(compare)

    async def read_into(self, buf: memoryview, offset: int) -> None:
        self._proceed()
        self._fill(buf, offset)

    async def blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        self._proceed()
        return fn(*args, **kwargs)

    async def copy(self, dest: Destination, spans: Sequence[Span],
                   finished: Callable[[Span], None]) -> None:
        """Spans read and written by :data:`LOCAL_WORKERS` threads, each taking the
        next span when done with one (into a buffer of its own). This thread only waits,
        and reports what was written every so often: handing each span to a worker and back
        cost more than reading it from memory."""
        todo = iter(spans)
        taking = threading.Lock()
        reading = threading.Lock()  # see LOCAL_WORKERS
        stop = threading.Event()
        written: deque[Span] = deque()  # appended by workers, taken by this thread
        failures: list[BaseException] = []

        most = max((length for _, length in spans), default=0)

        def work() -> None:
            # Page-aligned, as O_DIRECT needs, and the worker's own for every span (a new
            # one each time faults its pages in again: measured, three times as long).
            buf = mmap.mmap(-1, most)
            try:
                while not stop.is_set() and not self.stopping.is_set():
                    with taking:
                        span = next(todo, None)
                    if span is None:
                        return
                    offset, length = span
                    with memoryview(buf)[:length] as view:
                        with reading:
                            self._fill(view, offset)
                        dest.write(view, offset)
                    written.append(span)
            except BaseException as exc:
                failures.append(exc)
                stop.set()

        workers = [threading.Thread(target=work, name="nbdsink-restore", daemon=True)
                   for _ in range(min(LOCAL_WORKERS, len(spans)))]
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                while worker.is_alive():
                    worker.join(0.25)
                    while written:
                        finished(written.popleft())
        finally:
            # An error (or ^C): no worker starts another span; those writing one end it.
            stop.set()
            for worker in workers:
                worker.join()
        if failures:
            raise failures[0]
        while written:
            finished(written.popleft())
        self._proceed()

    def _fill(self, buf: memoryview, offset: int) -> None:
        """Whole blocks from the version's map, each chunk checked as every read checks it.

        Not nbdsink.store.head.read_into, which brings the server's metrics
        (prometheus_client) into every restore's start-up, for a head's unsaved writes that
        a version has none of."""
        store, volume, version = self.store, self.volume, self.version
        bs = volume.block_size
        first = offset // bs

        def fill(r: Reading) -> None:
            count = -(-len(buf) // bs)
            store.copy_blocks(r, store.block_digests(r, volume, version, first, count),
                              buf, 0, bs)

        store.read(fill)


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


def drive(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` (:func:`plan` or :func:`execute` of a :class:`LocalSource`, which never
    suspends) to its end in this thread."""
    try:
        work.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    work.close()
    raise RuntimeError("a local restore waited for something: only a remote source may")


def run_local(work: Coroutine[Any, Any, T], source: LocalSource) -> T:
    """:func:`drive` ``work`` in a thread of its own while this one waits.

    Python raises KeyboardInterrupt (^C) in the main thread, at whatever line it is on: in
    the store's code, that could leave a read half-ended and the store unable to close (a
    hang). Here it lands in the wait; the restore then stops at its next step (nothing
    started or half-written, DEST fsynced) and the KeyboardInterrupt goes on from here.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []
    # An Event, not Thread.join: Python 3.11's join, once interrupted, takes the thread for
    # ended (it releases the thread's own lock), and a second join returns at once.
    ended = threading.Event()

    def run() -> None:
        try:
            outcome.append(drive(work))
        except BaseException as exc:
            failure.append(exc)
        finally:
            ended.set()

    # Not a daemon: should this thread be left by a second ^C, Python still waits for it
    # (and its fsync of DEST) before it exits.
    threading.Thread(target=run, name="nbdsink-restore").start()
    try:
        ended.wait()
    except KeyboardInterrupt:
        source.stopping.set()
        ended.wait()
        raise
    if failure:
        raise failure[0]
    return outcome[0]


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
        # Page-aligned, as O_DIRECT needs; sources read straight into it (no copies).
        self._buf = mmap.mmap(-1, RANGE)
        self.bytes_written = 0
        self._count = threading.Lock()

    @contextlib.contextmanager
    def buffer(self, length: int) -> Iterator[memoryview]:
        """The first ``length`` bytes of the I/O buffer, for the span of the ``with``."""
        view = memoryview(self._buf)[:length]
        try:
            yield view
        finally:
            view.release()

    def read(self, offset: int, length: int) -> int:
        """Read into the buffer; returns how much was read."""
        with self.buffer(length) as view:
            return os.preadv(self.fd, [view], offset)

    def write(self, data: memoryview, offset: int) -> None:
        """Write ``data`` (page-aligned: a view of :meth:`buffer`, or of an mmap) at
        ``offset``. Several threads may write at once."""
        done = 0
        while done < len(data):
            done += os.pwritev(self.fd, [data[done:]], offset + done)
        with self._count:
            self.bytes_written += len(data)

    def close(self) -> None:
        """Make everything written durable (the restore has not succeeded before), close."""
        os.fsync(self.fd)
        os.close(self.fd)
        # A view of the buffer still alive (held by the traceback of an error on its way
        # out) keeps the mapping until it goes; that error is the one to report.
        with contextlib.suppress(BufferError):
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


def tracked_dirty_blocks(device: str, block_size: int) -> set[int] | None:
    """Blocks the tracker of ``device`` holds as written since some consumer's last
    acknowledgement (nothing is acknowledged: the next cycle still sends them); None when
    no tracker tracks ``device``."""
    from nbdsink.tracker import TrackerError, registry
    from nbdsink.tracker.consumers import ConsumerTracker, consumer_records

    try:
        tracker = registry.open_tracker(device, consumer=None)
    except TrackerError:
        return None
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


SPOT_CHECKS = 16
"""With --assume: how many places of the destination are read to check the assumption."""
SPOT_BLOCKS = 4
"""Consecutive blocks read at each place (one digests request and one read per place)."""


async def check_assumption(source: Source, dest: Destination, assume: str,
                           planned: list[int]) -> None:
    """Raise :class:`RestoreError` unless the destination holds the version's blocks where
    nothing is to be written, at :data:`SPOT_CHECKS` places spread over it.

    ``--assume`` trusts the destination to hold the assumed version plus its tracked
    writes, and writes only where those differ from the version restored. Trusted wrongly (a
    name like ``/dev/sdb`` now naming another disk, writes made while nothing tracked the
    device), the result would be a mix of both, with no error. A few reads catch another
    device, or a device written all over; they cannot catch a few untracked blocks."""
    bs = source.block_size
    # Whole blocks only: a local store's map records a short last block's digest as of the
    # block padded with zeros, not of just its bytes as the destination reads them.
    blocks = source.size // bs
    skip = set(planned)
    for i in range(SPOT_CHECKS if blocks else 0):
        first = min(i * blocks // SPOT_CHECKS, max(0, blocks - SPOT_BLOCKS))
        count = min(SPOT_BLOCKS, blocks - first)
        if all(b in skip for b in range(first, first + count)):
            continue
        theirs = await source.recorded_digests(first, count)
        length = count * bs
        differ = [b for b in await source.blocking(_differing, dest, first, length, bs, theirs)
                  if b not in skip]
        if differ:
            raise RestoreError(
                f"{dest.path} does not hold {assume} where nothing is to be written (block "
                f"{differ[0]} differs): it is not the device --assume says, or it was written "
                "while nothing tracked it. Run without --assume: the whole device is compared "
                "and only what differs is written")


# -- planning and writing ----------------------------------------------------------------------


Progress = Callable[[str, int, int], None]


async def plan(source: Source, dest: Destination, assume: str | None,
               progress: Progress | None = None) -> RestorePlan:
    bs = source.block_size
    blocks = -(-source.size // bs)
    result = RestorePlan(source.name, bs, source.size, assumed=assume)
    step = max(1, RANGE // bs)
    dirty: list[int] = []
    if assume and dest.is_block:
        tracked = await source.blocking(tracked_dirty_blocks, dest.path, bs)
        if tracked is None:
            raise RestoreError(
                f"nothing tracks {dest.path}, so what was written to it since {assume} cannot "
                "be known (a reboot ends eBPF tracking; a sender's tracker runs until `nbdsink "
                "track stop`). Run without --assume: the whole device is compared and only "
                "what differs is written")
        dirty = sorted(tracked)
    for first in range(0, blocks, step):
        count = min(step, blocks - first)
        if assume:
            differ = set(await source.changed_blocks(first, count))
            differ.update(dirty[bisect.bisect_left(dirty, first):
                                bisect.bisect_left(dirty, first + count)])
            result.blocks.extend(sorted(differ))
        else:
            theirs = await source.digests(first, count)
            length = min(count * bs, source.size - first * bs)
            result.blocks.extend(await source.blocking(
                _differing, dest, first, length, bs, theirs))
        result.compared += count
        if progress is not None:
            progress("compare", result.compared, blocks)
    if assume:
        await check_assumption(source, dest, assume, result.blocks)
    return result


def _differing(dest: Destination, first: int, length: int, bs: int, theirs: bytes) -> list[int]:
    """The blocks from ``first`` (``length`` bytes of them) whose content in ``dest`` does not
    have the digests ``theirs``."""
    n = dest.read(first * bs, length)
    out = []
    with dest.buffer(n) as mine:
        for i in range(-(-length // bs)):
            digest = blake3.blake3(mine[i * bs : (i + 1) * bs]).digest()
            if digest != theirs[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]:
                out.append(first + i)
    return out


def runs(blocks: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """``blocks`` (ascending) as (first, count) runs of adjacent blocks, of at most ``limit``
    blocks each: one read and one write per run."""
    start, count = -1, 0
    for b in blocks:
        if count and b == start + count and count < limit:
            count += 1
            continue
        if count:
            yield start, count
        start, count = b, 1
    if count:
        yield start, count


async def execute(source: Source, dest: Destination, restore_plan: RestorePlan,
                  progress: Progress | None = None) -> int:
    """Write the planned blocks (runs of them at once); returns the bytes written."""
    bs = restore_plan.block_size
    size = restore_plan.size
    total = len(restore_plan.blocks)
    done = 0

    def finished(span: Span) -> None:
        nonlocal done
        done += -(-span[1] // bs)
        if progress is not None:
            progress("write", done, total)

    limit = max(1, source.run_bytes // bs)
    spans = [(first * bs, min(n * bs, size - first * bs))
             for first, n in runs(restore_plan.blocks, limit)]
    await source.copy(dest, spans, finished)
    return dest.bytes_written
