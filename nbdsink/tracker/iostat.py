"""The kernel's own I/O accounting of a block device, as a check on what a tracker saw.

``/sys/class/block/<dev>/stat`` counts the sectors of every completed write and discard of the
device, updated by the block layer right after the ``block_rq_complete`` tracepoint, on the
same path. The bpf tracker's programs count the same sectors when they run; the kernel has
been seen skipping them (see ``kmod/bpf``) without any counter of theirs moving, so comparing
the two totals is how a skipped completion is *detected* (:func:`audit`).

Both totals only grow. The programs count a request before the kernel accounts it, and the
checkpoint reads the kernel's total first, so a request in flight at that moment can only make
the programs look ahead, never behind: a shortfall (kernel minus programs) never shows more
than was really missed, and every missed sector shows by the next checkpoint at the latest
(at once when the device is quiescent, as under a freeze).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nbdsink.tracker.base import TrackerError

SYS_BLOCK = Path("/sys/class/block")
_WRITE_SECTORS = 6
_DISCARD_SECTORS = 13


def _sysdir(name: str) -> Path:
    return SYS_BLOCK / name


def _queue_dir(name: str) -> Path:
    d = _sysdir(name).resolve()
    return (d.parent if (d / "partition").exists() else d) / "queue"


def written_sectors(name: str) -> int:
    """Write plus discard sectors the kernel accounted to device ``name`` since it appeared."""
    try:
        fields = (_sysdir(name) / "stat").read_text().split()
    except OSError as exc:
        raise TrackerError(f"cannot read the I/O statistics of {name}: {exc.strerror}") from None
    total = int(fields[_WRITE_SECTORS])
    if len(fields) > _DISCARD_SECTORS:
        total += int(fields[_DISCARD_SECTORS])
    return total


def iostats_enabled(name: str) -> bool:
    try:
        return (_queue_dir(name) / "iostats").read_text().strip() != "0"
    except OSError:
        return False


def enable_iostats(name: str) -> None:
    """Turn the device queue's I/O accounting on (it is on by default; an admin may have
    turned it off, and without it nothing can be checked)."""
    try:
        (_queue_dir(name) / "iostats").write_text("1")
    except OSError as exc:
        raise TrackerError(f"cannot enable I/O statistics of {name}: {exc.strerror}") from None


@dataclass(frozen=True)
class Audit:
    """What one comparison found."""

    unseen_done: int
    """Sectors whose completion the programs newly failed to see (0: nothing missed)."""
    unseen_issued: bool
    """The issue-time marks fell short too, so they cannot stand in for what was missed."""
    answered_done: int
    answered_issued: int


def audit(kernel: int, done: int, issued: int, answered_done: int, answered_issued: int) -> Audit:
    """Compare the kernel's total (``kernel``, counted from the tracking's start) with what the
    programs counted at completion (``done``) and at issue (``issued``).

    ``answered_*`` are the shortfalls already answered by earlier checkpoints: only growth
    beyond them is new. Returns the new answered values to keep.
    """
    short_done = kernel - done
    short_issued = kernel - issued
    unseen = max(0, short_done - answered_done)
    unseen_issued = short_issued > answered_issued
    return Audit(
        unseen_done=unseen,
        unseen_issued=unseen > 0 and unseen_issued,
        answered_done=max(answered_done, short_done),
        answered_issued=max(answered_issued, short_issued),
    )
