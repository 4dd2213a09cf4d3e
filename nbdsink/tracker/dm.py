"""The ``dm`` backend: the ``nbdsink`` device-mapper target of ``kmod/dm``.

Tracking a device-mapper device (an LVM volume, a dm-crypt mapping, a plain linear map)
interposes the target under it, online: the device keeps its name and number and may stay
mounted. :func:`start` copies the device's table to a new device ``<name>-nbdsink-origin``,
then reloads the device with one ``nbdsink`` target over the origin (suspend, swap, resume:
in-flight I/O drains first, so no write escapes). :meth:`DmTracker.stop` swaps the original
table back and removes the origin. A table written by hand
(``0 LEN nbdsink DEV CHUNK_SECTORS [META]``) is attached to just the same.

All state lives in the kernel (and, with a metadata device, on it across reboots), so any
process may attach and a killed sender loses nothing. Generations map one to one onto the
target's: :meth:`DmTracker.checkpoint` sends the ``checkpoint`` message and reads the union of
every held generation through ``/dev/nbdsink-dm`` (``kmod/include/nbdsink_dm.h``);
:meth:`DmTracker.acknowledge` sends ``release``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nbdsink.tracker import runs
from nbdsink.tracker.base import (
    AlreadyTracked,
    DirtySet,
    Tracker,
    TrackerError,
    TrackerStatus,
    TrackingLost,
)
from nbdsink.tracker.blockdev import block_numbers, check_chunk_size, probe

BACKEND = "dm"
TARGET = "nbdsink"
MODULE = "dm-nbdsink"
CONTROL = Path("/dev/nbdsink-dm")
ORIGIN_SUFFIX = "-nbdsink-origin"
SECTOR = 512

# struct nbdsink_dm_info / struct nbdsink_dm_bitmap (kmod/include/nbdsink_dm.h), native order.
_INFO = struct.Struct("=IIII12Q")
_BITMAP = struct.Struct("=IIIIQQQQQ2Q")
_IOC_MAGIC = 0xDB
INFO_LOST = 1 << 0
INFO_METADATA = 1 << 1
INFO_META_ERROR = 1 << 2
INFO_SUSPENDED = 1 << 3
BITMAP_UNION = 1 << 0
# Chunks read per ioctl: 1 MiB of bitmap, 8 Mi chunks (512 GiB at 64 KiB chunks).
_PIECE_CHUNKS = 8 << 20
_META_MAGIC = 0x314D44534B44424E
_NONZERO = re.compile(rb"[^\x00]+")


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_IOC_MAGIC << 8) | nr


IOC_INFO = _iowr(0, _INFO.size)
IOC_BITMAP = _iowr(1, _BITMAP.size)


@dataclass(frozen=True)
class TargetInfo:
    """What ``NBDSINK_DM_IOC_INFO`` reports about one target."""

    flags: int
    nr_closed: int
    chunk_sectors: int
    nr_chunks: int
    open_gen: int
    oldest_gen: int
    lost_gen: int
    epoch: int
    dirty_open: int
    dirty_closed: int
    target_sectors: int

    @property
    def lost(self) -> bool:
        return bool(self.flags & INFO_LOST)

    @property
    def chunk_size(self) -> int:
        return self.chunk_sectors * SECTOR

    @property
    def size(self) -> int:
        return self.target_sectors * SECTOR


# -- dmsetup ---------------------------------------------------------------------------------


def _dmsetup(*args: str, check: bool = True, table: str | None = None) -> str:
    """Run dmsetup; ``table`` goes through stdin (never argv: dm-crypt tables hold keys)."""
    try:
        proc = subprocess.run(
            ["dmsetup", *args], input=table, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise TrackerError("dmsetup is not installed (Debian package dmsetup)") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).replace("\n", "; ")
        raise TrackerError(f"dmsetup {' '.join(args)}: {detail}")
    return proc.stdout


def _table(name: str, keys: bool = False) -> list[list[str]]:
    args = ("table", "--showkeys", name) if keys else ("table", name)
    return [line.split() for line in _dmsetup(*args).splitlines() if line.strip()]


def _is_nbdsink_table(table: list[list[str]]) -> bool:
    return len(table) == 1 and len(table[0]) >= 5 and table[0][2] == TARGET


def _dm_name(major: int, minor: int) -> str | None:
    try:
        return Path(f"/sys/dev/block/{major}:{minor}/dm/name").read_text().strip()
    except OSError:
        return None


def _exists(name: str) -> bool:
    return subprocess.run(["dmsetup", "info", name], capture_output=True, check=False).returncode == 0


def ensure_module() -> None:
    """Load ``dm-nbdsink`` unless its control device is already there."""
    if CONTROL.exists():
        return
    proc = subprocess.run(["modprobe", MODULE], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not CONTROL.exists():
        raise TrackerError(
            f"the nbdsink device-mapper target is not available (modprobe {MODULE}: "
            f"{proc.stderr.strip() or 'no ' + str(CONTROL)}); build and install it with "
            "'make -C kmod/dm install' or the DKMS package (deploy/dkms)"
        )


# -- the control device --------------------------------------------------------------------


def read_info(major: int, minor: int) -> TargetInfo:
    """The target's state, from ``/dev/nbdsink-dm`` (``ENODEV``: not an nbdsink device)."""
    buf = bytearray(_INFO.pack(major, minor, *([0] * 14)))
    _ioctl(IOC_INFO, buf)
    v = _INFO.unpack(buf)
    return TargetInfo(
        flags=v[2], nr_closed=v[3], chunk_sectors=v[4], nr_chunks=v[5], open_gen=v[6],
        oldest_gen=v[7], lost_gen=v[8], epoch=v[9], dirty_open=v[10], dirty_closed=v[11],
        target_sectors=v[12],
    )  # fmt: skip


