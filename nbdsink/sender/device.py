"""The source device, read with O_DIRECT into aligned buffers.

A buffered read of a block device that is being written through a filesystem can return
stale blocks from the page cache; O_DIRECT goes to the device. O_DIRECT needs the buffer,
offset and length aligned to the logical block size: buffers come from anonymous ``mmap``
(page aligned) and every read is a whole number of chunks, the last one ending at the end
of the device (whose size is a multiple of the logical block size).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence

from nbdsink.sender.errors import DeviceError

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t)
BLKSSZGET = 0x1268  # _IO(0x12, 104)


class Device:
    """An open source device (or, for tests and images, a regular file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(f"cannot open {path}: {exc.strerror}") from exc
        self._local = threading.local()
        try:
            st = os.fstat(self._fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            self.size = device_size(self._fd) if self.is_block else st.st_size
            self.logical_block = logical_block_size(self._fd) if self.is_block else 512
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def current_size(self) -> int:
        """The size now: a loop device detached or a disk resized under us shows here."""
        try:
            if self.is_block:
                return device_size(self._fd)
            return os.fstat(self._fd).st_size
        except OSError as exc:
            raise DeviceError(f"{self.path}: {exc.strerror}") from exc

    def pread(self, length: int, offset: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset`` from the device (blocking; O_DIRECT).

        A short read means the device shrank or went away under us: that is an error, never
        a partial chunk silently sent.
        """
        buf = self._buffer(length)
        view = memoryview(buf)[:length]
        done = 0
        try:
            while done < length:
                n = os.preadv(self._fd, [view[done:]], offset + done)
                if n == 0:
                    raise DeviceError(
                        f"{self.path}: device ended at {offset + done} while reading "
                        f"{length} bytes at {offset} (device removed or shrunk?)"
                    )
                done += n
        except OSError as exc:
            raise DeviceError(
                f"{self.path}: read of {length} bytes at {offset} failed: {exc.strerror}"
            ) from exc
        finally:
            view.release()
        return bytes(memoryview(buf)[:length])

    def pread_many(self, pieces: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read each ``(offset, length)`` of ``pieces`` as :meth:`pread` does (blocking).

        One call for a whole batch of scattered chunks: the caller pays one worker-thread
        round trip per batch instead of one per chunk.
        """
        return [self.pread(length, offset) for offset, length in pieces]

    def _buffer(self, length: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``length`` bytes, one per thread, reused."""
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < length:
            size = max(length, 1 << 20)
            size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
            buf = mmap.mmap(-1, size)
            self._local.buf = buf
        return buf


def device_size(fd: int) -> int:
    out = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("Q", out)[0])


def logical_block_size(fd: int) -> int:
    out = fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4)
    return int(struct.unpack("i", out)[0])
