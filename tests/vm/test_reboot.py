"""Tracking across a real crash and reboot: two guest boots sharing virtio disks.

Boot 1 runs two targets with metadata devices, removes one cleanly and crashes the kernel
(sysrq) with the other still active. Boot 2 loads both from their metadata: the clean one
continues exactly where it stopped, the crashed one reports tracking lost.
"""

from __future__ import annotations

import struct
from pathlib import Path

from vm import harness

SECTORS = 32768  # 16 MiB data disks
CHUNK = 128  # 64 KiB

_SETUP = """
set -e
modprobe dm-mod
modprobe virtio_blk
insmod {ko}
dmsetup create clean --table "0 {sectors} nbdsink /dev/vda {chunk} /dev/vdb"
dmsetup create crashed --table "0 {sectors} nbdsink /dev/vdc {chunk} /dev/vdd"
"""

_WRITE = r"""
import mmap, os, sys
from nbdsink.tracker import dm
def write(dev, chunk):
    buf = mmap.mmap(-1, 4096); buf.write(os.urandom(4096))
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
    os.pwritev(fd, [buf], chunk * 65536); os.fsync(fd); os.close(fd)
clean = dm.attach("/dev/mapper/clean")
write("/dev/mapper/clean", 3); write("/dev/mapper/clean", 4)
clean.acknowledge(clean.checkpoint().generation)     # 3, 4: sent and acknowledged
write("/dev/mapper/clean", 10)
print("closed", clean.checkpoint().generation)        # 10: read, never acknowledged
write("/dev/mapper/clean", 20)                        # 20: not even checkpointed
write("/dev/mapper/crashed", 5)
"""

_CHECK = r"""
from nbdsink.tracker import dm
from nbdsink.tracker.base import TrackingLost
clean = dm.attach("/dev/mapper/clean")
got = clean.checkpoint()
print("clean", got.generation, sorted(off // 65536 for off, _ in got.extents))
crashed = dm.attach("/dev/mapper/crashed")
try:
    crashed.checkpoint()
    print("crashed not-lost")
except TrackingLost as exc:
    print("crashed lost")
"""


def _state(image: Path) -> int:
    with image.open("rb") as f:
        magic, _version, state = struct.unpack("<QII", f.read(16))
    assert magic == int.from_bytes(b"NBDKSDM1", "little")
    return state


def test_clean_metadata_survives_a_crash_and_active_metadata_reports_lost(tmp_path: Path) -> None:
    k = harness.kernel()
    ko = harness.build_dm_module(k)
    drives = [tmp_path / n for n in ("data1.img", "meta1.img", "data2.img", "meta2.img")]
    for d in drives:
        with d.open("wb") as f:
            f.truncate(SECTORS * 512 if "data" in d.name else 1 << 20)
    py = harness.REPO / ".venv" / "bin" / "python"
    setup = _SETUP.format(ko=ko, sectors=SECTORS, chunk=CHUNK)

    first = harness.run(
        f"{setup}\n{py} -c '{_WRITE}'\ndmsetup remove clean\necho crashing\necho c > /proc/sysrq-trigger\nsleep 30",
        drives=drives, expect_crash=True, timeout=300,
    )  # fmt: skip
    assert first.crashed, first.output
    assert "crashing" in first.output, first.output
    assert "sysrq triggered crash" in first.console
    closed = int(first.output.split("closed")[1].split()[0])
    assert _state(drives[1]) == 1, "a clean removal leaves the header CLEAN"
    assert _state(drives[3]) == 2, "a target running at the crash leaves it ACTIVE"

    second = harness.run(f"{setup}\n{py} -c '{_CHECK}'\ndmesg | grep -c 'unclean stop'", drives=drives, timeout=300)
    second.check()
    lines = second.output.splitlines()
    clean_line = next(line for line in lines if line.startswith("clean "))
    generation = int(clean_line.split()[1])
    assert generation > closed
    assert clean_line.split(" ", 2)[2] == "[10, 20]", second.output
    assert "crashed lost" in lines, second.output
    assert lines[-1] == "1", "the kernel log must say why tracking was lost"
