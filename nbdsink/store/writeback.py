"""Start the kernel's writeback of a commit's pages while LMDB is still writing them.

An LMDB commit ``write()``s its dirty pages into the page cache and then ``fdatasync()``s:
the disk idles while the pages are copied, and the CPU idles while the disk writes. The
kernel would not start writing on its own (dirty pages stay far below its background
threshold), so while a commit runs, a helper thread asks it every few milliseconds to start
writing what is dirty (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait). The
copy and the disk then overlap, and the fdatasync has less left to wait for.

This changes no ordering that durability relies on: LMDB writes the meta page only after
the fdatasync of the data pages has returned, so starting data writeback earlier can never
put a meta page on disk ahead of the pages it points to.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

SYNC_FILE_RANGE_WRITE = 2
KICK_INTERVAL = 0.004
"""Seconds between two requests to start writeback while a commit runs."""

_libc: ctypes.CDLL | None
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except (OSError, AttributeError):  # not Linux/glibc: commits still work, only slower
    _libc = None


class WritebackKicker:
    """While :meth:`during` is active, keep starting writeback of ``path``'s dirty pages.

    Used under the store's write lock, so :meth:`during` never runs twice at once.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._active = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def during(self) -> Iterator[None]:
        """Kick writeback for as long as the ``with`` block runs (a commit)."""
        if _libc is None or not self._start():
            yield
            return
        self._active.set()
        try:
            yield
        finally:
            self._active.clear()

    def _start(self) -> bool:
        if self._thread is not None:
            return True
        try:
            # An fd of our own: writeback is per file, whichever descriptor asks for it.
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        self._thread = threading.Thread(target=self._run, name="nbdsink-writeback",
                                        daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        fd = self._fd
        assert fd is not None
        while True:
            self._active.wait()
            if self._stop:
                return
            # The ctypes call releases the GIL; a failure only means no head start.
            _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
            time.sleep(KICK_INTERVAL)

    def close(self) -> None:
        """Stop the helper thread and close its descriptor."""
        if self._thread is not None:
            self._stop = True
            self._active.set()
            self._thread.join()
            self._thread = None
            self._active.clear()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
