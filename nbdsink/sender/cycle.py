"""One replication cycle, written over injected interfaces (tracker, transfer, remote, freezer).

Without a freeze::

    checkpoint -> send dirty (+ pending) -> FLUSH (commit, consistency=none)
               -> save state (acknowledged generation, nothing pending) + tracker.acknowledge

With a freeze, converge first, then freeze only for the small remainder::

    repeat: checkpoint -> send dirty while the filesystem runs -> record it as pending
            -> tracker.acknowledge            (until the rest would fit in --max-freeze)
    pre-hook -> FIFREEZE -> checkpoint -> read the remainder into memory -> FITHAW -> post-hook
             -> send it -> FLUSH on a head opened with consistency=frozen;frozen_at=...
             -> save state + tracker.acknowledge

If the remainder is too large, or reading it overruns --max-freeze, the filesystem is thawed
at once, what was checkpointed is sent as another converge round, and the freeze is tried
again: the applications are never stalled for longer than the bound.

Nothing is lost on any failure: a chunk leaves the tracker (``acknowledge``) only once it
is either committed remotely or recorded in the state directory's ``pending`` list, which
the next attempt resends. The state is saved only after the remote acknowledged the FLUSH;
that save and the acknowledge after it (``+`` above) run at once, since losing either to a
crash only makes the next start resend.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

import trio

from nbdsink.sender.groups import open_nursery
from nbdsink.sender.plan import Extent, Op, total, union
from nbdsink.sender.progress import Progress
from nbdsink.sender.state import SenderState, StateDir
from nbdsink.sender.transfer import Note, RemoteView, Sink, Transfer, TransferStats, collect
from nbdsink.timefmt import iso, utc_now
from nbdsink.tracker.base import DirtySet, Tracker

log = logging.getLogger(__name__)

T = TypeVar("T")


class Remote(Sink, RemoteView, Protocol):
    """The remote volume's writable head, as a cycle uses it."""

    async def commit(self, consistency: str, labels: Mapping[str, str]) -> int | None:
        """FLUSH: commit everything pending as a version with these attributes.

        Returns the committed version number (None if the server made no version).
        """
        ...


class Freezer(Protocol):
    """Freezes and thaws the filesystem on the device; ``before``/``after`` run the hooks."""

    mountpoint: str

    async def sync(self) -> None:
        """Write dirty page-cache data to the device, so the tracker sees it (no freeze)."""
        ...

    async def before(self) -> None: ...

    async def freeze(self) -> None: ...

    async def while_frozen(self, frozen_at: str) -> None:
        """Run the frozen hook, if any: the device is quiescent and what the version needs
        has been read (``frozen_at`` is the version's label)."""
        ...

    async def thaw(self) -> None: ...

    async def after(self) -> None: ...


@dataclass
class CycleOptions:
    freezer: Freezer | None = None
    max_freeze: float = 2.0
    """Longest time a filesystem may stay frozen, in seconds."""
    converge_rounds: int = 8
    """At most this many rounds of sending while the filesystem runs, per freeze attempt."""
    freeze_attempts: int = 5
    """Freezes tried per cycle before giving up on this cycle (the data stays pending)."""
    initial_read_rate: float = 200e6
    """Assumed device read rate (bytes/s) until reads have been measured."""


@dataclass
class CycleResult:
    """What one cycle did; ``version`` is None when nothing needed committing."""

    version: int | None
    generation: int
    consistency: str
    captured_at: str
    stats: TransferStats = field(default_factory=TransferStats)
    freeze_seconds: float | None = None
    freeze_attempts: int = 0
    converge_rounds: int = 0
    duration: float = 0.0


class FreezeBudgetExceeded(Exception):
    """Every freeze attempt of this cycle found more to read than --max-freeze allows."""


