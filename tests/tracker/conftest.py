"""Fixtures for the tracker tests: loop devices, partitions, zram, and guaranteed cleanup.

Every device made here is removed after its test, and every tracker left on it (pinned BPF
objects, scan state) is stopped, whatever the test did.
"""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from nbdsink.tracker import bpf, scan

RATIOS: list[tuple[str, float]] = []


def _cleanup_trackers(device: str) -> None:
    name = Path(os.path.realpath(device)).name
    for part in [name, *[p.name for p in Path(f"/sys/class/block/{name}").glob(f"{name}p*")]]:
        if (bpf.PIN_ROOT / part).exists() or (bpf.STATE_DIR / f"{part}.json").exists():
            bpf.stop_leftovers(part)
        d = scan.state_root() / part
        if d.exists():
            subprocess.run(["rm", "-rf", str(d)], check=False)


def _detach(loop: str) -> None:
    for _ in range(50):
        if subprocess.run(["losetup", "-d", loop], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """``make_loop(size, partitions=None)``: a loop device over a file in tmp_path.

    With ``partitions`` (a list of (start_sector, sectors)) an MBR is written first and the
    loop device is made with partition scanning; the caller uses ``<loop>p1`` etc.
    """
    loops: list[str] = []

    def make(size: int, partitions: list[tuple[int, int]] | None = None) -> str:
        img = tmp_path / f"disk{len(loops)}.img"
        with open(img, "wb") as f:
            f.truncate(size)
            if partitions:
                f.seek(446)
                for start, sectors in partitions:
                    f.write(struct.pack("<B3sB3sII", 0, b"\0\0\0", 0x83, b"\0\0\0", start, sectors))
                f.seek(510)
                f.write(b"\x55\xaa")
        args = ["losetup", "-f", "--show"] + (["-P"] if partitions else []) + [str(img)]
        loop = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
        loops.append(loop)
        if partitions and not os.path.exists(f"{loop}p1"):
            # Kernels without the msdos partition parser: partx reads the table and adds the
            # partitions with the BLKPG ioctl.
            subprocess.run(["partx", "-a", loop], check=True, capture_output=True)
        return loop

    try:
        yield make
    finally:
        for loop in loops:
            _cleanup_trackers(loop)
            _detach(loop)


@pytest.fixture
def zram() -> Generator[Callable[[int], str], None, None]:
    """``zram(size)``: a fresh zram device, a bio-based disk (like device-mapper and md)."""
    made: list[int] = []

    def make(size: int) -> str:
        n = int(Path("/sys/class/zram-control/hot_add").read_text())
        made.append(n)
        Path(f"/sys/block/zram{n}/disksize").write_text(str(size))
        return f"/dev/zram{n}"

    try:
        yield make
    finally:
        for n in made:
            _cleanup_trackers(f"/dev/zram{n}")
            for _ in range(50):
                try:
                    Path("/sys/class/zram-control/hot_remove").write_text(str(n))
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    p = tmp_path / "mnt"
    p.mkdir()
    return p


@pytest.fixture
def record_ratio(request: pytest.FixtureRequest) -> Callable[[float], None]:
    """Record a test's over-reporting ratio for the summary printed at the end."""

    def record(ratio: float) -> None:
        RATIOS.append((request.node.name, ratio))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RATIOS:
        terminalreporter.section("tracker over-reporting (reported / truly changed chunks)")
        for name, ratio in RATIOS:
            terminalreporter.write_line(f"{name}: {ratio:.2f}")
