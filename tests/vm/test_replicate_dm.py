"""The whole product in a real kernel, with the dm tracker: ``nbdsink replicate`` from an
ext4 volume on a device-mapper device to ``nbdsink serve``, then the newest version attached
with ``nbd-client`` holds exactly the source's files."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from nbdsink.testing import ServerProcess, run_cli
from nbdsink.tracker import dm
from vm.conftest import attach, detach, kernel_problems, tree

pytestmark = pytest.mark.vm

MIB = 1 << 20


def replicate(dev: str, srv: ServerProcess, state: Path, mnt: Path) -> str:
    run = run_cli(
        "replicate", dev, srv.uri("vol"), "--tracker", "dm", "--once", "--state", str(state),
        "--freeze", str(mnt), check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stderr


def test_replicate_through_the_dm_tracker(
    linear: Callable[..., str], server: ServerProcess, nbd_devices: list[str], tmp_path: Path
) -> None:
    dev = linear("web01", 64 * MIB)
    src, dst, state = tmp_path / "src", tmp_path / "dst", tmp_path / "state"
    src.mkdir()
    dst.mkdir()
    # 4 KiB blocks: nbd-client attaches the backup with a 4 KiB logical block size.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", dev], check=True)
    subprocess.run(["mount", dev, str(src)], check=True)
    try:
        (src / "data").mkdir()
        for i in range(4):
            (src / "data" / f"f{i}").write_bytes(os.urandom(2 * MIB + i))
        replicate(dev, server, state, src)  # first run: full sync, tracking starts
        assert dm.attach(dev).info().open_gen >= 1

        # An incremental cycle: only what changed travels, found by the target.
        (src / "data" / "f1").unlink()
        with open(src / "data" / "f2", "r+b") as f:
            f.seek(MIB)
            f.write(os.urandom(4096))
        (src / "new").write_bytes(os.urandom(MIB))
        log = replicate(dev, server, state, src)
        sent = [int(x) for x in re.findall(r"\bsent=(\d+)", log)]
        assert sent and 0 < sent[-1] < 16 * MIB, log
        expected = tree(src)
        versions = json.loads(run_cli("versions", "vol", "--json", "--store", str(server.store)).stdout)
        assert versions[-1]["consistency"] == "frozen"
    finally:
        subprocess.run(["umount", str(src)], check=True)

    attach(server, "/dev/nbd3", "vol@latest", nbd_devices)
    # A frozen live filesystem still has its "needs recovery" flag set; freezing flushed the
    # journal, so mounting without replaying it (impossible read-only) is exact.
    mount = subprocess.run(["mount", "-o", "ro,noload", "/dev/nbd3", str(dst)], capture_output=True, text=True)
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout[-1500:]
    assert mount.returncode == 0, f"{mount.stderr}\n{dmesg}"
    try:
        assert tree(dst) == expected
    finally:
        subprocess.run(["umount", str(dst)], check=True)
    detach("/dev/nbd3", nbd_devices, commit=False)
    dm.attach(dev).stop()
    assert not kernel_problems()
