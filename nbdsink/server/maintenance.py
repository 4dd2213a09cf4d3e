"""What ``nbdsink serve`` does by itself in the background: apply every volume's retention
policy after commits, sweep unreferenced chunks, punch their pages out of sealed segments,
compact sealed segments that fell low, finish prunes and volume deletions a crash
interrupted.

Each step works in short transactions of the store (see :mod:`nbdsink.store.reclaim`), so
ingest and reads go on meanwhile; a pass is bounded in time and the next one continues.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

from nbdsink.errors import NbdsinkError
from nbdsink.server.session import Heads
from nbdsink.store import Store, check, reclaim
from nbdsink.store.structure import StoreDamage

PASS_INTERVAL = 5.0
"""Seconds between two passes."""
PRUNE_INTERVAL = 2.0
"""A volume's policy is applied at most this often (and only after it committed)."""
PASS_BUDGET = 2.0
"""Seconds a pass may spend sweeping and compacting before it yields to the next one."""
COMPACT_MIN_DEAD = 0.25
"""A sealed segment is compacted once a quarter of it is dead data."""


class Maintenance:
    """One store's background upkeep (one instance per server process)."""

    def __init__(self, store: Store, heads: Heads | None = None,
                 log: Callable[[str], None] = lambda _m: None) -> None:
        self.store = store
        self.heads = heads
        self.log = log
        self._pruned_at: dict[str, tuple[float, int]] = {}
        self._read_only_logged = False
        self._quarantined: StoreDamage | None = None

    def run_pass(self) -> None:
        store = self.store
        # A structural check (``nbdsink verify``, or the one ``serve`` starts with) may have
        # found damage since: reads keep away from it from now on. A damaged main
        # environment is not written to, so there is nothing to do here.
        damage = store.reload_damage()
        if damage is not None and damage.read_only:
            if not self._read_only_logged:
                self.log(f"maintenance stopped: {damage.read_only}")
                self._read_only_logged = True
            return
        self._read_only_logged = False
        if damage is not None and damage is not self._quarantined:
            marked = check.quarantine(store, damage.report)
            self._quarantined = damage
            self.log(f"structural damage in {', '.join(f.name for f in damage.report.damaged)}"
                     f": {marked} chunk(s) quarantined (see 'nbdsink verify')")
        reclaim.finish_pruning(store)
        reclaim.finish_deletions(store)
        now = time.monotonic()
        for volume in store.volumes():
            if not volume.retention:
                continue
            latest = store.latest_version(volume)
            last_time, last_latest = self._pruned_at.get(volume.name, (0.0, -1))
            if latest == last_latest or now - last_time < PRUNE_INTERVAL:
                continue
            report = reclaim.prune(store, volume)
            self._pruned_at[volume.name] = (now, latest)
            if report.pruned:
                self.log(f"pruned {volume.name}@{','.join(map(str, report.pruned))} "
                         f"({report.policy})")
        deadline = time.monotonic() + PASS_BUDGET
        if self.heads is not None:
            # This process's writers are the only ones (the serve lock): with them held back
            # for each sweep transaction, no grace is needed.
            swept = reclaim.sweep(store, grace=0.0, deadline=deadline, guard=self.heads.sweeping)
        else:
            swept = reclaim.sweep(store, deadline=deadline)
        if swept.chunks:
            self.log(f"swept {swept.chunks} unreferenced chunks ({swept.bytes} bytes)")
        punched = reclaim.punch_holes(store, deadline=deadline)
        if punched.chunks:
            self.log(f"punched {punched.chunks} dead chunks out of sealed segments "
                     f"({punched.bytes} bytes)")
        retired = reclaim.compact(store, min_dead=COMPACT_MIN_DEAD, deadline=deadline)
        if retired:
            self.log(f"compacted away segment(s) {', '.join(map(str, retired))}")


BACKGROUND_NICE = 10
"""Nice value of the upkeep thread: ingest and reads come first when the CPUs are busy."""


def _run_in_background() -> None:
    """Lower this thread's CPU priority (Linux: a thread's own nice value), so that what
    the upkeep does outside the interpreter lock (LMDB commits, punching, copying) yields
    to ingest and reads on a busy machine."""
    with contextlib.suppress(OSError):
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(current, BACKGROUND_NICE))


def run_maintenance(store: Store, heads: Heads, stop: threading.Event,
                    log: Callable[[str], None] = lambda _m: None) -> None:
    """Passes of :class:`Maintenance` until ``stop`` is set (run it in a daemon thread)."""
    upkeep = Maintenance(store, heads, log)
    _run_in_background()
    while not stop.is_set():
        # A commit wakes the upkeep at once (a policy may prune now), else every interval.
        heads.committed.wait(PASS_INTERVAL)
        heads.committed.clear()
        if stop.is_set():
            return
        try:
            upkeep.run_pass()
        except NbdsinkError as exc:
            # A full disk, say: the next pass tries again; nothing half-done is visible.
            log(f"maintenance: {exc}")
