"""The ``scan`` backend: no kernel help, hash every chunk and compare with reference digests.

The reference is one blake3 digest (32 bytes) per chunk, in chunk order, describing what the
remote durably holds: the remote's own digests (first sync of a volume that already exists
remotely), or the device's digests when tracking started. :data:`UNKNOWN` (32 zero bytes)
never matches, so such a chunk is always reported.

A checkpoint reads the whole device with O_DIRECT and reports every chunk whose digest differs
from the reference (plus what earlier unacknowledged checkpoints reported).

How the reference is updated on :meth:`ScanTracker.acknowledge`: the reference must become the
digest of what was actually *sent*, not of what the scan saw -- the sender reads a chunk after
the scan, and if the chunk changed in between and later changes back, a reference holding the
scanned digest would hide a difference from the remote. So the sender reports what it pushed
with :meth:`ScanTracker.note_sent`; on acknowledge, each chunk reported by an acknowledged
generation takes the digest noted for the newest such generation, or :data:`UNKNOWN` when none
was noted (reported again next time: over-reporting, never losing).
"""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path
from typing import Any

import blake3

from nbdsink.tracker import runs
from nbdsink.tracker.base import (
    AlreadyTracked,
    DirtySet,
    Tracker,
    TrackerError,
    TrackerInUse,
    TrackerStatus,
    TrackingLost,
)
from nbdsink.tracker.blockdev import check_chunk_size, probe
from nbdsink.tracker.statefile import locked, read_json, write_json

BACKEND = "scan"
DIGEST_SIZE = 32
UNKNOWN = b"\0" * DIGEST_SIZE
STATE_VERSION = 1
_READ_SIZE = 4 << 20


def state_root() -> Path:
    """Where scan trackers keep their reference (``NBDSINK_SCAN_STATE`` overrides)."""
    return Path(os.environ.get("NBDSINK_SCAN_STATE", "/var/lib/nbdsink/tracker/scan"))


def chunk_digest(data: bytes | memoryview) -> bytes:
    """The digest of one chunk's bytes as read from the device."""
    return blake3.blake3(data).digest()


