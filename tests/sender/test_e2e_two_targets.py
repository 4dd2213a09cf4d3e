"""Two replications of one device (two backup targets, two state directories) share its
tracking; each replica must be complete: ground truth is the device itself."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from .helpers import loop_device, make_image, mkfs, mounted, run
from .rig import Sender, Server, attached, file_tree, fsck, nbdsink, ro_options, stop_tracker

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 64 * MiB


def _write(dev: str, rng: random.Random, count: int) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        for _ in range(count):
            length = rng.choice([4096, 65536, 300_000, 2 * MiB])
            offset = rng.randrange(0, SIZE - length) // 512 * 512
            os.pwrite(fd, rng.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def _latest_equals_device(srv: Server, volume: str, dev: str, tmp: Path) -> int:
    latest = srv.versions(volume)[-1]
    out = tmp / f"{volume}.img"
    run("nbdcopy", srv.uri(f"{volume}@{latest['version']}"), str(out))
    differ = run("cmp", str(out), dev, check=False)
    out.unlink()
    assert differ.returncode == 0, f"{volume}@{latest['version']} differs from the device: {differ.stdout}"
    return int(latest["version"])


def _once(dev: str, srv: Server, volume: str, state: Path) -> None:
    proc = run(*Sender.command(), dev, srv.uri(volume), "--state", str(state), "--once", check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("backend", ["bpf"])
def test_two_senders_on_one_device_each_get_every_write(tmp_path: Path, backend: str) -> None:
    rng = random.Random(3)
    img = make_image(tmp_path / "img", SIZE)
    srv = Server(tmp_path / "store", tmp_path / "nbd.sock")
    for vol in ("vol-a", "vol-b"):
        nbdsink("volume", "create", vol, "--size", str(SIZE), "--store", str(srv.store))
    srv.start()
    try:
        with loop_device(img) as dev:
            try:
                _write(dev, rng, 10)
                # Interleaved single cycles: each acknowledges generations the other has not
                # sent yet.
                for turn in range(6):
                    _once(dev, srv, "vol-a", tmp_path / "A")
                    _latest_equals_device(srv, "vol-a", dev, tmp_path)
                    _write(dev, rng, 6)
                    _once(dev, srv, "vol-b", tmp_path / "B")
                    _latest_equals_device(srv, "vol-b", dev, tmp_path)
                    if turn % 2:
                        _write(dev, rng, 6)
                status = nbdsink("track", "status", "--json").stdout
                assert str(tmp_path / "A") in status and str(tmp_path / "B") in status

                # Both continuously, a writer between them; then quiet, and both catch up.
                a = Sender(tmp_path / "a.log", dev, srv.uri("vol-a"), "--state", str(tmp_path / "A"),
                           "--interval", "0.3s")
                b = Sender(tmp_path / "b.log", dev, srv.uri("vol-b"), "--state", str(tmp_path / "B"),
                           "--interval", "0.5s")
                try:
                    for _ in range(12):
                        _write(dev, rng, 4)
                        time.sleep(0.15)
                    # Two more cycles of each, started after the last write: the device is
                    # quiet, so both latest versions must equal it.
                    a.wait_for("cycle version=", 30, count=a.text().count("cycle version=") + 2)
                    b.wait_for("cycle version=", 30, count=b.text().count("cycle version=") + 2)
                finally:
                    codes = (a.terminate(), b.terminate())
                assert codes == (0, 0), a.text() + b.text()
                _latest_equals_device(srv, "vol-a", dev, tmp_path)
                _latest_equals_device(srv, "vol-b", dev, tmp_path)
            finally:
                stop_tracker(dev)
    finally:
        srv.stop()


def test_files_on_two_targets_through_a_filesystem(tmp_path: Path) -> None:
    """The reported case: 15 files of 3 MiB on ext4, two senders: both replicas hold every
    file intact."""
    img = make_image(tmp_path / "img", SIZE)
    srv = Server(tmp_path / "store", tmp_path / "nbd.sock")
    for vol in ("vol-a", "vol-b"):
        nbdsink("volume", "create", vol, "--size", str(SIZE), "--store", str(srv.store))
    srv.start()
    try:
        with loop_device(img) as dev:
            mkfs(dev, "ext4")
            try:
                with mounted(dev, tmp_path / "mnt") as mnt:
                    a = Sender(tmp_path / "a.log", dev, srv.uri("vol-a"), "--state",
                               str(tmp_path / "A"), "--interval", "0.4s", "--freeze", str(mnt))
                    b = Sender(tmp_path / "b.log", dev, srv.uri("vol-b"), "--state",
                               str(tmp_path / "B"), "--interval", "0.7s", "--freeze", str(mnt))
                    try:
                        a.wait_for("cycle version=", 60)
                        b.wait_for("cycle version=", 60)
                        for i in range(15):
                            (mnt / f"f{i}").write_bytes(os.urandom(3 * MiB))
                            time.sleep(0.1)
                        run("sync")
                        expected = file_tree(mnt)
                        a.wait_for("cycle version=", 30, count=a.text().count("cycle version=") + 2)
                        b.wait_for("cycle version=", 30, count=b.text().count("cycle version=") + 2)
                    finally:
                        codes = (a.terminate(), b.terminate())
                    assert codes == (0, 0), a.text() + b.text()
                assert len(expected) == 15
                for vol in ("vol-a", "vol-b"):
                    latest = srv.versions(vol)[-1]["version"]
                    with attached(srv, f"{vol}@{latest}", tmp_path / f"att-{vol}") as copy:
                        assert fsck(copy, "ext4").returncode == 0
                        with mounted(copy, tmp_path / f"m-{vol}", *ro_options("ext4")) as m:
                            assert file_tree(m) == expected, f"{vol}@{latest}"
            finally:
                stop_tracker(dev)
    finally:
        srv.stop()
