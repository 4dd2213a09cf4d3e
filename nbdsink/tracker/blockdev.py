"""What a tracker needs to know about a block device, read from sysfs.

A partition is tracked on its whole disk: the kernel reports I/O against the disk with
absolute sectors, so a tracker needs the disk's device number and the partition's sector range.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nbdsink.tracker.base import TrackerError

SYSFS_BLOCK = Path("/sys/class/block")


@dataclass(frozen=True)
class BlockDevice:
    """A block device (whole disk or partition) as the kernel sees it."""

    path: str
    """The path the user gave (``/dev/sdb1``, ``/dev/mapper/vg-lv`` ...)."""
    name: str
    """The kernel's name (``sdb1``, ``dm-3``): stable key for pins and state files."""
    major: int
    minor: int
    disk_major: int
    disk_minor: int
    start_sector: int
    """First 512-byte sector of this device on its disk (0 for a whole disk)."""
    size: int
    """Size in bytes."""
    logical_block_size: int
    request_based: bool
    """True for blk-mq devices (loop, virtio, nvme, scsi); False for bio-based (dm, md, zram)."""

    @property
    def nr_sectors(self) -> int:
        return self.size // 512


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _dev_numbers(path: Path) -> tuple[int, int]:
    major, minor = path.read_text().strip().split(":")
    return int(major), int(minor)


def block_numbers(path: str) -> tuple[int, int] | None:
    """``(major, minor)`` of the block device at ``path``; None when there is none there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def probe(device: str) -> BlockDevice:
    """Describe ``device``; a clear :class:`TrackerError` if it is not a block device."""
    try:
        st = os.stat(device)
    except FileNotFoundError:
        raise TrackerError(f"{device}: no such device") from None
    except OSError as exc:
        raise TrackerError(f"{device}: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise TrackerError(f"{device}: not a block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    try:
        sysdir = sys_dev.resolve(strict=True)
    except OSError:
        raise TrackerError(f"{device}: block device {major}:{minor} is not in sysfs") from None
    name = sysdir.name
    is_partition = (sysdir / "partition").exists()
    diskdir = sysdir.parent if is_partition else sysdir
    disk_major, disk_minor = _dev_numbers(diskdir / "dev")
    start = _read_int(sysdir / "start") if is_partition else 0
    size = _read_int(sysdir / "size") * 512
    lbs = _read_int(diskdir / "queue" / "logical_block_size")
    return BlockDevice(
        path=device,
        name=name,
        major=major,
        minor=minor,
        disk_major=disk_major,
        disk_minor=disk_minor,
        start_sector=start,
        size=size,
        logical_block_size=lbs,
        request_based=(diskdir / "mq").is_dir(),
    )


def check_chunk_size(chunk_size: int, dev: BlockDevice | None = None) -> None:
    """A chunk is a power of two, at least 4 KiB (and the logical block), at most 64 MiB."""
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise TrackerError(f"chunk size {chunk_size} is not a power of two")
    if not 4096 <= chunk_size <= 64 << 20:
        raise TrackerError(f"chunk size {chunk_size} is outside 4 KiB .. 64 MiB")
    if dev is not None and chunk_size < dev.logical_block_size:
        raise TrackerError(
            f"chunk size {chunk_size} is smaller than {dev.path}'s logical block size "
            f"({dev.logical_block_size})"
        )
