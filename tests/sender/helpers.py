"""Real loop devices, filesystems and mounts for the sender's tests (root needed)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


@contextlib.contextmanager
def loop_device(backing: Path, *, read_only: bool = False) -> Iterator[str]:
    """Attach ``backing`` to a free loop device; detach on exit."""
    cmd = ["losetup", "-f", "--show"] + (["-r"] if read_only else []) + [str(backing)]
    dev = run(*cmd).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def mounted(dev: str, mountpoint: Path, *options: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = ["-o", ",".join(options)] if options else []
    run("mount", *opts, dev, str(mountpoint))
    try:
        yield mountpoint
    finally:
        for _ in range(50):
            if run("umount", str(mountpoint), check=False).returncode == 0:
                break
            import time

            time.sleep(0.1)


def mkfs(dev: str, fstype: str) -> None:
    if fstype == "ext4":
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev)
    elif fstype == "xfs":
        run("mkfs.xfs", "-q", "-f", "-K", dev)
    else:
        raise ValueError(fstype)


def is_root() -> bool:
    return os.geteuid() == 0
