"""One NBD connection to one export, as the nbdkit plugin drives it.

Plain Python with no nbdkit import, so it is unit-tested directly; the plugin only converts
callbacks to method calls and exceptions (each carrying ``errno``) to ``nbdkit.set_error``.
"""

from __future__ import annotations

import contextlib
import errno
import threading
import time
from collections.abc import Iterator

from nbdsink.contract import CONTRACT_VERSION, DIGEST_SIZE, DIGESTS_VIEW, REPLICATION_LABEL
from nbdsink.errors import NbdsinkError
from nbdsink.server.digests import read_head_digests, read_version_digests
from nbdsink.server.exports import SCRATCH_VIEW, ExportName, parse_export_name
from nbdsink.server.scratch import ScratchOverlay
from nbdsink.store import Store, StoreError, UnknownVersion, VersionInfo, VolumeInfo
from nbdsink.store.head import (
    DEFAULT_BATCH_BYTES,
    MAX_BATCH_AGE,
    DedupGate,
    Head,
    block_is_data,
    read_into,
)
from nbdsink.store.readers import ReaderLock

MAX_REQUEST = 32 << 20
"""Largest request advertised: the Linux nbd driver and qemu-nbd both stop at 32 MiB."""

PREFERRED_REQUEST = 4 << 20
"""Preferred block size advertised (at least the volume's block size). Any aligned request
of whole blocks is efficient, but every request costs a round through the Python plugin, so
fewer, larger requests are faster: clients that honour it (nbdcopy, qemu) read a version
about 1.6 times as fast with 4 MiB requests as with nbdcopy's default of 256 KiB, and write
duplicates about 1.5 times as fast. The block size itself is in the head's description
("block size N"), where the sender reads it."""

DIGESTS_PREFERRED = 64 << 10
"""Preferred request size of a digests view: 2048 digests, 128 MiB of 64 KiB blocks."""

MAX_EXTENT_BLOCKS = 16384
"""At most this many blocks are examined per block-status reply (a short reply is allowed)."""

EXTENT_DATA = 0
EXTENT_HOLE_ZERO = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO


