"""The ``bpf`` backend: the eBPF program of ``kmod/bpf`` marks dirty chunks in pinned bitmaps.

Kernel side (see ``kmod/bpf/nbdsink_tracker.bpf.c``): two bitmaps in mmapable array maps, the
open generation's one selected by ``seq & 1``; programs on the block completion tracepoints
set bits with atomic OR. Everything is pinned under ``/sys/fs/bpf/nbdsink/<device>/``, so
tracking outlives the process that started it and a new process picks it up with
:func:`open_bpf`.

User side: generations closed by :meth:`BpfTracker.checkpoint` but not yet acknowledged are
kept in a state file (``/run/nbdsink/tracker/bpf/<device>.json``), which lives exactly as long as
the pins (both vanish at reboot). A checkpoint:

1. flips ``seq`` (an atomic in the kernel, via the ``flip`` program),
2. waits until no program run can still be marking the old bitmap (each CPU's ``active``
   counter is seen at 0),
3. reads the old bitmap and appends it, as the closed generation, to the state file,
4. clears the old bitmap.

A crash between 1 and 3 is repaired by the next checkpoint (the kernel's ``seq`` is ahead of
the state file: the closed bitmap is still there, uncleared); a crash between 3 and 4 leaves
stale bits, which only over-report.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdsink.tracker import iostat, libbpf, runs
from nbdsink.tracker.base import (
    AlreadyTracked,
    DirtySet,
    Tracker,
    TrackerError,
    TrackerStatus,
    TrackingLost,
)
from nbdsink.tracker.blockdev import BlockDevice, check_chunk_size, probe
from nbdsink.tracker.statefile import locked, read_json, write_json

log = logging.getLogger(__name__)

BACKEND = "bpf"
DEFAULT_BTF = "/sys/kernel/btf/vmlinux"
PIN_ROOT = Path("/sys/fs/bpf/nbdsink")
STATE_DIR = Path("/run/nbdsink/tracker/bpf")
REPO_BPF_DIR = Path(__file__).resolve().parents[2] / "kmod" / "bpf"
OBJECT_NAME = "nbdsink_tracker.bpf.o"
# 2: per-CPU "active" counters (pin "pcpu"); only the b copies' misses count; no summary
# bitmaps (pin "summ").
# 3: issue-time bitmaps (pin "qbits") and sector counters, audited against the kernel's I/O
# accounting at every checkpoint.
STATE_VERSION = 3

# struct nbdsink_cfg, struct nbdsink_ctl and struct nbdsink_pcpu of kmod/bpf/nbdsink_tracker.h.
_CFG = struct.Struct("<IIQQII")
_CTL_SEQ, _CTL_OVERFLOW, _CTL_QOVERFLOW = 0, 8, 32
_CTL_SIZE = 48
_PCPU_SIZE = 56  # u64 active, u64 last[4], u64 done_sects, u64 issued_sects
_PCPU_DONE, _PCPU_ISSUED = 40, 48
_DONE, _ISSUED = "bits", "qbits"
QUEUED_KEEP_SECONDS = 120.0
"""How long the chunks issued in a generation stay on hand to answer a completion found
missing later (a request can be in flight for a while: the SCSI timeout is 30 s)."""
_WAIT_TIMEOUT = 10.0
_FULL = (1 << 64) - 1
_NONZERO = re.compile(rb"[^\x00]+")


def btf_path() -> str:
    """Where the loader looks for kernel BTF (``NBDSINK_BTF`` overrides, for tests)."""
    return os.environ.get("NBDSINK_BTF", DEFAULT_BTF)


def has_btf(path: str | None = None) -> bool:
    """True if the kernel exposes BTF, which this CO-RE program needs."""
    return os.path.exists(path or btf_path())


def object_path() -> Path:
    """The compiled BPF object, built from ``kmod/bpf`` on first use if it is missing or stale.

    ``NBDSINK_BPF_OBJECT`` names a prebuilt object instead (packaged installs).
    """
    env = os.environ.get("NBDSINK_BPF_OBJECT")
    if env:
        if not os.path.exists(env):
            raise TrackerError(f"NBDSINK_BPF_OBJECT={env} does not exist")
        return Path(env)
    obj = REPO_BPF_DIR / OBJECT_NAME
    src = REPO_BPF_DIR / "nbdsink_tracker.bpf.c"
    if not src.exists():
        if obj.exists():
            return obj
        raise TrackerError(f"BPF object {obj} not found (set NBDSINK_BPF_OBJECT)")
    sources = [src, REPO_BPF_DIR / "nbdsink_tracker.h", REPO_BPF_DIR / "Makefile"]
    if not obj.exists() or obj.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        run = subprocess.run(["make", "-s", "-C", str(REPO_BPF_DIR)], capture_output=True, text=True)
        if run.returncode != 0:
            raise TrackerError(f"building the BPF program failed:\n{run.stdout}{run.stderr}")
    return obj


def ensure_bpffs() -> None:
    """Mount the BPF filesystem at /sys/fs/bpf if it is not (pins live there)."""
    with open("/proc/mounts") as f:
        if any(line.split()[1:3] == ["/sys/fs/bpf", "bpf"] for line in f):
            return
    run = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], capture_output=True, text=True)
    if run.returncode != 0:
        raise TrackerError(f"cannot mount bpffs at /sys/fs/bpf: {run.stderr.strip()}")


@dataclass(frozen=True)
class _Geometry:
    chunk_size: int
    chunks: int
    words: int

    @classmethod
    def of(cls, size: int, chunk_size: int) -> _Geometry:
        chunks = max(1, -(-size // chunk_size))
        return cls(chunk_size, chunks, -(-chunks // 64))


def _mmap_map(path: str, entries: int, value_size: int) -> mmap.mmap:
    length = -(-(entries * value_size) // mmap.PAGESIZE) * mmap.PAGESIZE
    with libbpf.opened(path) as fd:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _pin_dir(name: str) -> Path:
    return PIN_ROOT / name


def _state_file(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def _lock_file(name: str) -> Path:
    return STATE_DIR / f"{name}.lock"


def start_bpf(device: str, chunk_size: int, btf: str | None = None) -> BpfTracker:
    """Load, attach and pin a tracker for ``device``; the first generation starts now."""
    btf = btf or btf_path()
    dev = probe(device)
    check_chunk_size(chunk_size, dev)
    if not has_btf(btf):
        raise TrackerError(
            f"the kernel has no BTF ({btf} is missing): the bpf backend needs it; "
            "use --backend dm or --backend scan"
        )
    pins = _pin_dir(dev.name)
    with locked(_lock_file(dev.name)):
        ensure_bpffs()
        if _state_file(dev.name).exists():
            if (pins / "ctl").exists() and _state_version(dev.name) == STATE_VERSION:
                raise AlreadyTracked(f"{device} is already tracked (pinned at {pins}); stop it first")
            # The pins are gone (bpffs unmounted, removed by hand), or they belong to a
            # tracking started by another version of nbdsink, which this one cannot drive:
            # that tracking is lost, whoever used it learns so from open_bpf, and a new one
            # may start.
            _state_file(dev.name).unlink()
        # Pins without a state file are what a start killed half-way leaves: the state file
        # is written last, so nobody ever relied on them.
        _remove_pins(pins)
        geo = _Geometry.of(dev.size, chunk_size)
        kernel_base = 0
        if dev.request_based:
            if not iostat.iostats_enabled(dev.name):
                iostat.enable_iostats(dev.name)
            # Read before attaching: a write completing in between then looks unseen (an
            # over-report), never seen-but-unaccounted (which could hide a later miss).
            kernel_base = iostat.written_sectors(dev.name)
        obj = libbpf.BpfObject(str(object_path()), None if btf == DEFAULT_BTF else btf)
        try:
            pins.mkdir(parents=True)
            _load_and_pin(obj, dev, geo, pins)
            with libbpf.opened(str(pins / "ctl")) as fd:
                ctl_id = libbpf.obj_id(fd)
            write_json(_state_file(dev.name), _new_state(dev, geo, ctl_id, kernel_base))
        except BaseException:
            obj.close()
            _remove_pins(pins)
            raise
        obj.close()
    return BpfTracker(device, dev.name)


def _load_and_pin(obj: libbpf.BpfObject, dev: BlockDevice, geo: _Geometry, pins: Path) -> None:
    shift = (geo.chunk_size // 512).bit_length() - 1
    obj.set_rodata(
        _CFG.pack(dev.disk_major, dev.disk_minor, dev.start_sector, dev.nr_sectors, shift,
                  geo.words)
    )
    obj.set_max_entries("bits", 2 * geo.words)
    obj.set_max_entries("qbits", 2 * geo.words)
    # Request-based devices complete requests, bio-based ones only bios: attach what fires.
    # Each hook has two copies (see the program's comment); queue and issue hooks go first so
    # that completions find their bio's range and every completion's issue was marked.
    hooks = (["on_rq_issue", "on_rq_complete"] if dev.request_based
             else ["on_bio_queue", "on_bio_complete"])
    progs = [f"{h}_{copy}" for h in hooks for copy in "ab"]
    for h in ("on_rq_issue", "on_rq_complete", "on_bio_queue", "on_bio_complete"):
        for copy in "ab":
            obj.set_autoload(f"{h}_{copy}", f"{h}_{copy}" in progs)
    obj.load()
    for m in ("ctl", "pcpu", "bits", "qbits", "inflight"):
        obj.pin_map(m, str(pins / m))
    obj.pin_program("flip", str(pins / "flip"))
    for p in progs:
        # Pinned too (not only their links) so that checkpoints can read their miss counters.
        obj.pin_program(p, str(pins / f"prog_{p}"))
    for p in progs:
        obj.attach_and_pin(p, str(pins / f"link_{p}"))


def _new_state(dev: BlockDevice, geo: _Geometry, ctl_id: int, kernel_base: int) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "device": dev.path,
        "name": dev.name,
        "size": dev.size,
        "chunk_size": geo.chunk_size,
        "ctl_id": ctl_id,
        "last_closed": 0,
        "acked": 0,
        "pending": [],
        "misses": 0,
        # The audit against the kernel's accounting (request-based devices only).
        "audited": dev.request_based,
        "kernel_base": kernel_base,
        "answered_done": 0,
        "answered_issued": 0,
        "queued": [],          # [generation, closed at (epoch s), runs] of recent generations
        "unseen_sectors": 0,   # completions the programs did not see, in total (diagnostic)
        "unseen_events": 0,    # checkpoints that found some
    }


def _state_version(name: str) -> object:
    try:
        return read_json(_state_file(name)).get("version")
    except (OSError, ValueError, TrackerError):
        return None


def _remove_pins(pins: Path) -> None:
    # Links first: unpinning them detaches the programs before their maps go.
    if not pins.exists():
        return
    for p in sorted(pins.iterdir(), key=lambda p: not p.name.startswith("link_")):
        p.unlink(missing_ok=True)
    pins.rmdir()


def open_bpf(device: str) -> BpfTracker:
    """Attach to an existing tracking of ``device`` (started by any process)."""
    dev_name = probe(device).name if os.path.exists(device) else Path(device).name
    if not _pin_dir(dev_name).exists():
        raise TrackerError(f"{device} is not tracked by the bpf backend")
    return BpfTracker(device, dev_name)


def tracked_names() -> list[str]:
    """Kernel names of every device the bpf backend tracks."""
    if not STATE_DIR.exists():
        return []
    return sorted(p.stem for p in STATE_DIR.glob("*.json") if _pin_dir(p.stem).exists())


class BpfTracker(Tracker):
    """A handle on one pinned eBPF tracking; any number of processes may hold one."""

    backend = BACKEND

    def __init__(self, device: str, name: str) -> None:
        self.device = device
        self.name = name
        self._pins = _pin_dir(name)
        self._state_path = _state_file(name)
        state = self._load_state()
        self.device_size = int(state["size"])
        self.chunk_size = state["chunk_size"]
        self._ctl_id = int(state["ctl_id"])
        self._geo = _Geometry.of(self.device_size, self.chunk_size)
        try:
            self._ctl = _mmap_map(str(self._pins / "ctl"), 1, _CTL_SIZE)
            self._bits = _mmap_map(str(self._pins / "bits"), 2 * self._geo.words, 8)
            self._qbits = _mmap_map(str(self._pins / "qbits"), 2 * self._geo.words, 8)
        except TrackerError as exc:
            raise TrackingLost(f"{device}: pinned tracker is incomplete ({exc})") from None

    # -- state ----------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        state = read_json(self._state_path)
        if state.get("version") != STATE_VERSION:
            raise TrackingLost(
                f"{self.device}: tracked by another version of nbdsink (state version "
                f"{state.get('version')}); start tracking again to replace it"
            )
        try:
            with libbpf.opened(str(self._pins / "ctl")) as fd:
                ctl_id = libbpf.obj_id(fd)
        except TrackerError:
            raise TrackingLost(f"{self.device}: the pinned tracker is gone ({self._pins})") from None
        if ctl_id != state["ctl_id"]:
            # The pins were replaced behind our back: the state describes another tracking.
            raise TrackingLost(f"{self.device}: state {self._state_path} does not match the pins")
        return state

    def tracking_id(self) -> str:
        # Map ids are unique only within one boot: the boot id makes them unique for ever.
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"bpf:{boot}:{self._ctl_id}"

    def _seq(self) -> int:
        return int(struct.unpack_from("<Q", self._ctl, _CTL_SEQ)[0])

    # -- bitmaps --------------------------------------------------------------------------

    def _maps(self, which: str) -> tuple[mmap.mmap, int]:
        return (self._bits, _CTL_OVERFLOW) if which == _DONE else (self._qbits, _CTL_QOVERFLOW)

    def _read_bitmap(self, idx: int, which: str = _DONE) -> list[runs.Run]:
        """Runs marked in bitmap ``idx`` (the whole device if its overflow flag is set).

        The whole bitmap is scanned, with a regular expression over its bytes: C speed, so
        even 2 MiB (1 TiB in 64 KiB chunks) takes about a millisecond, and the program keeps
        no index of its non-zero words to keep right.
        """
        n = self._geo.words
        bits, overflow = self._maps(which)
        with memoryview(bits) as raw:
            data = raw[idx * n * 8 : (idx + 1) * n * 8].tobytes()
        pairs: list[tuple[int, int]] = []
        for m in _NONZERO.finditer(data):
            for w in range(m.start() // 8, (m.end() - 1) // 8 + 1):
                if not pairs or pairs[-1][0] != w:  # two matches may share a word
                    pairs.append((w, int.from_bytes(data[w * 8 : w * 8 + 8], "little")))
        found = runs.from_bitmap_words(pairs)
        if struct.unpack_from("<Q", self._ctl, overflow + 8 * idx)[0] != 0:
            found = [(0, self._geo.chunks)]
        return [(f, min(c, self._geo.chunks - f)) for f, c in found if f < self._geo.chunks]

    def _clear_bitmap(self, idx: int, which: str = _DONE) -> None:
        n = self._geo.words
        bits, overflow = self._maps(which)
        with memoryview(bits) as raw:
            raw[idx * n * 8 : (idx + 1) * n * 8] = bytes(n * 8)
        struct.pack_into("<Q", self._ctl, overflow + 8 * idx, 0)

    def _program_sectors(self) -> tuple[int, int]:
        """(completed, issued) sectors the programs counted, summed over the CPUs."""
        with libbpf.opened(str(self._pins / "pcpu")) as fd:
            values = libbpf.percpu_values(fd, 0, _PCPU_SIZE)
        done = sum(struct.unpack_from("<Q", v, _PCPU_DONE)[0] for v in values)
        issued = sum(struct.unpack_from("<Q", v, _PCPU_ISSUED)[0] for v in values)
        return int(done), int(issued)

    def _audit(self, state: dict[str, Any], gen: int, queued: list[runs.Run]) -> list[runs.Run]:
        """Compare with the kernel's accounting; what must be reported beyond the bitmap.

        Returns nothing when the programs saw every completed sector; the chunks issued in
        the recent generations when some completion went unseen; the whole device when the
        issue-time marks fell short too, or the kernel's accounting was turned off.
        """
        now = time.time()
        keep = [q for q in state["queued"] if now - q[1] <= QUEUED_KEEP_SECONDS]
        keep = keep if len(keep) >= 2 else state["queued"][-2:]
        state["queued"] = [*keep, [gen, now, [list(r) for r in queued]]]
        if not iostat.iostats_enabled(self.name):
            iostat.enable_iostats(self.name)
            log.warning("%s: the kernel's I/O accounting was off, so what the tracker saw "
                        "cannot be checked: reporting the whole device once", self.device)
            state["kernel_base"] = iostat.written_sectors(self.name) - self._program_sectors()[0]
            return [(0, self._geo.chunks)]
        # The kernel's total first, the programs' second (see nbdsink.tracker.iostat).
        kernel = iostat.written_sectors(self.name) - state["kernel_base"]
        done, issued = self._program_sectors()
        result = iostat.audit(kernel, done, issued, state["answered_done"], state["answered_issued"])
        state["answered_done"] = result.answered_done
        state["answered_issued"] = result.answered_issued
        if not result.unseen_done:
            return []
        state["unseen_sectors"] += result.unseen_done
        state["unseen_events"] += 1
        if result.unseen_issued:
            log.warning("%s: %d written sectors completed unseen by the tracker, and their "
                        "issue too: reporting the whole device", self.device, result.unseen_done)
            return [(0, self._geo.chunks)]
        log.warning("%s: %d written sectors completed unseen by the tracker: reporting every "
                    "chunk issued in the last %d generations", self.device, result.unseen_done,
                    len(state["queued"]))
        return runs.union(*[[(f, n) for f, n in q[2]] for q in state["queued"]])

    def _flip_and_wait(self) -> None:
        with libbpf.opened(str(self._pins / "flip")) as fd:
            libbpf.test_run(fd)
        # Each CPU's counter must be seen at 0 once after the flip; CPUs already seen idle
        # need no second look (see the program's comment).
        deadline = time.monotonic() + _WAIT_TIMEOUT
        spins = 0
        with libbpf.opened(str(self._pins / "pcpu")) as fd:
            busy = set(range(len(libbpf.percpu_values(fd, 0, _PCPU_SIZE))))
            while True:
                values = libbpf.percpu_values(fd, 0, _PCPU_SIZE)
                busy = {cpu for cpu in busy if struct.unpack_from("<Q", values[cpu])[0] != 0}
                if not busy:
                    return
                spins += 1
                if time.monotonic() > deadline:
                    raise TrackerError(
                        f"{self.device}: tracker programs did not drain within {_WAIT_TIMEOUT}s "
                        "(nothing is lost; retry the checkpoint)"
                    )
                time.sleep(0 if spins < 100 else 0.0005)

    def _misses(self) -> int:
        # Only the b copies: a run of a skipped by the kernel is handled by b (see the
        # program's comment); an event both copies miss always shows in b's counter.
        total = 0
        for p in sorted(self._pins.glob("prog_*_b")):
            with libbpf.opened(str(p)) as fd:
                total += libbpf.recursion_misses(fd)
        return total

    def _close_generation(self, state: dict[str, Any], gen: int,
                          extra: list[runs.Run] | None = None) -> None:
        """Persist closed generation ``gen`` (bitmap ``(gen - 1) & 1``, plus ``extra``), then
        clear it."""
        idx = (gen - 1) & 1
        found = runs.union(self._read_bitmap(idx), extra or [])
        if state.get("audited"):
            queued = self._read_bitmap(idx, _ISSUED)
            found = runs.union(found, self._audit(state, gen, queued))
        misses = self._misses()
        if misses != state["misses"]:
            # The kernel skipped a run of a b copy (completions nested two deep on one CPU,
            # or one interrupting b itself): that write may be unknown. It may belong to the
            # closed or to the open generation, so both are marked entirely dirty.
            found = [(0, self._geo.chunks)]
            struct.pack_into("<Q", self._ctl, _CTL_OVERFLOW + 8 * (idx ^ 1), 1)
            state["misses"] = misses
        state["pending"].append([gen, [list(r) for r in found]])
        state["last_closed"] = gen
        write_json(self._state_path, state)
        self._clear_bitmap(idx)
        self._clear_bitmap(idx, _ISSUED)

    # -- Tracker --------------------------------------------------------------------------

    def checkpoint(self) -> DirtySet:
        with locked(_lock_file(self.name)):
            state = self._load_state()
            seq = self._seq()
            if state["last_closed"] == seq - 1:
                # A flip whose generation was never persisted (crash mid-checkpoint).
                self._close_generation(state, seq)
            elif state["last_closed"] != seq:
                raise TrackingLost(
                    f"{self.device}: state says generation {state['last_closed']} was closed "
                    f"last, the kernel says {seq}: rescan needed"
                )
            # The bitmap about to become current holds bits only after a crash between saving
            # and clearing a generation: they were saved then, and are reported once more
            # with this generation (over-reporting beats ever losing a mark).
            spare = (seq + 1) & 1
            stale = self._read_bitmap(spare)
            self._clear_bitmap(spare)
            self._clear_bitmap(spare, _ISSUED)
            self._flip_and_wait()
            gen = seq + 1
            self._close_generation(state, gen, stale)
            return DirtySet(gen, self.chunk_size, self._report(state))

    def _report(self, state: dict[str, Any]) -> list[tuple[int, int]]:
        pending = [[(f, n) for f, n in r] for g, r in state["pending"] if g > state["acked"]]
        return runs.to_extents(runs.union(*pending), self.chunk_size, self.device_size)

    def acknowledge(self, generation: int) -> None:
        with locked(_lock_file(self.name)):
            state = self._load_state()
            if generation > state["last_closed"]:
                raise TrackerError(
                    f"{self.device}: cannot acknowledge generation {generation}: the last "
                    f"checkpoint closed {state['last_closed']}"
                )
            if generation <= state["acked"]:
                return
            state["acked"] = generation
            state["pending"] = [p for p in state["pending"] if p[0] > generation]
            write_json(self._state_path, state)

    def status(self) -> TrackerStatus:
        state = self._load_state()
        live = self._read_bitmap(self._seq() & 1)
        pending = [[(f, n) for f, n in r] for _, r in state["pending"]]
        dirty = runs.to_extents(runs.union(live, *pending), self.chunk_size, self.device_size)
        return TrackerStatus(
            device=state["device"],
            backend=BACKEND,
            chunk_size=self.chunk_size,
            generation=self._seq() + 1,
            dirty_bytes=sum(n for _, n in dirty),
            unseen_sectors=int(state.get("unseen_sectors", 0)),
        )

    def stop(self) -> None:
        with locked(_lock_file(self.name)):
            self.close()
            _remove_pins(self._pins)
            self._state_path.unlink(missing_ok=True)
        _lock_file(self.name).unlink(missing_ok=True)

    def close(self) -> None:
        """Release this handle's mappings (tracking continues)."""
        for m in (self._ctl, self._bits, self._qbits):
            if not m.closed:
                m.close()


def stop_leftovers(name: str) -> None:
    """Remove pins and state of ``name`` whatever their condition (cleanup after failures)."""
    with locked(_lock_file(name)):
        _remove_pins(_pin_dir(name))
        _state_file(name).unlink(missing_ok=True)
    _lock_file(name).unlink(missing_ok=True)


# The registry's backend functions (see nbdsink.tracker.registry).
start = start_bpf
attach = open_bpf
