"""Starting, finding and listing trackers, whatever their backend.

Each backend is a module with three functions (the ``dm`` backend, ``nbdsink.tracker.dm``,
follows the same shape)::

    start(device: str, chunk_size: int) -> Tracker      # TrackerError if already tracked
    attach(device: str) -> Tracker                       # TrackerError if not tracked by it
    tracked_names() -> list[str]                         # kernel names of tracked devices

Trackers outlive processes, so :func:`open_tracker` finds which backend tracks a device.

Several consumers (senders to different targets) may share one device's tracking: what
:func:`start_tracker` and :func:`open_tracker` return for a named consumer is that consumer's
own view (:class:`nbdsink.tracker.consumers.ConsumerTracker`), which reports everything since
*its* last acknowledgement. A ``scan`` tracking serves one consumer and refuses others.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from nbdsink.tracker.base import Tracker, TrackerError
from nbdsink.tracker.blockdev import check_chunk_size
from nbdsink.tracker.consumers import DEFAULT_CONSUMER, ConsumerTracker, forget_records

log = logging.getLogger(__name__)

BACKENDS = ("bpf", "dm", "scan")
DEFAULT_CHUNK_SIZE = 64 << 10


def _module(backend: str) -> ModuleType:
    if backend not in BACKENDS:
        raise TrackerError(f"unknown tracker backend {backend!r} (one of: {', '.join(BACKENDS)})")
    try:
        return importlib.import_module(f"nbdsink.tracker.{backend}")
    except ModuleNotFoundError as exc:
        if exc.name == f"nbdsink.tracker.{backend}":
            raise TrackerError(f"the {backend} backend is not available in this build") from None
        raise


def default_backend() -> str:
    """``bpf`` wherever the kernel has BTF, else ``dm``."""
    from nbdsink.tracker import bpf

    if bpf.has_btf():
        return "bpf"
    try:
        _module("dm")
    except TrackerError:
        raise TrackerError(
            f"the kernel has no BTF ({bpf.btf_path()} is missing), which the bpf backend "
            "needs, and the dm backend is not available: use --backend scan"
        ) from None
    return "dm"


def start_tracker(device: str, chunk_size: int = DEFAULT_CHUNK_SIZE, backend: str | None = None,
                  consumer: str | None = DEFAULT_CONSUMER) -> Tracker:
    """Start tracking ``device`` with ``backend`` (default: :func:`default_backend`), as seen
    by ``consumer`` (None: the backend itself, for tools that consume nothing)."""
    check_chunk_size(chunk_size)
    backend = backend or default_backend()
    mod = _module(backend)
    for other in BACKENDS:
        if other != backend and _tracks(other, device):
            raise TrackerError(f"{device} is already tracked by the {other} backend; stop it first")
    tracker: Tracker = mod.start(device, chunk_size)
    # Records of an earlier tracking of this device name another tracking: registering
    # finds them void by themselves.
    return for_consumer(tracker, consumer)


def open_tracker(device: str, backend: str | None = None,
                 consumer: str | None = DEFAULT_CONSUMER) -> Tracker:
    """The existing tracker of ``device`` (any backend unless one is named), as seen by
    ``consumer`` (None: the backend itself: status, stop)."""
    for name in [backend] if backend else BACKENDS:
        if _tracks(name, device):
            tracker: Tracker = _module(name).attach(device)
            return for_consumer(tracker, consumer)
    raise TrackerError(f"{device} is not tracked (start it with: nbdsink track start {device})")


def for_consumer(tracker: Tracker, consumer: str | None) -> Tracker:
    """``consumer``'s view of ``tracker`` (registering it), or the tracker itself for None."""
    if consumer is None:
        return tracker
    if tracker.backend == "scan":
        from nbdsink.tracker.scan import ScanTracker

        assert isinstance(tracker, ScanTracker)
        tracker.claim(consumer)
        return tracker
    try:
        return ConsumerTracker(tracker, consumer)
    except BaseException:
        tracker.close()
        raise


def stop_tracking(device: str) -> None:
    """Stop tracking ``device``, for every consumer."""
    tracker = open_tracker(device, consumer=None)
    tracker.stop()
    forget_records(tracker)


def tracked() -> list[Tracker]:
    """A handle on every tracked device, every backend."""
    out: list[Tracker] = []
    for backend in BACKENDS:
        try:
            mod = _module(backend)
        except TrackerError:
            continue
        for name in mod.tracked_names():
            try:
                out.append(mod.attach(f"/dev/{name}"))
            except TrackerError as exc:
                # One broken tracking must not hide the others.
                log.warning("%s (%s backend): %s", name, backend, exc)
    return out


def _tracks(backend: str, device: str) -> bool:
    try:
        mod = _module(backend)
    except TrackerError:
        return False
    try:
        mod.attach(device)
    except TrackerError:
        return False
    return True
