"""Several consumers of one device's tracking, each with its own acknowledged generation.

Two senders replicating one device to two backup hosts must each get every chunk written
since *their own* last acknowledgement. A backend (``bpf``, ``dm``) keeps one acknowledged
generation per device, so this layer sits on top of it:

- Every checkpoint, by any consumer, *absorbs* the backend: it checkpoints the backend, adds
  the reported extents to the pending list of **every** registered consumer (keyed by the
  generation), persists that, and only then acknowledges the backend. A crash before the
  save leaves the extents in the backend (reported again); a crash after it and before the
  backend's acknowledgement adds them twice (a union: harmless).
- A consumer is reported the union of its own pending entries; acknowledging generation G
  drops its entries up to G and no one else's.
- A consumer that joins a tracking other consumers already use knows nothing of the writes
  before it joined: :attr:`ConsumerTracker.fresh` says so, and the sender resynchronises by
  comparison. The first consumer of a tracking inherits everything the backend holds (what
  was written since the tracking started), as a single consumer always did.
- The record names the backend's tracking (:meth:`Tracker.tracking_id`): when the tracking
  was replaced (restarted by another consumer after a loss, or lost at reboot), every
  consumer learns it with :class:`ConsumerLost` and resynchronises.

Records live in ``/var/lib/nbdsink/tracker/consumers/<backend>-<device>.json`` (or
``$NBDSINK_TRACKER_CONSUMERS``), replaced atomically under a lock.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nbdsink.tracker import runs
from nbdsink.tracker.base import (
    DirtySet,
    Extent,
    Tracker,
    TrackerError,
    TrackerStatus,
    TrackingLost,
)
from nbdsink.tracker.statefile import locked, read_json, write_json

RECORD_VERSION = 1
MAX_ENTRIES = 32
"""Pending entries kept per consumer; beyond, the oldest are merged into their successor
(an acknowledgement then keeps them a little longer: over-reporting, never losing)."""

DEFAULT_CONSUMER = "cli"
"""The consumer of ``nbdsink track checkpoint``/``ack`` when none is named."""


class ConsumerLost(TrackingLost):
    """This consumer's record is gone or belongs to another tracking: resynchronise."""


def records_root() -> Path:
    """Where consumer records live (``NBDSINK_TRACKER_CONSUMERS`` overrides, for tests)."""
    return Path(os.environ.get("NBDSINK_TRACKER_CONSUMERS", "/var/lib/nbdsink/tracker/consumers"))


def _record_path(backend: Tracker) -> Path:
    return records_root() / f"{backend.backend}-{Path(backend.device).name}.json"


def _lock_path(backend: Tracker) -> Path:
    return records_root() / f"{backend.backend}-{Path(backend.device).name}.lock"


def _new_record(tracking_id: str) -> dict[str, Any]:
    return {"version": RECORD_VERSION, "tracking": tracking_id, "consumers": {}}


