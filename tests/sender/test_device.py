"""O_DIRECT reads of a real loop device: the bytes on the device, errors when it shrinks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nbdsink.sender.device import Device
from nbdsink.sender.errors import DeviceError

from .helpers import loop_device, make_image

MiB = 1 << 20


def test_reads_what_was_written_through_the_device(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", 8 * MiB)
    with loop_device(img) as dev:
        data = os.urandom(3 * MiB)
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 2 * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        with Device(dev) as d:
            assert d.is_block and d.size == 8 * MiB and d.logical_block in (512, 4096)
            assert d.pread(3 * MiB, 2 * MiB) == data
            assert d.pread(65536, 0) == bytes(65536)
            # Reads bigger than the reusable buffer grow it.
            assert d.pread(5 * MiB, 0)[2 * MiB :] == data


def test_a_device_that_shrinks_is_a_clear_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", 8 * MiB)
    with loop_device(img) as dev, Device(dev) as d:
        os.truncate(img, 0)
        subprocess.run(["losetup", "-c", dev], check=True)
        assert d.current_size() == 0
        with pytest.raises(DeviceError, match=r"device ended|removed or shrunk"):
            d.pread(65536, 4 * MiB)


def test_missing_device(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="cannot open"):
        Device(str(tmp_path / "nope"))