class SessionError(NbdsinkError):
    """An error for the NBD client, with the errno it should see."""

    def __init__(self, message: str, err: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = err


class Heads:
    """The writable head of each volume in this server process, made on first use.

    Every connection to ``vol`` shares one Head, so a FLUSH on any of them commits what all of
    them wrote (that is what makes advertising multi-conn correct).
    """

    def __init__(self, store: Store, batch_bytes: int | None = None) -> None:
        self.store = store
        self.batch_bytes = batch_bytes or DEFAULT_BATCH_BYTES
        self._heads: dict[str, Head] = {}
        self._lock = threading.Lock()
        self.gate = DedupGate()
        self.committed = threading.Event()
        """Set by every commit: wakes the background upkeep (retention applies at once)."""

    def get(self, volume: VolumeInfo) -> Head:
        with self._lock:
            head = self._heads.get(volume.name)
            if head is None:
                head = self._heads[volume.name] = Head(self.store, volume, self.batch_bytes,
                                                       self.gate)
            return head

    @contextlib.contextmanager
    def sweeping(self) -> Iterator[set[bytes]]:
        """Writers held back; the digests their unsaved batches rely on (see DedupGate)."""
        with self.gate.exclusive():
            with self._lock:
                heads = list(self._heads.values())
            yield set().union(*(h.relied_upon() for h in heads))

    def save_all(self) -> None:
        """Push every in-memory batch into LMDB (on a clean shutdown)."""
        with self._lock:
            for head in self._heads.values():
                head.save()

    def save_idle(self, idle_seconds: float) -> None:
        """Save the batches of heads nobody wrote to for ``idle_seconds``, and those whose
        oldest write is MAX_BATCH_AGE old.

        Run periodically, this bounds what a hard stop can drop to the writes of the last
        moments before it, even when a client stays connected without flushing.
        """
        now = time.monotonic()
        with self._lock:
            heads = list(self._heads.values())
        for head in heads:
            if head.unsaved and (now - head.last_write >= idle_seconds
                                 or head.unsaved_age >= MAX_BATCH_AGE):
                head.save()

    def run_idle_saver(self, stop: threading.Event, idle_seconds: float = 1.0) -> None:
        """Loop of :meth:`save_idle` until ``stop`` is set (run it in a daemon thread)."""
        while not stop.wait(idle_seconds / 2):
            # A full disk: the client sees ENOSPC on its next write or FLUSH.
            with contextlib.suppress(NbdsinkError):
                self.save_idle(idle_seconds)


def export_list(store: Store) -> list[tuple[str, str]]:
    """(name, description) of every export: each volume's head and each committed version."""
    out: list[tuple[str, str]] = []
    for volume in store.volumes():
        versions = store.versions(volume)
        out.append((volume.name, _head_description(volume, len(versions) + 1)))
        if versions:
            out.append((f"{volume.name}@latest", _version_description(versions[-1])))
        out.extend((f"{volume.name}@{v.version}", _version_description(v)) for v in versions)
    return out


def _head_description(volume: VolumeInfo, pending: int) -> str:
    return (f"{volume.name}: writable head ({volume.size} bytes, block size "
            f"{volume.block_size}); FLUSH commits version {pending}")


def _version_description(v: VersionInfo) -> str:
    # The replication that committed it (a sender's label): a sender refuses to replicate
    # into a volume whose newest version another replication committed.
    by = v.labels.get(REPLICATION_LABEL)
    return (f"version {v.version} of {v.volume}, committed {v.time}, consistency "
            f"{v.consistency}, {v.blocks_changed} blocks changed, {v.bytes_stored} bytes stored"
            + (f", {REPLICATION_LABEL} {by}" if by and by.isalnum() else ""))


class Session:
    """One connection's view of one export."""

    def __init__(self, store: Store, heads: Heads, export_name: str, readonly: bool) -> None:
        self.store = store
        self.export = export_name
        """The export name as the client gave it."""
        try:
            self.name: ExportName = parse_export_name(export_name)
            self.volume = store.volume(self.name.volume)
        except NbdsinkError as exc:
            raise SessionError(str(exc), errno.ENOENT) from exc
        self.head: Head | None = None
        self._reader: ReaderLock | None = None
        self.version = 0
        self.version_info: VersionInfo | None = None
        self.digests = self.name.view == DIGESTS_VIEW
        self.scratch: ScratchOverlay | None = None
        self._heads = heads
        damage = store.damage
        if self.name.kind == "head" and damage is not None and damage.read_only:
            # A store whose main environment is damaged takes no writes (see
            # nbdsink.store.structure): its head is served read-only, as saved so far.
            self.version = store.read(
                lambda r: store.pending_counters(r.txn, self.volume)).version
            self.readonly = True
        elif self.name.kind == "head":
            self.head = heads.get(self.volume)
            self.readonly = readonly or self.digests
        else:
            self.readonly = True
            try:
                self.version = self._resolve_version()
                # Held while connected: pruning leaves this version alone until then. Taken
                # before the version is looked up, so a prune that won the race shows as a
                # version that is gone, never as one changing under the reader.
                self._reader = ReaderLock(store.path, self.volume.id, self.version)
                self.version_info = store.version(self.volume, self.version)
            except StoreError as exc:
                self.close()
                raise SessionError(str(exc), errno.ENOENT) from exc
            if self.name.view == SCRATCH_VIEW:
                self.scratch = ScratchOverlay(store, self.volume, self.version)
                self.readonly = readonly

    def close(self) -> None:
        """The connection ended: a version it read may be pruned again; scratch writes go."""
        if self.scratch is not None:
            self.scratch.close()
            self.scratch = None
        if self._reader is not None:
            self._reader.release()
            self._reader = None

    def _resolve_version(self) -> int:
        if self.name.kind == "version":
            return self.name.version
        if self.name.kind == "latest":
            latest = self.store.latest_version(self.volume)
            if latest == 0:
                raise UnknownVersion(f"volume {self.volume.name!r} has no committed version yet")
            return latest
        return self.store.version_at(self.volume, self.name.timestamp)

    # -- what the handshake advertises ---------------------------------------------------------

    @property
    def size(self) -> int:
        if self.digests:
            return self.volume.blocks * DIGEST_SIZE
        return self.volume.size

    @property
    def block_size(self) -> tuple[int, int, int]:
        if self.digests:
            # Every digest read makes the server read and check the blocks' data: small
            # requests keep each one short.
            return (1, DIGESTS_PREFERRED, MAX_REQUEST)
        return (1, max(self.volume.block_size, PREFERRED_REQUEST), MAX_REQUEST)

    @property
    def description(self) -> str:
        if self.digests:
            what = f"version {self.version}" if self.version else "the pending head"
            return (f"digests of {what} of {self.volume.name}: {DIGEST_SIZE}-byte blake3 per "
                    f"{self.volume.block_size}-byte block (nbdsink contract "
                    f"{CONTRACT_VERSION})")
        if self.version_info is not None:
            return _version_description(self.version_info)
        if self.head is None:
            return (f"{self.volume.name}: head, read-only: the store is damaged (see 'nbdsink "
                    "verify')")
        return _head_description(self.volume, self.head.pending_version)

    # -- data path ------------------------------------------------------------------------------

    def pread(self, buf: memoryview, offset: int) -> None:
        if self.digests:
            if self.head is not None:
                read_head_digests(self.head, buf, offset)
            else:
                read_version_digests(self.store, self.volume, self.version, buf, offset)
            return
        if self.scratch is not None:
            self.scratch.pread(buf, offset)
            return
        if self.head is not None:
            self.head.read_into(buf, offset)
        else:
            read_into(self.store, self.volume, self.version, buf, offset)

    def pwrite(self, buf: memoryview, offset: int, fua: bool = False) -> None:
        if self.scratch is not None and not self.readonly:
            self.scratch.pwrite(buf, len(buf), offset)
            return
        head = self._writable_head()
        head.write(buf, offset)
        if fua:
            # FUA: durable when acknowledged, but no version: only a FLUSH marks a point the
            # writer chose (an O_DSYNC database or a journal sends FUA on nearly every write).
            head.make_durable()

    def zero(self, count: int, offset: int, fua: bool = False) -> None:
        if self.scratch is not None and not self.readonly:
            self.scratch.pwrite(None, count, offset)
            return
        head = self._writable_head()
        head.zero(count, offset)
        if fua:
            head.make_durable()

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        # A trimmed range reads back as zeros, which NBD allows and which keeps it sparse.
        self.zero(count, offset, fua)

    def flush(self) -> VersionInfo | None:
        """Commit what is pending as the next version (None if nothing changed)."""
        if self.head is None or self.readonly:
            return None
        attrs = dict(self.name.attributes)
        consistency = attrs.pop("consistency", "none")
        info = self.head.commit(consistency, attrs)
        if info is not None:
            self._heads.committed.set()
        return info

    def extents(self, count: int, offset: int) -> list[tuple[int, int, int]]:
        if self.digests or self.scratch is not None:
            return [(offset, min(count, self.size - offset), EXTENT_DATA)]
        bs = self.volume.block_size
        first = offset // bs
        last = min((offset + count - 1) // bs, first + MAX_EXTENT_BLOCKS - 1)
        n = last - first + 1
        if self.head is not None:
            kinds = self.head.block_is_data(first, n)
        else:
            kinds = block_is_data(self.store, self.volume, self.version, first, n)
        out: list[tuple[int, int, int]] = []
        end_limit = min(offset + count, (last + 1) * bs, self.volume.size)
        for i, is_data in enumerate(kinds):
            start = max((first + i) * bs, offset)
            end = min((first + i + 1) * bs, end_limit)
            if end <= start:
                break
            kind = EXTENT_DATA if is_data else EXTENT_HOLE_ZERO
            if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + end - start, kind)
            else:
                out.append((start, end - start, kind))
        return out

    def _writable_head(self) -> Head:
        if self.head is None or self.readonly:
            raise SessionError(f"export {self.volume.name!r} is read-only here", errno.EPERM)
        return self.head