class Cycle:
    """Runs cycles for one device/volume pair; keeps the measured device read rate."""

    def __init__(
        self,
        *,
        tracker: Tracker,
        transfer: Transfer,
        remote: Remote,
        state_dir: StateDir,
        state: SenderState,
        options: CycleOptions,
        progress_factory: Callable[[str, int], Progress] | None = None,
    ) -> None:
        self.tracker = tracker
        self.transfer = transfer
        self.remote = remote
        self.state_dir = state_dir
        self.state = state
        self.options = options
        self.read_rate = options.initial_read_rate
        self._progress_factory = progress_factory or (lambda label, n: Progress(label, n))

    # -- helpers ------------------------------------------------------------------------

    async def _tracker(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    async def _checkpoint(self) -> DirtySet:
        return await self._tracker(self.tracker.checkpoint)

    def _noter(self, generation: int) -> Note | None:
        """What tells a tracker that learns from the data sent (scan) what was sent."""
        if not self.tracker.learns_from_sent_data:
            return None
        note_sent = self.tracker.note_sent
        cs = self.transfer.config.chunk_size
        zeros = memoryview(bytes(cs * max(1, (4 << 20) // cs)))

        def note(offset: int, data: bytes | None, length: int) -> None:
            if data is not None:
                note_sent(generation, offset, data)
                return
            for pos in range(0, length, len(zeros)):
                note_sent(generation, offset + pos, zeros[: min(len(zeros), length - pos)])

        return note

    async def _send(
        self, extents: list[Extent], generation: int, *, compare: bool, label: str
    ) -> TransferStats:
        nbytes = total(extents)
        if nbytes == 0:
            return TransferStats()
        progress = self._progress_factory(label, nbytes)
        started = time.monotonic()
        try:
            stats = await self.transfer.send(
                extents,
                remote=self.remote if compare else None,
                progress=progress,
                note=self._noter(generation),
            )
        finally:
            progress.finish()
        self._measured(nbytes, time.monotonic() - started)
        return stats

    def _measured(self, nbytes: int, seconds: float) -> None:
        # Only reads big enough to say something about throughput update the estimate.
        if nbytes >= 4 << 20 and seconds > 0:
            self.read_rate = 0.5 * self.read_rate + 0.5 * (nbytes / seconds)

    def _fits(self, nbytes: int) -> bool:
        """Would reading ``nbytes`` take at most half the freeze budget?"""
        return nbytes / self.read_rate <= self.options.max_freeze / 2

    async def _save(self, *, durable: bool = True) -> None:
        # A worker thread: the fsyncs can take a while on a busy disk, and the event loop
        # has signals to answer meanwhile.
        await trio.to_thread.run_sync(
            functools.partial(self.state_dir.save, self.state, durable=durable)
        )

    async def _acknowledge(self, generation: int) -> None:
        await self._tracker(self.tracker.acknowledge, generation)

    async def _record_pending(self, extents: list[Extent], generation: int) -> None:
        """``extents`` were sent but not committed: remember them, then let the tracker forget."""
        self.state.pending = union(self.state.pending, extents)
        # Durable before the acknowledge: once the tracker forgot these chunks, the state's
        # pending list is the only record that they still need a commit.
        await self._save()
        await self._acknowledge(generation)

    async def _settle(self, generation: int) -> None:
        """Everything up to ``generation`` is committed remotely: save that, let the tracker forget.

        Neither step needs the other first, so they run at once, and the save need not be
        durable: whichever is lost to a crash, the restarted sender only resends (the older
        state's pending chunks, or the generations the tracker still reports), never misses.
        """
        async with open_nursery() as nursery:
            nursery.start_soon(functools.partial(self._save, durable=False))
            nursery.start_soon(self._acknowledge, generation)

    async def _commit(
        self, ds: DirtySet, consistency: str, labels: Mapping[str, str], captured: datetime
    ) -> int | None:
        version = await self.remote.commit(consistency, labels)
        now = utc_now()
        self.state.pending = []
        self.state.synced = True
        self.state.acked_generation = ds.generation
        # With no new version (nothing had changed) the newest one still equals the device
        # as captured: the replica is that current.
        self.state.last_captured_at = iso(captured)
        self.state.last_commit_at = iso(now)
        if version is not None:
            self.state.last_version = version
            self.state.last_consistency = consistency
        await self._settle(ds.generation)
        return version

    # -- the cycle ----------------------------------------------------------------------

    async def run(self, *, full: bool = False) -> CycleResult:
        """One cycle. ``full``: send (compare) the whole device, not just the dirty set."""
        started = time.monotonic()
        if self.options.freezer is None:
            result = await self._run_crash(full)
        else:
            result = await self._run_frozen(full, self.options.freezer)
        result.duration = time.monotonic() - started
        return result

    def _initial(self, ds: DirtySet, full: bool) -> list[Extent]:
        if full:
            return [(0, self.state.size)]
        return union(ds.extents, self.state.pending)

    async def _run_crash(self, full: bool) -> CycleResult:
        captured = utc_now()
        ds = await self._checkpoint()
        extents = self._initial(ds, full)
        label = "full sync" if full else "cycle"
        stats = await self._send(extents, ds.generation, compare=full, label=label)
        version = None
        if extents:
            version = await self._commit(ds, "none", {}, captured)
        else:
            self.state.acked_generation = ds.generation
            await self._settle(ds.generation)
        return CycleResult(version, ds.generation, "none", iso(captured), stats)

    async def _run_frozen(self, full: bool, freezer: Freezer) -> CycleResult:
        opts = self.options
        stats = TransferStats()
        await freezer.sync()
        ds = await self._checkpoint()
        extents = self._initial(ds, full)
        compare = full
        rounds = 0
        if not extents:
            # Nothing written since the last commit: no freeze, no version.
            self.state.acked_generation = ds.generation
            await self._settle(ds.generation)
            return CycleResult(None, ds.generation, "frozen", iso(utc_now()), stats)
        for attempt in range(1, opts.freeze_attempts + 1):
            # Converge: send while the filesystem runs, sync, look again; at least once per
            # attempt, so that FIFREEZE itself has only the last moment's writes to flush,
            # and until the rest fits in the budget.
            first = True
            while (
                extents
                and (first or not self._fits(total(extents)))
                and rounds < opts.converge_rounds * attempt
            ):
                first = False
                rounds += 1
                label = "full sync" if compare else f"converge round {rounds}"
                stats.add(await self._send(extents, ds.generation, compare=compare, label=label))
                compare = False
                await self._record_pending(extents, ds.generation)
                await freezer.sync()
                ds = await self._checkpoint()
                extents = ds.extents
            ops, frozen_ds, frozen_at, frozen_for = await self._frozen_read(freezer)
            if ops is None:
                # Too much to read while frozen: it becomes the next converge round.
                log.info(
                    "freeze attempt %d: %d bytes dirty would exceed --max-freeze %.3gs; "
                    "thawed after %.3fs, converging further",
                    attempt, frozen_ds.dirty_bytes, opts.max_freeze, frozen_for,
                )
                ds, extents = frozen_ds, frozen_ds.extents
                continue
            stats.add(await self.transfer.push(ops, note=self._noter(frozen_ds.generation)))
            version = await self._commit(
                frozen_ds, "frozen", {"frozen_at": iso(frozen_at)}, frozen_at
            )
            return CycleResult(
                version, frozen_ds.generation, "frozen", iso(frozen_at), stats,
                freeze_seconds=frozen_for, freeze_attempts=attempt, converge_rounds=rounds,
            )
        # Nothing lost: what was sent is pending in the state, the rest is in the tracker.
        raise FreezeBudgetExceeded(
            f"could not freeze {freezer.mountpoint} for less than {opts.max_freeze:g}s in "
            f"{opts.freeze_attempts} attempts (writes outpace replication); will retry"
        )

    async def _frozen_read(
        self, freezer: Freezer
    ) -> tuple[list[Op] | None, DirtySet, datetime, float]:
        """Freeze, checkpoint, read the remainder into memory within the budget, thaw.

        Returns the requests (None if the budget did not allow reading them all), the
        checkpoint taken while frozen, the freeze instant and how long the freeze lasted.
        """
        budget = self.options.max_freeze
        ops: list[Op] | None = None
        await freezer.before()
        try:
            t0 = time.monotonic()
            await freezer.freeze()
            frozen_at = utc_now()
            try:
                ds = await self._checkpoint()
                nbytes = ds.dirty_bytes
                if nbytes / self.read_rate <= budget:
                    with trio.move_on_after(max(0.0, budget - (time.monotonic() - t0))):
                        read_start = time.monotonic()
                        ops = await collect(self.transfer, ds.extents)
                        self._measured(nbytes, time.monotonic() - read_start)
                    if ops is None:
                        # Overran: learn from it so the next estimate is more careful.
                        self.read_rate = min(self.read_rate, nbytes / budget / 2)
                if ops is not None:
                    await freezer.while_frozen(iso(frozen_at))
            finally:
                # Shielded: the filesystem must be thawed even if this task is cancelled.
                with trio.CancelScope(shield=True):
                    await freezer.thaw()
            frozen_for = time.monotonic() - t0
        finally:
            with trio.CancelScope(shield=True):
                await freezer.after()
        return ops, ds, frozen_at, frozen_for
