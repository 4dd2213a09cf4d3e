"""Comparing the device with the replica: the last line of defence against a missed write.

A tracker may over-report, never under-report, and the store checks every chunk it serves;
this pass checks both from the outside. Range by range, with no cycle running meanwhile:

1. read the range from the device (O_DIRECT) and hash each chunk (blake3);
2. checkpoint the tracker (not acknowledged: the next cycle gets that generation again): it
   reports every chunk written since the latest version's checkpoint, including during 1;
3. fetch the latest version's digests of the range (:mod:`nbdsink.contract`: only digests
   cross the network; a chunk damaged in the store reads as never equal);
4. a chunk that differs and that the tracker did not report was missed (or is damaged in the
   store): it joins the state's pending extents, durably, so the next cycle sends it; that
   version holds it, and the store is healed by content.

Chunks the tracker reported are left to the next cycle, which sends them anyway: they differ
because the device moved on, not because anything was lost.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import blake3
import trio

from nbdsink.sender.device import Device
from nbdsink.sender.plan import Extent
from nbdsink.sender.ratelimit import RateLimiter
from nbdsink.sender.remote import NbdRemote
from nbdsink.sender.state import SenderState, StateDir
from nbdsink.timefmt import utc_iso_now
from nbdsink.tracker import runs
from nbdsink.tracker.base import Tracker

log = logging.getLogger(__name__)

RANGE_BYTES = 64 << 20
"""Device bytes compared per step (cycles wait at most one step's read)."""


@dataclass
class VerifyResult:
    chunks_compared: int = 0
    chunks_differed: int = 0
    at: str = ""
    version: int | None = None

    def to_json(self) -> dict[str, object]:
        return {"chunks_compared": self.chunks_compared, "chunks_differed": self.chunks_differed,
                "at": self.at, "version": self.version}


def _chunks_of(extents: list[Extent], chunk_size: int) -> set[int]:
    out: set[int] = set()
    for off, length in extents:
        out.update(range(off // chunk_size, -(-(off + length) // chunk_size)))
    return out


def _hash_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    return [blake3.blake3(data[p : p + chunk_size]).digest() for p in range(0, len(data), chunk_size)]


async def verify_pass(device: Device, remote: NbdRemote, tracker: Tracker, state: SenderState,
                      state_dir: StateDir, cycle_lock: trio.Lock,
                      limiter: RateLimiter | None = None,
                      range_bytes: int = RANGE_BYTES) -> VerifyResult:
    """Compare the whole device with the latest version; see the module docstring."""
    cs = state.chunk_size
    step = max(cs, range_bytes // cs * cs)
    result = VerifyResult()
    offset = 0
    while offset < state.size:
        length = min(step, state.size - offset)
        if limiter is not None:
            await limiter.acquire(length)
        async with cycle_lock:
            version = state.last_version
            if version is None:
                return result  # nothing committed yet: nothing to compare with
            data = await trio.to_thread.run_sync(device.pread, length, offset)
            mine = await trio.to_thread.run_sync(_hash_chunks, data, cs)
            del data
            ds = await trio.to_thread.run_sync(tracker.checkpoint)
            theirs = await remote.version_digests(version, offset, length)
            if theirs is None:
                log.warning("the server offers no digests: --verify needs an nbdsink server")
                return result
            moved_on = _chunks_of(ds.extents, cs)
            first = offset // cs
            missed = [first + i for i, d in enumerate(mine)
                      if d != theirs[i * 32 : (i + 1) * 32] and first + i not in moved_on]
            result.chunks_compared += len(mine)
            result.version = version
            if missed:
                result.chunks_differed += len(missed)
                extents = [(c * cs, min(cs, state.size - c * cs)) for c in missed]
                state.pending = runs.normalize(state.pending + extents)
                await trio.to_thread.run_sync(functools.partial(state_dir.save, state))
                log.warning(
                    "VERIFY: %d chunk(s) of the device differ from version %s though no write "
                    "was tracked there (a missed write, or damage in the store), first at "
                    "offset %d: they are sent with the next cycle", len(missed), version,
                    missed[0] * cs)
        offset += length
    result.at = utc_iso_now()
    return result