def device_digests(device: str, chunk_size: int, size: int | None = None) -> bytes:
    """One digest per chunk of ``device``, read with O_DIRECT (never the page cache)."""
    if size is None:
        size = probe(device).size
    read_size = max(chunk_size, _READ_SIZE // chunk_size * chunk_size)
    out = bytearray()
    buf = mmap.mmap(-1, read_size)  # page-aligned, as O_DIRECT needs
    try:
        fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        raise TrackerError(f"{device}: cannot open for reading: {exc.strerror}") from None
    try:
        with memoryview(buf) as view:
            off = 0
            while off < size:
                want = min(read_size, size - off)
                got = os.preadv(fd, [view[: -(-want // 4096) * 4096]], off)
                got = min(got, want)
                if got <= 0:
                    raise TrackerError(f"{device}: short read at {off}")
                for i in range(0, got, chunk_size):
                    out += chunk_digest(view[i : min(i + chunk_size, got)])
                off += got
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def _dir(name: str) -> Path:
    return state_root() / name


def start_scan(device: str, chunk_size: int, reference: bytes | None = None) -> ScanTracker:
    """Start tracking ``device`` against ``reference`` (default: its content right now)."""
    dev = probe(device)
    check_chunk_size(chunk_size, dev)
    d = _dir(dev.name)
    nchunks = -(-dev.size // chunk_size)
    with locked(state_root() / f"{dev.name}.lock"):
        if (d / "state.json").exists():
            raise AlreadyTracked(f"{device} is already tracked by the scan backend; stop it first")
        if reference is None:
            reference = device_digests(device, chunk_size, dev.size)
        if len(reference) != nchunks * DIGEST_SIZE:
            raise TrackerError(
                f"reference has {len(reference) // DIGEST_SIZE} digests, {device} has "
                f"{nchunks} chunks of {chunk_size}"
            )
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "reference.tmp", "wb") as f:
            f.write(reference)
            f.flush()
            os.fsync(f.fileno())
        os.replace(d / "reference.tmp", d / "reference")
        write_json(d / "state.json", {
            "version": STATE_VERSION, "device": device, "name": dev.name, "size": dev.size,
            "chunk_size": chunk_size, "last_closed": 0, "acked": 0, "pending": [],
            "started": os.urandom(8).hex(), "consumer": None,
        })
    return ScanTracker(device, dev.name)


def open_scan(device: str) -> ScanTracker:
    """Attach to an existing scan tracking of ``device``."""
    name = probe(device).name if os.path.exists(device) else Path(device).name
    if not (_dir(name) / "state.json").exists():
        raise TrackerError(f"{device} is not tracked by the scan backend")
    return ScanTracker(device, name)


def tracked_names() -> list[str]:
    """Kernel names of every device the scan backend tracks."""
    root = state_root()
    if not root.exists():
        return []
    return sorted(p.parent.name for p in root.glob("*/state.json"))


class ScanTracker(Tracker):
    """Change tracking by comparison with reference digests."""

    backend = BACKEND
    learns_from_sent_data = True

    def __init__(self, device: str, name: str) -> None:
        self.device = device
        self.name = name
        self._dir = _dir(name)
        state = self._load()
        self.chunk_size = state["chunk_size"]
        self.device_size = int(state["size"])
        self._started = str(state.get("started", ""))
        self._nchunks = -(-self.device_size // self.chunk_size)
        # generation -> chunk -> digest of what the sender pushed for that generation.
        self._sent: dict[int, dict[int, bytes]] = {}

    def _load(self) -> dict[str, Any]:
        state = read_json(self._dir / "state.json")
        if state.get("version") != STATE_VERSION:
            raise TrackerError(f"{self._dir}: unknown state version {state.get('version')}")
        if (self._dir / "reference").stat().st_size % DIGEST_SIZE:
            raise TrackingLost(f"{self._dir}/reference is damaged")
        return state

    def tracking_id(self) -> str:
        return f"scan:{self.name}:{self._started}"

    def claim(self, consumer: str) -> None:
        """Make ``consumer`` this tracking's only consumer, or refuse: a reference describes
        what one replica holds, so a scan tracking serves one replication."""
        with locked(state_root() / f"{self.name}.lock"):
            state = self._load()
            owner = state.get("consumer")
            if owner is None:
                state["consumer"] = consumer
                write_json(self._dir / "state.json", state)
            elif owner != consumer:
                raise TrackerInUse(
                    f"{self.device} is tracked by the scan backend for another replication "
                    f"({owner}); a scan reference describes one replica. Replicate one device "
                    "to several targets with the bpf or dm backend")

    def reference(self) -> bytes:
        """The current reference digests (one per chunk)."""
        return (self._dir / "reference").read_bytes()

    def checkpoint(self) -> DirtySet:
        with locked(state_root() / f"{self.name}.lock"):
            state = self._load()
            ref = self.reference()
            now = device_digests(self.device, self.chunk_size, self.device_size)
            differ = [
                c for c in range(self._nchunks)
                if now[c * DIGEST_SIZE : (c + 1) * DIGEST_SIZE]
                != ref[c * DIGEST_SIZE : (c + 1) * DIGEST_SIZE]
            ]
            gen = state["last_closed"] + 1
            state["pending"].append([gen, [list(r) for r in runs.runs_from_chunks(differ)]])
            state["last_closed"] = gen
            write_json(self._dir / "state.json", state)
            pending = [[(f, n) for f, n in r] for _, r in state["pending"]]
            extents = runs.to_extents(runs.union(*pending), self.chunk_size, self.device_size)
            return DirtySet(gen, self.chunk_size, extents)

    def note_sent(self, generation: int, offset: int, data: bytes | memoryview) -> None:
        """The sender pushed ``data`` (whole chunks from ``offset``) for ``generation``."""
        if offset % self.chunk_size:
            raise TrackerError(f"offset {offset} is not chunk-aligned ({self.chunk_size})")
        per_gen = self._sent.setdefault(generation, {})
        with memoryview(data) as view:
            for i in range(0, len(view), self.chunk_size):
                per_gen[(offset + i) // self.chunk_size] = chunk_digest(view[i : i + self.chunk_size])

    def acknowledge(self, generation: int) -> None:
        with locked(state_root() / f"{self.name}.lock"):
            state = self._load()
            if generation > state["last_closed"]:
                raise TrackerError(
                    f"{self.device}: cannot acknowledge generation {generation}: the last "
                    f"checkpoint closed {state['last_closed']}"
                )
            if generation <= state["acked"]:
                return
            newest: dict[int, int] = {}
            for gen, found in state["pending"]:
                if gen <= generation:
                    for c in runs.chunks([(f, n) for f, n in found]):
                        newest[c] = max(newest.get(c, 0), gen)
            # Reference first, state second: a crash in between re-applies this acknowledge,
            # and every digest written is true of the remote's committed data either way.
            fd = os.open(self._dir / "reference", os.O_WRONLY)
            try:
                for c, gen in sorted(newest.items()):
                    digest = self._sent.get(gen, {}).get(c, UNKNOWN)
                    os.pwrite(fd, digest, c * DIGEST_SIZE)
                os.fsync(fd)
            finally:
                os.close(fd)
            state["acked"] = generation
            state["pending"] = [p for p in state["pending"] if p[0] > generation]
            write_json(self._dir / "state.json", state)
            for gen in [g for g in self._sent if g <= generation]:
                del self._sent[gen]

    def status(self) -> TrackerStatus:
        state = self._load()
        pending = [[(f, n) for f, n in r] for _, r in state["pending"]]
        extents = runs.to_extents(runs.union(*pending), self.chunk_size, self.device_size)
        return TrackerStatus(
            device=state["device"],
            backend=BACKEND,
            chunk_size=self.chunk_size,
            generation=state["last_closed"] + 1,
            dirty_bytes=sum(n for _, n in extents),
        )

    def stop(self) -> None:
        with locked(state_root() / f"{self.name}.lock"):
            shutil.rmtree(self._dir, ignore_errors=True)
        (state_root() / f"{self.name}.lock").unlink(missing_ok=True)


# The registry's backend functions (see nbdsink.tracker.registry).
start = start_scan
attach = open_scan