class ConsumerTracker(Tracker):
    """One consumer's view of a shared tracking (a :class:`Tracker` itself).

    Opening registers the consumer. ``fresh`` is True when it joined a tracking that already
    had other consumers, or its record belonged to a tracking that was replaced: it then
    cannot vouch for any write before now.
    """

    def __init__(self, backend: Tracker, consumer: str) -> None:
        if not consumer:
            raise TrackerError("a tracker consumer needs a name")
        self.inner = backend
        self.consumer = consumer
        self.backend = backend.backend
        self.device = backend.device
        self.chunk_size = backend.chunk_size
        self.device_size = backend.device_size
        self._path = _record_path(backend)
        self._lock = _lock_path(backend)
        self.fresh = self._register()

    # -- the record -----------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        if not self._path.exists():
            return _new_record(self.inner.tracking_id())
        record = read_json(self._path)
        if record.get("version") != RECORD_VERSION or not isinstance(record.get("consumers"), dict):
            raise TrackerError(f"{self._path}: unknown consumer record format")
        return record

    def _register(self) -> bool:
        with locked(self._lock):
            record = self._load()
            current = self.inner.tracking_id()
            stale = record["tracking"] != current
            if stale:
                # Another tracking (restarted, or lost at reboot): every record is void.
                record = _new_record(current)
            consumers: dict[str, Any] = record["consumers"]
            if self.consumer in consumers:
                return False
            if consumers:
                # Joining others: what the backend holds now belongs to them.
                self._absorb(record)
                fresh = True
            else:
                # The first consumer inherits what the backend holds (everything since the
                # tracking started or since the last acknowledgement): nothing before it is
                # unknown to it, unless it had a record in a tracking that is gone.
                fresh = stale
            consumers[self.consumer] = {"acked": 0, "given": 0, "entries": []}
            write_json(self._path, record)
            return fresh

    def _absorb(self, record: dict[str, Any], given_to: str | None = None) -> int:
        """Move what the backend reports into every consumer's entries (saved before the
        backend forgets it; ``given_to``, when named, is recorded as told of this generation
        in the same save); returns the generation closed."""
        ds = self.inner.checkpoint()
        if given_to is not None:
            record["consumers"][given_to]["given"] = ds.generation
        if ds.extents:
            for entry in record["consumers"].values():
                entries = entry["entries"]
                entries.append([ds.generation, [list(e) for e in ds.extents]])
                while len(entries) > MAX_ENTRIES:
                    oldest = entries.pop(0)
                    entries[0][1] = [list(e) for e in runs.normalize(
                        [tuple(e) for e in oldest[1]] + [tuple(e) for e in entries[0][1]])]
        write_json(self._path, record)
        self.inner.acknowledge(ds.generation)
        return ds.generation

    def _mine(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["tracking"] != self.inner.tracking_id():
            raise ConsumerLost(
                f"{self.device}: the tracking was replaced since this consumer joined "
                "(restarted after a loss, or a reboot): resynchronising")
        entry = record["consumers"].get(self.consumer)
        if entry is None:
            raise ConsumerLost(f"{self.device}: consumer {self.consumer!r} is no longer registered")
        mine: dict[str, Any] = entry
        return mine

    # -- Tracker --------------------------------------------------------------------------

    def tracking_id(self) -> str:
        return self.inner.tracking_id()

    def checkpoint(self) -> DirtySet:
        with locked(self._lock):
            record = self._load()
            self._mine(record)
            generation = self._absorb(record, given_to=self.consumer)
            entry = self._mine(record)
            extents: list[Extent] = runs.normalize(
                (e[0], e[1]) for _, ext in entry["entries"] for e in ext)
            return DirtySet(generation, self.chunk_size, extents)

    def acknowledge(self, generation: int) -> None:
        with locked(self._lock):
            record = self._load()
            entry = self._mine(record)
            if generation > entry["given"]:
                raise TrackerError(
                    f"{self.device}: cannot acknowledge generation {generation}: the last "
                    f"checkpoint of consumer {self.consumer!r} closed {entry['given']}")
            if generation <= entry["acked"]:
                return
            entry["acked"] = generation
            entry["entries"] = [e for e in entry["entries"] if e[0] > generation]
            write_json(self._path, record)

    def status(self) -> TrackerStatus:
        return self.inner.status()

    def stop(self) -> None:
        """Stop the device's tracking for every consumer."""
        with locked(self._lock):
            self.inner.stop()
            self._path.unlink(missing_ok=True)

    def close(self) -> None:
        self.inner.close()


def forget_records(backend: Tracker) -> None:
    """Drop every consumer record of ``backend``'s device (its tracking was stopped)."""
    with locked(_lock_path(backend)):
        _record_path(backend).unlink(missing_ok=True)


def consumer_records(backend: Tracker) -> dict[str, dict[str, int]]:
    """Every consumer registered on ``backend``'s tracking: its acknowledged generation and
    the bytes it has pending (nothing, for a scan tracking or a tracking nobody consumes)."""
    path = _record_path(backend)
    if not path.exists():
        return {}
    with locked(_lock_path(backend)):
        record = read_json(path)
    if record.get("tracking") != backend.tracking_id():
        return {}
    out: dict[str, dict[str, int]] = {}
    for name, entry in record.get("consumers", {}).items():
        pending = runs.normalize((e[0], e[1]) for _, ext in entry["entries"] for e in ext)
        out[name] = {"acked": entry["acked"], "pending_bytes": sum(n for _, n in pending)}
    return out


def drop_consumer(backend: Tracker, consumer: str) -> None:
    """Unregister ``consumer`` (a replication that was removed): it holds nothing back."""
    with locked(_lock_path(backend)):
        path = _record_path(backend)
        if path.exists():
            record = read_json(path)
            record.get("consumers", {}).pop(consumer, None)
            write_json(path, record)
