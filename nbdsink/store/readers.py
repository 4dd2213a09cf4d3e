"""Which versions are being read right now, across processes: open-file-description locks.

A connection reading version V holds a shared lock on one byte of ``readers.lock`` in the
store directory (offset: volume id and V). Pruning V first takes an exclusive lock on that
byte without waiting: when a reader holds it, V is kept for now ("open reader") and pruned
by a later pass. OFD locks belong to the open file, not the process, so connections of one
server exclude each other's pruning too, and the kernel drops them when a process dies:
nothing to clean up after a crash.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

LOCK_FILE = "readers.lock"
_VERSION_BITS = 40


def _offset(volume_id: int, version: int) -> int:
    return (volume_id << _VERSION_BITS) | (version & ((1 << _VERSION_BITS) - 1))


def _lock(fd: int, kind: int, offset: int, wait: bool) -> bool:
    # struct flock: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid (int, 0 for OFD)
    arg = struct.pack("hhqqi", kind, os.SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK, arg)
    except (BlockingIOError, PermissionError):
        return False
    return True


class ReaderLock:
    """A reader's hold on (volume, version); :meth:`release` (or closing) ends it."""

    def __init__(self, store_dir: Path, volume_id: int, version: int) -> None:
        self._fd = -1
        self._fd = os.open(store_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        # Waits while a prune of this very version holds it: the caller then finds the
        # version gone and says so.
        _lock(self._fd, fcntl.F_RDLCK, _offset(volume_id, version), wait=True)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        # A reader dropped without release() (a session nobody closed) must not keep its
        # version from being pruned for the rest of the process.
        self.release()


class PruneLock:
    """An exclusive hold on (volume, version) for pruning it, if no reader holds it."""

    def __init__(self, store_dir: Path) -> None:
        self._fd = os.open(store_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def try_take(self, volume_id: int, version: int) -> bool:
        return _lock(self._fd, fcntl.F_WRLCK, _offset(volume_id, version), wait=False)

    def give_back(self, volume_id: int, version: int) -> None:
        _lock(self._fd, fcntl.F_UNLCK, _offset(volume_id, version), wait=False)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
