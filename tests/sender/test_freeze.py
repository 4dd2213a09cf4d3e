"""FIFREEZE/FITHAW on a real ext4 mount, and the thaw of a filesystem left frozen."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nbdsink.sender import freeze
from nbdsink.sender.errors import FreezeError
from nbdsink.sender.state import StateDir

from .helpers import loop_device, make_image, mkfs, mounted


@pytest.fixture
def ext4_mount(tmp_path: Path):  # type: ignore[no-untyped-def]
    img = make_image(tmp_path / "img", 64 << 20)
    with loop_device(img) as dev:
        mkfs(dev, "ext4")
        with mounted(dev, tmp_path / "mnt") as mnt:
            yield dev, mnt


def test_writes_wait_while_frozen(ext4_mount: tuple[str, Path]) -> None:
    dev, mnt = ext4_mount
    assert freeze.mount_source(str(mnt)) == divmod(Path(dev).stat().st_rdev, 256)
    freeze.freeze(str(mnt))
    done = threading.Event()

    def writer() -> None:
        (mnt / "f").write_text("x")
        subprocess.run(["sync", "-f", str(mnt / "f")], check=True)
        done.set()

    t = threading.Thread(target=writer)
    try:
        t.start()
        assert not done.wait(0.5), "a write finished on a frozen filesystem"
        with pytest.raises(FreezeError, match="already frozen"):
            freeze.freeze(str(mnt))
    finally:
        assert freeze.thaw(str(mnt))
    assert done.wait(10)
    t.join()
    assert not freeze.thaw(str(mnt))  # not frozen any more


def test_next_start_thaws_what_a_killed_sender_left_frozen(
    ext4_mount: tuple[str, Path], tmp_path: Path
) -> None:
    _, mnt = ext4_mount
    state = tmp_path / "state"
    # A sender that marks, freezes, and is killed with SIGKILL before it can thaw.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from nbdsink.sender import freeze; from nbdsink.sender.state import StateDir; "
         f"StateDir({str(state)!r}).mark_frozen({str(mnt)!r}); freeze.freeze({str(mnt)!r}); "
         "print('frozen', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "frozen"
    child.kill()
    child.wait()
    sd = StateDir(state)
    assert sd.frozen_mountpoint() == str(mnt)
    # Still frozen: a write with a timeout does not get through.
    probe = subprocess.Popen(["sh", "-c", f"echo y > {mnt}/g && sync -f {mnt}/g"])
    time.sleep(0.3)
    assert probe.poll() is None
    assert freeze.thaw_leftover(sd) == str(mnt)
    assert probe.wait(10) == 0
    assert sd.frozen_mountpoint() is None
    assert freeze.thaw_leftover(sd) is None


def test_not_a_mountpoint(tmp_path: Path) -> None:
    with pytest.raises(FreezeError, match="not a mountpoint"):
        freeze.mount_source(str(tmp_path / "nowhere"))


def test_stacked_on_follows_layers_down(tmp_path: Path) -> None:
    """--freeze names a filesystem on a mapping over the device (LUKS on a partition, say):
    the sysfs ``slaves`` links lead from the mapping down to it, through every layer."""

    def dev(majmin: str, *slaves: str) -> None:
        d = tmp_path / "dev" / "block" / majmin
        d.mkdir(parents=True)
        (d / "dev").write_text(majmin + "\n")
        (d / "slaves").mkdir()
        for s in slaves:
            (d / "slaves" / s.replace(":", "-")).symlink_to(tmp_path / "dev" / "block" / s)

    dev("8:2")  # the partition
    dev("253:0", "8:2")  # LUKS on it
    dev("253:1", "253:0")  # an LVM volume in the container
    dev("8:3")
    root = str(tmp_path)
    assert freeze.stacked_on((253, 1), (8, 2), root)
    assert freeze.stacked_on((253, 0), (8, 2), root)
    assert freeze.stacked_on((8, 2), (8, 2), root)
    assert not freeze.stacked_on((253, 1), (8, 3), root)
    assert not freeze.stacked_on((8, 2), (253, 0), root), "a layer is not on what is over it"