def read_runs(
    major: int, minor: int, generation: int, nr_chunks: int, union: bool = True
) -> list[runs.Run]:
    """Chunks set in ``generation`` (with ``union``: in every held generation up to it)."""
    out: list[runs.Run] = []
    piece = min(_PIECE_CHUNKS, -(-nr_chunks // 64) * 64)
    buf = ctypes.create_string_buffer(piece // 8)
    first = 0
    while first < nr_chunks:
        req = bytearray(
            _BITMAP.pack(major, minor, BITMAP_UNION if union else 0, 0, generation, first, piece,
                         ctypes.addressof(buf), 0, 0, 0)
        )  # fmt: skip
        _ioctl(IOC_BITMAP, req)
        fields = _BITMAP.unpack(req)
        got, dirty = fields[6], fields[8]
        if got == 0:
            break
        if dirty:
            data = buf.raw[: -(-got // 64) * 8]
            base = first // 64
            pairs: list[tuple[int, int]] = []
            # Find the non-zero stretches at C speed; a mostly clean bitmap costs little.
            for m in _NONZERO.finditer(data):
                for w in range(m.start() // 8, (m.end() - 1) // 8 + 1):
                    v = int.from_bytes(data[w * 8 : w * 8 + 8], "little")
                    if v and (not pairs or pairs[-1][0] != base + w):
                        pairs.append((base + w, v))
            out.extend(runs.from_bitmap_words(pairs))
        first += got
    return runs.normalize(out)


def _ioctl(request: int, buf: bytearray) -> None:
    try:
        fd = os.open(CONTROL, os.O_RDWR)
    except FileNotFoundError:
        raise TrackerError(f"{CONTROL} is missing: the dm-nbdsink module is not loaded") from None
    except PermissionError:
        raise TrackerError(f"{CONTROL}: permission denied (root needed)") from None
    try:
        fcntl.ioctl(fd, request, buf)
    finally:
        os.close(fd)


# -- starting, attaching ---------------------------------------------------------------------


@dataclass(frozen=True)
class _DmDevice:
    path: str
    name: str
    major: int
    minor: int
    size: int


def _dm_device(device: str) -> _DmDevice:
    dev = probe(device)
    name = _dm_name(dev.major, dev.minor)
    if name is None:
        raise TrackerError(
            f"{device} is not a device-mapper device: the dm backend tracks device-mapper "
            "devices (LVM volumes, dm-crypt, linear maps). Map it first (dmsetup create NAME "
            f"--table '0 {dev.size // SECTOR} linear {device} 0') and use /dev/mapper/NAME, "
            "or use the bpf backend"
        )
    return _DmDevice(device, name, dev.major, dev.minor, dev.size)


def start(device: str, chunk_size: int, metadata: str | None = None) -> DmTracker:
    """Interpose the ``nbdsink`` target under dm device ``device``; tracking starts now.

    ``metadata``: a device (4 KiB + 17 bitmaps long) where clean stops keep the bitmaps, so
    tracking survives a reboot; old nbdsink metadata on it is discarded (a new history).
    """
    check_chunk_size(chunk_size)
    dm = _dm_device(device)
    check_chunk_size(chunk_size, probe(device))
    ensure_module()
    table = _table(dm.name)
    if _is_nbdsink_table(table):
        raise AlreadyTracked(f"{device} is already tracked by the dm backend; stop it first")
    if dm.name.endswith(ORIGIN_SUFFIX):
        raise TrackerError(f"{device} is the origin of a tracked device; track that one")
    origin = dm.name + ORIGIN_SUFFIX
    if _exists(origin):
        # Left by a start that died before the swap: nothing uses it yet.
        _dmsetup("remove", origin)
    if metadata is not None:
        _forget_old_metadata(metadata)
    sectors = dm.size // SECTOR
    original = "\n".join(" ".join(t) for t in _table(dm.name, keys=True)) + "\n"
    _dmsetup("create", origin, table=original)
    try:
        line = f"0 {sectors} {TARGET} /dev/mapper/{origin} {chunk_size // SECTOR}"
        if metadata is not None:
            line += f" {metadata}"
        _dmsetup("reload", dm.name, table=line + "\n")
        try:
            _dmsetup("resume", dm.name)
        except TrackerError:
            _dmsetup("clear", dm.name, check=False)
            _dmsetup("resume", dm.name, check=False)
            raise
    except TrackerError:
        _dmsetup("remove", origin, check=False)
        raise
    return DmTracker(device)


def _forget_old_metadata(path: str) -> None:
    """Zero the header of stale nbdsink metadata; leave anything else for the target to judge."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        raise TrackerError(f"metadata device {path}: {exc.strerror}") from None
    try:
        buf = mmap.mmap(-1, 4096)
        if os.preadv(fd, [buf], 0) == 4096 and struct.unpack_from("<Q", buf)[0] == _META_MAGIC:
            buf[:] = bytes(4096)
            os.pwritev(fd, [buf], 0)
            os.fsync(fd)
        buf.close()
    finally:
        os.close(fd)


def attach(device: str) -> DmTracker:
    """A handle on the existing tracking of ``device`` (any process may hold one)."""
    return DmTracker(device)


def tracked_names() -> list[str]:
    """Kernel names (``dm-N``) of every device whose table is an nbdsink target."""
    out = _dmsetup("ls", "--target", TARGET, check=False)
    names: list[str] = []
    for line in out.splitlines():
        if "(" not in line:
            continue  # "No devices found"
        numbers = line.rsplit("(", 1)[1].rstrip(")").replace(",", ":").replace(" ", "")
        try:
            names.append(Path(f"/sys/dev/block/{numbers}").resolve(strict=True).name)
        except OSError:
            continue
    return sorted(names)


class DmTracker(Tracker):
    """One device tracked by the nbdsink target."""

    backend = BACKEND

    def __init__(self, device: str) -> None:
        dm = _dm_device(device)
        if not CONTROL.exists() or not _is_nbdsink_table(_table(dm.name)):
            raise TrackerError(f"{device} is not tracked by the dm backend")
        self.device = device
        self.name = dm.name
        self._major, self._minor = dm.major, dm.minor
        info = self._info()
        self.chunk_size = info.chunk_size
        self.device_size = info.size
        self._epoch = info.epoch

    def tracking_id(self) -> str:
        return f"dm:{self._epoch:016x}"

    def _info(self) -> TargetInfo:
        try:
            return read_info(self._major, self._minor)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise TrackingLost(f"{self.device}: the nbdsink target is gone") from None
            raise TrackerError(f"{self.device}: {CONTROL}: {exc.strerror}") from None

    def _same_history(self, info: TargetInfo) -> None:
        if info.epoch != self._epoch:
            raise TrackingLost(
                f"{self.device}: the nbdsink target was replaced (tracking history "
                f"{self._epoch:016x} became {info.epoch:016x}): rescan needed"
            )

    def checkpoint(self) -> DirtySet:
        out = _dmsetup("message", self.name, "0", "checkpoint").strip()
        try:
            generation = int(out)
        except ValueError:
            raise TrackerError(f"{self.device}: unexpected checkpoint reply {out!r}") from None
        info = self._info()
        self._same_history(info)
        if info.lost:
            raise TrackingLost(
                f"{self.device}: the nbdsink target lost track of writes (unclean stop or "
                f"unreadable metadata, before generation {info.lost_gen} closed): rescan needed"
            )
        try:
            found = read_runs(self._major, self._minor, generation, info.nr_chunks)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                # Released meanwhile by another handle: it was acknowledged, nothing is held.
                found = []
            else:
                raise TrackerError(f"{self.device}: reading generation {generation}: {exc.strerror}") from None
        return DirtySet(generation, self.chunk_size, runs.to_extents(found, self.chunk_size, self.device_size))

    def acknowledge(self, generation: int) -> None:
        info = self._info()
        self._same_history(info)
        if generation >= info.open_gen:
            raise TrackerError(
                f"{self.device}: cannot acknowledge generation {generation}: the last "
                f"checkpoint closed {info.open_gen - 1}"
            )
        if generation < info.oldest_gen and not info.lost:
            return  # already released: acknowledging again forgets nothing more
        _dmsetup("message", self.name, "0", "release", str(generation))

    def status(self) -> TrackerStatus:
        info = self._info()
        return TrackerStatus(
            device=self.device,
            backend=BACKEND,
            chunk_size=self.chunk_size,
            generation=info.open_gen,
            dirty_bytes=min(self.device_size, (info.dirty_open + info.dirty_closed) * self.chunk_size),
        )

    def info(self) -> TargetInfo:
        """The target's full state (flags, generations, metadata), for diagnostics."""
        return self._info()

    def stop(self) -> None:
        """Swap the original table back (removing the origin device), or a linear map."""
        table = _table(self.name)
        if not _is_nbdsink_table(table):
            return
        under = table[0][3]
        origin = _origin_name(under)
        if origin is not None:
            restored = "\n".join(" ".join(t) for t in _table(origin, keys=True))
        else:
            restored = f"0 {table[0][1]} linear {under} 0"
        _dmsetup("reload", self.name, table=restored + "\n")
        _dmsetup("resume", self.name)
        if origin is not None:
            _dmsetup("remove", origin)


def _origin_name(dev: str) -> str | None:
    """The origin device's dm name if ``dev`` (``major:minor`` or a path) is one of ours."""
    if ":" in dev and not dev.startswith("/"):
        major, minor = (int(x) for x in dev.split(":"))
    else:
        numbers = block_numbers(dev)
        if numbers is None:
            return None
        major, minor = numbers
    name = _dm_name(major, minor)
    return name if name is not None and name.endswith(ORIGIN_SUFFIX) else None
