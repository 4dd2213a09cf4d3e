"""A writable view of a version whose writes live only for one connection (``VOL@N;scratch``).

What a DR drill or a test boot needs: attach a version, let the filesystem replay its journal
or a database start, and throw every change away at disconnect. The changed blocks go to an
anonymous temporary file beside the store (unlinked from the start, so nothing is left after
a crash and memory stays bounded: the page cache holds what fits); everything else is read
from the version.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from nbdsink.store import Store, VolumeInfo
from nbdsink.store.head import read_into

SCRATCH_DIR = "scratch"


class ScratchOverlay:
    """One connection's private changes over ``volume`` at ``version``."""

    def __init__(self, store: Store, volume: VolumeInfo, version: int) -> None:
        self.store = store
        self.volume = volume
        self.version = version
        where = Path(store.path) / SCRATCH_DIR
        where.mkdir(exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=where)  # noqa: SIM115 - closed in close()
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()

    def _read_block_into(self, block: int, buf: memoryview) -> None:
        """``buf`` (a whole block, or the volume's shorter last one) of ``block``."""
        slot = self._slots.get(block)
        if slot is not None:
            got = os.preadv(self._file.fileno(), [buf], slot * self.volume.block_size)
            if got != len(buf):
                raise OSError(f"scratch file short read ({got} of {len(buf)} bytes)")
        else:
            read_into(self.store, self.volume, self.version, buf, block * self.volume.block_size)

    def pread(self, buf: memoryview, offset: int) -> None:
        bs = self.volume.block_size
        with self._lock:
            slots = dict(self._slots)
        if not slots:
            read_into(self.store, self.volume, self.version, buf, offset)
            return
        pos = 0
        while pos < len(buf):
            at = offset + pos
            block = at // bs
            n = min(len(buf) - pos, (block + 1) * bs - at)
            if block in slots:
                piece = bytearray(min(bs, self.volume.size - block * bs))
                self._read_block_into(block, memoryview(piece))
                start = at - block * bs
                buf[pos : pos + n] = piece[start : start + n]
            else:
                # Up to the next changed block, straight from the version.
                end = at + n
                nxt = block + 1
                while end < offset + len(buf) and nxt not in slots:
                    end = min(offset + len(buf), (nxt + 1) * bs)
                    nxt += 1
                n = end - at
                read_into(self.store, self.volume, self.version, buf[pos : pos + n], at)
            pos += n

    def pwrite(self, data: memoryview | None, length: int, offset: int) -> None:
        """Write ``data`` (None: zeros) of ``length`` bytes at ``offset``."""
        bs = self.volume.block_size
        pos = 0
        with self._lock:
            while pos < length:
                at = offset + pos
                block = at // bs
                size = min(bs, self.volume.size - block * bs)
                start = at - block * bs
                n = min(length - pos, size - start)
                piece = bytearray(size)
                if n < size:
                    self._read_block_into(block, memoryview(piece))
                if data is not None:
                    piece[start : start + n] = data[pos : pos + n]
                else:
                    piece[start : start + n] = bytes(n)
                slot = self._slots.get(block)
                if slot is None:
                    slot = self._slots[block] = len(self._slots)
                os.pwrite(self._file.fileno(), piece, slot * bs)
                pos += n

    def close(self) -> None:
        self._file.close()  # unlinked from the start: nothing stays behind
