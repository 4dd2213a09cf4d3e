"""``nbdsink replicate``: sessions of cycles, reconnects with backoff, clean stop.

A *session* is one connection to the remote head and one attachment to the tracker; it
runs cycles every ``interval`` until it fails or is cancelled. Transient failures (network,
server restart, a freeze that did not fit, a hook that failed) end the session and the next
one starts after a backoff delay; the cycle design guarantees nothing was lost meanwhile.
Errors a retry cannot fix (the volume does not match, the device went away, the state
directory belongs to another replication) stop the sender with a clear message.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from dataclasses import dataclass
from datetime import datetime

import trio

from nbdsink import metrics, nbd
from nbdsink.nbd import TLSConfig
from nbdsink.sender import freeze as freezing
from nbdsink.sender.backoff import Backoff
from nbdsink.sender.cycle import Cycle, CycleOptions, CycleResult, FreezeBudgetExceeded
from nbdsink.sender.device import Device
from nbdsink.sender.errors import (
    DeviceChanged,
    DeviceError,
    FreezeError,
    HookError,
    RemoteError,
    StateError,
    VolumeInUse,
)
from nbdsink.sender.groups import open_nursery
from nbdsink.sender.identity import device_identity
from nbdsink.sender.ownership import committed_by, replication_id
from nbdsink.sender.ratelimit import RateLimiter
from nbdsink.sender.remote import (
    NbdRemote,
    open_remote,
    version_from_description,
    volume_of,
)
from nbdsink.sender.state import CycleRecord, SenderState, StateDir
from nbdsink.sender.transfer import Transfer, TransferConfig
from nbdsink.sender.units import format_duration, format_size
from nbdsink.sender.verify import VerifyResult, verify_pass
from nbdsink.timefmt import iso, utc_now
from nbdsink.tracker import Tracker, TrackingLost, open_tracker, start_tracker
from nbdsink.tracker.base import AlreadyTracked, TrackerError, TrackerInUse
from nbdsink.tracker.consumers import ConsumerLost, ConsumerTracker
from nbdsink.tracker.registry import default_backend

log = logging.getLogger("nbdsink.sender")

TRANSIENT: tuple[type[BaseException], ...] = (
    nbd.NBDConnectionError,
    nbd.NBDReplyError,
    nbd.RemoteProtocolError,
    RemoteError,
    OSError,
)
"""Failures that a new session, after a backoff delay, can get past."""

CYCLE_RETRYABLE: tuple[type[BaseException], ...] = (FreezeBudgetExceeded, HookError)
"""Failures of one cycle that the next cycle, an interval later, may well get past."""


@dataclass
class ReplicateOptions:
    device: str
    uri: str
    state_dir: str
    once: bool = False
    interval: float = 10.0
    freeze: str | None = None
    pre_hook: str | None = None
    post_hook: str | None = None
    frozen_hook: str | None = None
    hook_timeout: float = 60.0
    tracker: str | None = None
    rate: int = 0
    max_freeze: float = 2.0
    window: int = 16
    max_request: int = 4 << 20
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    tls: TLSConfig | None = None
    io_timeout: float = 60.0
    """Seconds the connect, the handshake and each request may take (0: no limit)."""
    verify: bool = False
    """With once: compare the whole device with the version afterwards (verify.py)."""
    verify_interval: float = 0.0
    verify_rate: int = 0
    device_replaced: bool = False
    """Accept a device whose identity changed (replaced on purpose): compare it in full."""
    take_over: bool = False
    """Replicate into a volume whose newest version another replication committed."""


class Replicator:
    """Runs sessions until ``--once`` is done or the task is cancelled (SIGTERM)."""

    def __init__(self, options: ReplicateOptions) -> None:
        self.options = options
        self.state_dir = StateDir(options.state_dir)
        self.volume = volume_of(options.uri)
        self.limiter = RateLimiter(options.rate)
        self.backoff = Backoff(options.backoff_initial, options.backoff_max)
        self.cycles = 0
        self.cycle_lock = trio.Lock()
        """Held by each cycle, and by each step of a comparison with the replica."""
        self.tracker_now: Tracker | None = None
        self.replication: str | None = None
        """This replication's ID (host and device, sender/ownership.py), set per session."""

    # -- start-up checks ----------------------------------------------------------------

    def prepare(self) -> None:
        """Thaw what a dead sender left frozen; check --freeze names the device's filesystem."""
        thawed = freezing.thaw_leftover(self.state_dir)
        if thawed:
            log.warning("thawed %s, left frozen by a previous sender", thawed)
        if self.options.freeze:
            mount_dev = freezing.mount_source(self.options.freeze)
            try:
                rdev = os.stat(self.options.device).st_rdev
            except OSError as exc:
                raise DeviceError(f"cannot open {self.options.device}: {exc.strerror}") from exc
            # The filesystem may sit on the device itself or on layers over it: a LUKS
            # container is replicated under its dm-crypt mapping, so that the backup holds
            # ciphertext only, while its filesystem is mounted from the mapping.
            if not freezing.stacked_on(mount_dev, (os.major(rdev), os.minor(rdev))):
                raise FreezeError(
                    f"--freeze {self.options.freeze}: that filesystem is not on "
                    f"{self.options.device} (it is on device {mount_dev[0]}:{mount_dev[1]})"
                )

    def _state_for(self, device: Device, remote: NbdRemote, backend: str) -> SenderState:
        state = self.state_dir.load()
        identity = device_identity(self.options.device)
        self.replication = replication_id(self.options.device, identity)
        if state is None:
            state = SenderState(
                device=self.options.device, uri=self.options.uri, volume=self.volume,
                size=device.size, chunk_size=remote.block_size, tracker=backend,
                device_id=identity,
            )
        else:
            same_path = os.path.realpath(state.device) == os.path.realpath(self.options.device)
            # A stable name (/dev/disk/by-id/...) may now point to another node than the
            # name the state was started with: the device's identity says it is the same.
            same_device = identity is not None and identity == state.device_id
            if state.volume != self.volume or not (same_path or same_device):
                raise StateError(
                    f"state directory {self.state_dir.path} belongs to the replication of "
                    f"{state.device} to volume {state.volume!r}; use another --state"
                )
            if state.size != device.size:
                raise DeviceError(
                    f"{self.options.device} is now {device.size} bytes, it was {state.size}: "
                    "a resized device needs a new volume and a new state directory"
                )
            self._check_identity(state, identity)
            if not same_path:
                log.info("%s is now named %s", state.device, self.options.device)
                state.device = self.options.device
            state.uri = self.options.uri
        remote.check(size=device.size, chunk_size=state.chunk_size)
        self.state_dir.save(state)
        return state

    def _check_identity(self, state: SenderState, identity: str | None) -> None:
        """Refuse a device that is not the one this replication was started with (unless
        ``--device-replaced``); record the identity of an accepted one."""
        if identity is None or identity == state.device_id:
            if self.options.device_replaced and identity is not None:
                log.warning("--device-replaced, but %s is the device this replication was "
                            "started with: leave the option out (kept, it would let another "
                            "device in unnoticed)", self.options.device)
            return
        if state.device_id is not None:
            if not self.options.device_replaced:
                raise DeviceChanged(
                    f"{self.options.device} is not the device this replication was started "
                    f"with: that was {state.device_id}; this is {identity}. Device names can "
                    "change at boot: name the device by a stable path (/dev/disk/by-id/..., "
                    "/dev/mapper/..., /dev/vg/lv). If the device was replaced on purpose (a "
                    "restored copy, a new disk), run once with --device-replaced: it is then "
                    "compared with the replica in full and only what differs is sent")
            log.warning("%s is a replacement of %s (--device-replaced): comparing it with "
                        "the replica in full", identity, state.device_id)
            # Recorded with the new identity, in the same state file: sessions compare in
            # full until one has committed a complete image of the new device, even if this
            # one is interrupted (the identity alone would no longer ask for it).
            state.synced = False
        state.device_id = identity

    async def _check_owner(self, remote: NbdRemote) -> str | None:
        """Refuse a volume whose newest version another replication committed (unless told
        to take it over); label this replication's commits. Returns how the server describes
        the newest version (None: there is none yet)."""
        assert self.replication is not None
        newest = await remote.latest_description()
        owner = committed_by(newest)
        if owner is not None and owner != self.replication:
            if not (self.options.take_over or self.options.device_replaced):
                raise VolumeInUse(
                    f"volume {remote.volume!r}: its newest version was committed by another "
                    f"replication (ID {owner}; this one, {self.options.device} on this host, is "
                    f"{self.replication}). Two replications into one volume would mix their "
                    "devices in every version: give each device its own volume. If this one "
                    "takes the volume over on purpose (the device moved to another host, "
                    "say), run once with --take-over")
            log.warning("taking volume %s over from replication %s (%s)", remote.volume, owner,
                        "--take-over" if self.options.take_over else "--device-replaced")
        remote.replication = self.replication
        return newest

    async def _tracker(self, remote: NbdRemote, state: SenderState,
                       newest: str | None) -> tuple[Tracker, bool]:
        """Attach to (or start) the device's tracker; True if a full sync is needed.
        ``newest``: how the server describes the volume's newest version."""
        device, cs = self.options.device, state.chunk_size
        backend = self.options.tracker or state.tracker
        consumer = self.consumer
        try:
            tracker = await trio.to_thread.run_sync(open_tracker, device, backend, consumer)
        except TrackerInUse:
            raise
        except TrackerError:
            tracker = None
        if tracker is not None:
            if tracker.chunk_size != cs:
                tracker.close()
                raise StateError(
                    f"{device} is tracked in chunks of {tracker.chunk_size}, the volume's block "
                    f"size is {cs}: stop that tracker first (nbdsink track stop {device})"
                )
            if isinstance(tracker, ConsumerTracker) and tracker.fresh:
                # Another replication of this device was already using the tracking: it
                # holds nothing from before this replication joined.
                log.info("joined the tracking of %s that another replication uses: "
                         "resynchronising by comparison", device)
                return tracker, True
            latest = version_from_description(newest)
            if state.synced and (latest or 0) < (state.last_version or 0):
                log.warning(
                    "the remote volume's newest version is %s but version %s was acknowledged "
                    "(store restored or replaced?): resynchronising by comparison",
                    latest, state.last_version,
                )
                return tracker, True
            if (state.synced and state.last_version is not None
                    and (latest or 0) > state.last_version
                    and committed_by(newest) != self.replication):
                # Another writer committed versions (nbdcopy, a client on the head, a
                # replication taken over): the head holds what it wrote where this device's
                # tracker saw nothing. Only sending the tracked chunks would keep that.
                log.warning(
                    "the remote volume's newest version is %s, after this replication's %s, "
                    "and this replication did not commit it: resynchronising by comparison",
                    latest, state.last_version,
                )
                return tracker, True
            return tracker, not state.synced
        if backend == "scan":
            # The reference is what the remote holds: the first checkpoint reports exactly
            # the chunks that differ from it.
            log.info("reading the remote volume's digests for the scan tracker")
            reference = await remote.digests(cs)
            from nbdsink.tracker.scan import start_scan

            tracker = await trio.to_thread.run_sync(start_scan, device, cs, reference)
            return tracker, False
        try:
            tracker = await trio.to_thread.run_sync(start_tracker, device, cs, backend, consumer)
        except AlreadyTracked:
            # Another replication of this device started tracking it a moment ago: join it.
            tracker = await trio.to_thread.run_sync(open_tracker, device, backend, consumer)
        if state.synced:
            log.warning("%s was not being tracked: resynchronising by comparison", device)
        return tracker, True

    # -- sessions -----------------------------------------------------------------------

    async def run(self) -> None:
        """Sessions until done (``--once``) or cancelled; permanent errors propagate."""
        while True:
            try:
                await self._session()
                return
            except TRANSIENT as exc:
                await self._record_error(exc)
                if self.options.once:
                    raise
                delay = self.backoff.next()
                log.warning("replication interrupted: %s; retrying in %s", exc,
                            format_duration(delay))
                await trio.sleep(delay)

    async def _session(self) -> None:
        opts = self.options
        backend = opts.tracker or self._saved_backend() or default_backend()
        with Device(opts.device) as device:
            async with open_remote(opts.uri, opts.tls, window=opts.window,
                                   device_size=device.size,
                                   timeout=opts.io_timeout or None) as remote:
                # A worker thread: it fsyncs the state (the event loop keeps answering).
                state = await trio.to_thread.run_sync(
                    self._state_for, device, remote, backend)
                state.tracker = backend
                newest = await self._check_owner(remote)
                tracker, full = await self._tracker(remote, state, newest)
                self.tracker_now = tracker
                try:
                    async with open_nursery() as nursery:
                        if opts.verify_interval and not opts.once:
                            nursery.start_soon(self._verify_periodically, device, remote, state)
                        await self._cycles(device, remote, state, tracker, full)
                        nursery.cancel_scope.cancel()
                finally:
                    if self.tracker_now is not None:
                        self.tracker_now.close()

    async def _verify_periodically(self, device: Device, remote: NbdRemote,
                                   state: SenderState) -> None:
        """--verify-interval: a comparison with the replica every interval, at a bounded read
        rate, between cycles (each step holds cycles back for one range's read at most)."""
        assert self.options.verify_interval
        limiter = RateLimiter(self.options.verify_rate) if self.options.verify_rate else None
        while True:
            await trio.sleep(self.options.verify_interval)
            await self._verify(device, remote, state, None, limiter)

    async def _verify(self, device: Device, remote: NbdRemote, state: SenderState,
                      tracker: Tracker | None, limiter: RateLimiter | None) -> VerifyResult:
        current = tracker or self.tracker_now
        assert current is not None
        result = await verify_pass(device, remote, current, state, self.state_dir,
                                   self.cycle_lock, limiter)
        state.verify = result.to_json()
        await trio.to_thread.run_sync(functools.partial(self.state_dir.save, state))
        level = logging.WARNING if result.chunks_differed else logging.INFO
        log.log(level, "verify: %d chunks compared with version %s, %d differed%s",
                result.chunks_compared, result.version, result.chunks_differed,
                " (missed writes or damage: sent again)" if result.chunks_differed else "")
        return result

    @property
    def consumer(self) -> str:
        """This replication's name as a consumer of the device's tracking: its state
        directory, which is one per replication."""
        return str(self.state_dir.path.resolve())

    def _rejoin(self, state: SenderState) -> Tracker:
        try:
            return open_tracker(self.options.device, state.tracker, self.consumer)
        except TrackerInUse:
            raise
        except TrackerError:
            pass
        try:
            return start_tracker(self.options.device, state.chunk_size, state.tracker, self.consumer)
        except AlreadyTracked:
            return open_tracker(self.options.device, state.tracker, self.consumer)

    def _saved_backend(self) -> str | None:
        state = self.state_dir.load()
        return state.tracker if state is not None else None

    def _make_cycle(
        self, device: Device, remote: NbdRemote, state: SenderState, tracker: Tracker
    ) -> Cycle:
        opts = self.options
        freezer = None
        if opts.freeze:
            freezer = freezing.FsFreezer(
                opts.freeze, self.state_dir, pre_hook=opts.pre_hook, post_hook=opts.post_hook,
                frozen_hook=opts.frozen_hook, hook_timeout=opts.hook_timeout,
            )
        cs = state.chunk_size
        config = TransferConfig(
            chunk_size=cs,
            max_request=max(cs, opts.max_request // cs * cs),
            window=opts.window,
        )
        transfer = Transfer(device, remote, config, limiter=self.limiter)
        return Cycle(
            tracker=tracker, transfer=transfer, remote=remote, state_dir=self.state_dir,
            state=state, options=CycleOptions(freezer=freezer, max_freeze=opts.max_freeze),
        )

    async def _cycles(
        self, device: Device, remote: NbdRemote, state: SenderState, tracker: Tracker, full: bool
    ) -> None:
        opts = self.options
        cycle = self._make_cycle(device, remote, state, tracker)
        verified = False
        while True:
            started = trio.current_time()
            size = device.current_size()
            if size != state.size:
                raise DeviceError(
                    f"{opts.device} is now {size} bytes, it was {state.size} "
                    "(device removed or resized); stopping"
                )
            previous_capture = state.last_captured_at
            self.tracker_now = tracker
            try:
                async with self.cycle_lock:
                    result = await cycle.run(full=full)
            except ConsumerLost as exc:
                # The tracking goes on (another replication may restart it, or did): take a
                # fresh handle on it, or start it if it is gone, and resynchronise.
                log.warning("%s: rejoining the tracking and resynchronising", exc)
                tracker.close()
                tracker = await trio.to_thread.run_sync(self._rejoin, state)
                cycle = self._make_cycle(device, remote, state, tracker)
                full = True
                continue
            except TrackingLost as exc:
                log.warning("tracking of %s was lost (%s): restarting it and resynchronising",
                            opts.device, exc)
                await trio.to_thread.run_sync(tracker.stop)
                tracker = await trio.to_thread.run_sync(
                    start_tracker, opts.device, state.chunk_size, state.tracker, self.consumer
                )
                cycle = self._make_cycle(device, remote, state, tracker)
                full = True
                continue
            except CYCLE_RETRYABLE as exc:
                await self._record_error(exc)
                if opts.once:
                    raise
                log.warning("cycle failed: %s; next attempt in %s", exc,
                            format_duration(opts.interval))
                await trio.sleep_until(started + opts.interval)
                continue
            full = False
            self.cycles += 1
            self.backoff.reset()
            self._log_cycle(result, previous_capture, state)
            # The cycle's record is for status reports only: no need for a durable save.
            await trio.to_thread.run_sync(
                functools.partial(self.state_dir.save, state, durable=False)
            )
            if opts.once:
                if opts.verify and not verified:
                    verified = True
                    found = await self._verify(device, remote, state, tracker, limiter=None)
                    if found.chunks_differed:
                        continue  # one more cycle sends what the comparison found
                return
            await trio.sleep_until(started + opts.interval)

    # -- reporting ----------------------------------------------------------------------

    def _log_cycle(
        self, result: CycleResult, previous_capture: str | None, state: SenderState
    ) -> None:
        now = utc_now()
        captured = datetime.fromisoformat(result.captured_at.replace("Z", "+00:00"))
        lag = (now - captured).total_seconds()
        metrics.LAG.captured_at = captured.timestamp()
        metrics.REPLICATE_BYTES_SENT.inc(result.stats.bytes_written)
        metrics.REPLICATE_CYCLE_SECONDS.observe(result.duration)
        if result.freeze_seconds is not None:
            metrics.REPLICATE_FREEZE_SECONDS.observe(result.freeze_seconds)
        rpo = None
        if previous_capture is not None and result.version is not None:
            rpo = (now - datetime.fromisoformat(previous_capture.replace("Z", "+00:00"))).total_seconds()
        s = result.stats
        freeze_txt = (
            f" freeze={result.freeze_seconds * 1000:.1f}ms attempts={result.freeze_attempts} "
            f"rounds={result.converge_rounds}"
            if result.freeze_seconds is not None else ""
        )
        log.info(
            "cycle version=%s consistency=%s sent=%d zeroed=%d skipped=%d requests=%d "
            "duration=%.3fs lag=%.3fs%s%s (%s sent)",
            result.version if result.version is not None else "-",
            result.consistency if result.version is not None else "-",
            s.bytes_written, s.bytes_zeroed, s.bytes_skipped, s.requests, result.duration,
            lag, f" rpo={rpo:.3f}s" if rpo is not None else "", freeze_txt,
            format_size(s.bytes_written),
        )
        state.last_cycle = CycleRecord(
            finished_at=iso(now), version=result.version, bytes_sent=s.bytes_written,
            bytes_zeroed=s.bytes_zeroed, duration=result.duration,
            freeze_seconds=result.freeze_seconds, lag_seconds=lag,
        )
        state.last_error = None

    async def _record_error(self, exc: BaseException) -> None:
        metrics.REPLICATE_ERRORS.inc()
        # A worker thread: the save fsyncs, and the event loop has signals to answer.
        await trio.to_thread.run_sync(self._save_error, exc)

    def _save_error(self, exc: BaseException) -> None:
        try:
            state = self.state_dir.load()
            if state is not None:
                state.last_error = f"{iso(utc_now())} {exc}"
                self.state_dir.save(state)
        except StateError:
            pass


async def replicate(options: ReplicateOptions) -> None:
    """Run a replicator until done; SIGTERM and SIGINT end it cleanly (nothing is lost)."""
    replicator = Replicator(options)
    with StateDir(options.state_dir).locked():
        replicator.prepare()
        async with open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(on_signals)
            await replicator.run()
            nursery.cancel_scope.cancel()
