"""Change trackers: which chunks of a block device may differ from the last acknowledged version.

One interface (:class:`nbdsink.tracker.base.Tracker`), several backends: ``bpf`` (eBPF on the
block completion tracepoint), ``dm`` (the nbdsink device-mapper target in ``kmod/dm``) and
``scan`` (no kernel help: hash every chunk and compare with reference digests).

Use :func:`start_tracker` to begin tracking a device and :func:`open_tracker` to pick up a
tracking started by another (possibly dead) process.
"""

from nbdsink.tracker.base import DirtySet, Tracker, TrackerError, TrackerStatus, TrackingLost
from nbdsink.tracker.registry import (
    BACKENDS,
    DEFAULT_CHUNK_SIZE,
    open_tracker,
    start_tracker,
    tracked,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "DirtySet",
    "Tracker",
    "TrackerError",
    "TrackerStatus",
    "TrackingLost",
    "open_tracker",
    "start_tracker",
    "tracked",
]
