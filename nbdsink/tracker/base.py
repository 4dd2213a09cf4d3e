"""The tracker interface every backend implements.

Contract (see issue "Change tracking"): a tracker watches one block device at a fixed chunk
size. :meth:`Tracker.checkpoint` closes the current generation atomically with respect to
completed writes and returns every chunk that may have been written since the last
*acknowledged* generation -- so a generation that was read but never acknowledged (the sender
crashed, the network failed) is reported again by the next checkpoint. A tracker may
over-report, never under-report. :meth:`Tracker.acknowledge` tells it the remote has durably
committed everything up to a generation, so those chunks can be forgotten.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from nbdsink.errors import NbdsinkError

Extent = tuple[int, int]
"""(offset, length) in bytes."""


class TrackerError(NbdsinkError):
    """A tracker could not start, checkpoint or stop; the message says why."""


class AlreadyTracked(TrackerError):
    """``start`` found the device already tracked by this backend (open it instead)."""


class TrackerInUse(TrackerError):
    """The device's tracking serves another consumer and cannot serve this one too."""


class TrackingLost(TrackerError):
    """The tracker cannot vouch for what changed (unclean stop, lost state): rescan needed."""


@dataclass(frozen=True)
class DirtySet:
    """What a checkpoint returned: a closed generation and the chunks it may have changed.

    ``extents`` are sorted, merged, chunk-aligned byte ranges (the last one clipped to the
    device size), and cover every chunk written since the last acknowledged generation.
    """

    generation: int
    chunk_size: int
    extents: list[Extent] = field(default_factory=list)

    @property
    def dirty_bytes(self) -> int:
        return sum(length for _, length in self.extents)

    def to_json(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "chunk_size": self.chunk_size,
            "extents": [[off, length] for off, length in self.extents],
        }


@dataclass(frozen=True)
class TrackerStatus:
    """One tracked device, as ``nbdsink track status`` shows it."""

    device: str
    backend: str
    chunk_size: int
    generation: int
    dirty_bytes: int
    unseen_sectors: int = 0
    """Written sectors the kernel accounted that the tracker did not see itself (answered by
    over-reporting; non-zero means the kernel skipped the tracker: see kmod/bpf)."""

    def to_json(self) -> dict[str, object]:
        return {
            "device": self.device,
            "backend": self.backend,
            "chunk_size": self.chunk_size,
            "generation": self.generation,
            "dirty_bytes": self.dirty_bytes,
            "unseen_sectors": self.unseen_sectors,
        }


class Tracker(abc.ABC):
    """A change tracker attached to one block device."""

    backend: str
    device: str
    chunk_size: int
    device_size: int

    @abc.abstractmethod
    def tracking_id(self) -> str:
        """What names this very tracking: it changes when the tracking is stopped and started
        again (or lost at reboot), so that a record kept about it can tell it is void."""

    @abc.abstractmethod
    def checkpoint(self) -> DirtySet:
        """Close the current generation; return everything not yet acknowledged."""

    @abc.abstractmethod
    def acknowledge(self, generation: int) -> None:
        """The remote durably holds everything up to ``generation``: forget those chunks.

        Acknowledging an older generation than the last checkpoint is allowed and forgets
        nothing that a later checkpoint reported (over-reporting is safe, losing is not).
        """

    @abc.abstractmethod
    def status(self) -> TrackerStatus:
        """Backend, chunk size, current generation and bytes marked dirty so far."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop tracking and release every kernel object the tracker holds."""

    def close(self) -> None:  # noqa: B027 -- most backends hold nothing per handle
        """Release what this handle holds (the tracking itself goes on)."""

    learns_from_sent_data = False
    """True for a tracker that must be told what was sent (:meth:`note_sent`): the scan
    backend, whose reference is what the remote holds."""

    def note_sent(self, generation: int, offset: int, data: bytes | memoryview) -> None:  # noqa: B027
        """The sender pushed ``data`` (whole chunks from ``offset``) for ``generation``.
        Only trackers with :attr:`learns_from_sent_data` need it."""


def merge_chunks(chunks: list[int] | range, chunk_size: int, device_size: int) -> list[Extent]:
    """Turn sorted chunk indexes into merged byte extents, the last clipped to the device."""
    extents: list[Extent] = []
    start = prev = -2
    for c in chunks:
        if c != prev + 1:
            if start >= 0:
                extents.append(_clip(start, prev, chunk_size, device_size))
            start = c
        prev = c
    if start >= 0:
        extents.append(_clip(start, prev, chunk_size, device_size))
    return [e for e in extents if e[1] > 0]


def _clip(first: int, last: int, chunk_size: int, device_size: int) -> Extent:
    off = first * chunk_size
    end = min((last + 1) * chunk_size, device_size)
    return (off, end - off)
