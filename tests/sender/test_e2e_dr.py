"""The failover and failback drill, with ground truth: replicate an ext4 device, clone its
latest version, run on the clone (files changed), fail back with restore --assume (only what
differs is written), and resume replication from the original device without a full resync."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .helpers import loop_device, make_image, mkfs, mounted, run
from .rig import Sender, Server, attached, file_tree, nbdsink, stop_tracker

pytestmark = pytest.mark.root

MiB = 1 << 20
SIZE = 128 * MiB
BS = 64 << 10


def _write_files(root: Path, prefix: str, count: int, size: int) -> None:
    for i in range(count):
        (root / f"{prefix}-{i}").write_bytes(os.urandom(size))


def _replicate(dev: str, srv: Server, state: Path, *extra: str) -> str:
    proc = run(*Sender.command(), dev, srv.uri("vol"), "--state", str(state), "--once", *extra,
               check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def _written_sectors(dev: str) -> int:
    return int(Path(f"/sys/block/{Path(dev).name}/stat").read_text().split()[6])


def _blocks_differing(a: bytes, b: bytes) -> int:
    return sum(1 for off in range(0, len(a), BS) if a[off : off + BS] != b[off : off + BS])


def test_failover_to_a_clone_and_failback_with_assume(tmp_path: Path) -> None:
    img = make_image(tmp_path / "img", SIZE)
    srv = Server(tmp_path / "store", tmp_path / "nbd.sock")
    nbdsink("volume", "create", "vol", "--size", str(SIZE), "--store", str(srv.store))
    srv.start()
    state = tmp_path / "state"
    try:
        with loop_device(img) as dev:
            mkfs(dev, "ext4")
            try:
                with mounted(dev, tmp_path / "mnt") as mnt:
                    _write_files(mnt, "a", 20, 512 << 10)
                    _replicate(dev, srv, state, "--freeze", str(mnt))
                    _write_files(mnt, "b", 10, 256 << 10)
                    _replicate(dev, srv, state, "--freeze", str(mnt))
                    assumed = srv.versions("vol")[-1]["version"]
                    # Writes on the original after its last replication: tracked, not sent.
                    _write_files(mnt, "late", 3, 128 << 10)
                    run("sync")
                refused = nbdsink("restore", f"vol@{assumed}", str(tmp_path / "nope"),
                                  "--store", str(srv.store), check=False)
                assert refused.returncode != 0

                # Failover: the DR site runs on a clone of the latest version.
                nbdsink("clone", f"vol@{assumed}", "dr", "--store", str(srv.store))
                with (attached(srv, "dr", tmp_path / "att", writable=True) as copy,
                      mounted(copy, tmp_path / "drmnt") as drmnt):
                    _write_files(drmnt, "dr", 8, 384 << 10)
                    for old in sorted(drmnt.glob("a-*"))[:5]:
                        old.unlink()
                    dr_tree = file_tree(drmnt)
                dr_latest = srv.versions("dr")[-1]["version"]
                assert dr_latest >= 2
                dr_image = tmp_path / "dr.img"
                run("nbdcopy", srv.uri(f"dr@{dr_latest}"), str(dr_image))
                target = dr_image.read_bytes()

                # Failback: the original device is told to be vol@assumed plus its tracked
                # writes; only the blocks that differ are written.
                before = img.read_bytes()
                differing = _blocks_differing(before, target)
                with mounted(dev, tmp_path / "mnt") as mnt:
                    busy = nbdsink("restore", f"dr@{dr_latest}", dev, "--assume",
                                   f"vol@{assumed}", "--store", str(srv.store), check=False)
                    assert busy.returncode == 1 and "mounted" in busy.stderr
                sectors = _written_sectors(dev)
                dry = nbdsink("restore", f"dr@{dr_latest}", dev, "--assume", f"vol@{assumed}",
                              "--dry-run", "--store", str(srv.store))
                assert "would write" in dry.stdout
                nbdsink("restore", f"dr@{dr_latest}", dev, "--assume", f"vol@{assumed}",
                        "--store", str(srv.store))
                written = (_written_sectors(dev) - sectors) * 512
                assert img.read_bytes() == target, "the device is not the clone's latest version"
                assert written <= 1.1 * differing * BS, (written, differing * BS)
                with mounted(dev, tmp_path / "mnt", "ro") as mnt:
                    assert file_tree(mnt) == dr_tree

                # Replication resumes from the original device: no full resync, only what the
                # restore wrote (the tracker saw it) is sent.
                log = _replicate(dev, srv, state)
                sent = int(re.findall(r"cycle version=\S+ .*? sent=(\d+)", log)[-1])
                assert sent <= written + 4 * MiB, (sent, written)
                print(f"failback: {differing} blocks differed ({differing * BS} bytes); the "
                      f"restore wrote {written} bytes; the next cycle sent {sent} bytes")
                latest = srv.versions("vol")[-1]["version"]
                out = tmp_path / "latest.img"
                run("nbdcopy", srv.uri(f"vol@{latest}"), str(out))
                assert out.read_bytes() == target
            finally:
                stop_tracker(dev)
    finally:
        srv.stop()


def test_restore_over_nbd_writes_only_what_differs(tmp_path: Path) -> None:
    size = 32 * MiB
    srv = Server(tmp_path / "store", tmp_path / "nbd.sock")
    nbdsink("volume", "create", "vol", "--size", str(size), "--store", str(srv.store))
    srv.start()
    try:
        image = os.urandom(size)
        (tmp_path / "src.img").write_bytes(image)
        run("nbdcopy", "--flush", str(tmp_path / "src.img"), srv.uri("vol"))
        dest = tmp_path / "dest.img"
        damaged = bytearray(image)
        for chunk in (3, 77, 200, 401, 511):
            damaged[chunk * BS + 10 : chunk * BS + 20] = b"0123456789"
        dest.write_bytes(bytes(damaged))
        small = tmp_path / "small.img"
        small.write_bytes(bytes(size // 2))
        refused = nbdsink("restore", srv.uri("vol@1"), str(small), check=False)
        assert refused.returncode == 1 and "too small" in refused.stderr
        import json

        out = json.loads(nbdsink("restore", srv.uri("vol@latest"), str(dest), "--json").stdout)
        assert out["blocks_to_write"] == 5 and out["bytes_written"] == 5 * BS
        assert dest.read_bytes() == image
        again = json.loads(nbdsink("restore", srv.uri("vol@1"), str(dest), "--json").stdout)
        assert again["blocks_to_write"] == 0  # run again: nothing left to do
    finally:
        srv.stop()
