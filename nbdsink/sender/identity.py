"""Which device a path names: a stable identity of a block device, read from sysfs.

Names like ``/dev/sdb`` or ``/dev/loop3`` are handed out at boot or attach time: after a
reboot ``/dev/sdb`` may be another disk of the same size, and ``/dev/loop3`` another image.
A sender that trusted the name would then replicate the other disk into the volume, and
every version made after that would hold the wrong device. So the state directory keeps the
device's identity from the first session, and a session refuses a device whose identity
changed (``--device-replaced`` accepts a replacement on purpose).

The identity is what the device says about itself, whatever its name:

* a loop device: its backing file (path, and the file's device and inode) and offset;
* a device-mapper device: its dm UUID (LVM, dm-crypt and multipath set one), else its name;
* an md array: its array UUID;
* a disk: its WWID or serial number (SCSI, SATA, NVMe, virtio disks given a serial);
* a partition: its disk's identity, its number and its first sector;
* failing those, what udev recorded (``ID_WWN``, ``ID_SERIAL``, ``ID_PART_ENTRY_UUID``).

A device that offers none of these (a virtio disk without a serial, an NBD device, a
regular file) has no identity: :func:`device_identity` returns None and nothing is checked.
"""

from __future__ import annotations

import os
from pathlib import Path

from nbdsink.tracker.blockdev import block_numbers

SYS_DEV_BLOCK = Path("/sys/dev/block")
UDEV_DATA = Path("/run/udev/data")
_UDEV_KEYS = ("DM_UUID", "MD_UUID", "ID_WWN_WITH_EXTENSION", "ID_WWN", "ID_SERIAL",
              "ID_PART_ENTRY_UUID")


def device_identity(path: str) -> str | None:
    """A stable, human-readable identity of the block device at ``path``; None when it is
    not a block device or says nothing stable about itself."""
    numbers = block_numbers(path)
    if numbers is None:
        return None
    major, minor = numbers
    try:
        sysdir = (SYS_DEV_BLOCK / f"{major}:{minor}").resolve(strict=True)
    except OSError:
        return None
    if (sysdir / "partition").exists():
        disk = _own_identity(sysdir.parent)
        number, start = _read(sysdir / "partition"), _read(sysdir / "start")
        if disk is not None and number and start:
            return f"{disk} partition {number} at sector {start}"
        return _udev_identity(major, minor)
    return _own_identity(sysdir) or _udev_identity(major, minor)


def _own_identity(sysdir: Path) -> str | None:
    """What a whole device (not a partition) says about itself in sysfs."""
    loop = sysdir / "loop"
    if loop.is_dir():
        backing = _read(loop / "backing_file")
        if not backing:
            return None
        offset = _read(loop / "offset") or "0"
        try:
            # A file replaced by another under the same path is another device.
            fst = os.stat(backing)
            return f"loop file {backing} (inode {fst.st_dev}:{fst.st_ino}) offset {offset}"
        except OSError:
            return f"loop file {backing} offset {offset}"
    dm = sysdir / "dm"
    if dm.is_dir():
        uuid = _read(dm / "uuid")
        if uuid:
            return f"dm uuid {uuid}"
        name = _read(dm / "name")
        return f"dm name {name}" if name else None
    md_uuid = _read(sysdir / "md" / "uuid")
    if md_uuid:
        return f"md uuid {md_uuid}"
    for wwid in (sysdir / "wwid", sysdir / "device" / "wwid"):
        value = _read(wwid)
        if value:
            return f"wwid {value}"
    for serial in (sysdir / "serial", sysdir / "device" / "serial"):
        value = _read(serial)
        if value:
            return f"serial {value}"
    return None


def _udev_identity(major: int, minor: int) -> str | None:
    """What udev recorded about the device (when udev runs)."""
    try:
        lines = (UDEV_DATA / f"b{major}:{minor}").read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = dict(line[2:].split("=", 1) for line in lines
                 if line.startswith("E:") and "=" in line)
    for key in _UDEV_KEYS:
        if found.get(key):
            return f"udev {key} {found[key]}"
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""
