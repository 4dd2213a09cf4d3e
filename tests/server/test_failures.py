"""Failure paths: kill -9 during ingest, a full disk, a full LMDB map."""

from __future__ import annotations

import errno
import hashlib
import json
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest

from nbdsink.testing import ServerProcess, run_cli

BS = 65536
SIZE = 16 << 20


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def committed(srv: ServerProcess) -> list[int]:
    out = run_cli("versions", "vol", "--json", "--store", str(srv.store)).stdout
    return [int(v["version"]) for v in json.loads(out)]


def digest_of(srv: ServerProcess, export: str) -> str:
    h = connect(srv.uri(export))
    try:
        return hashlib.sha256(h.pread(SIZE, 0)).hexdigest()
    finally:
        h.shutdown()


def test_kill9_during_ingest_at_random_moments(tmp_path: Path) -> None:
    """Every acknowledged FLUSH survives; every committed version is byte-identical to what
    was flushed; the store always reopens. The batch is small so that kills also land in the
    middle of batch saves, not only between requests."""
    rng = random.Random(2026)
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock", "--batch-size", "512K")
    srv.create_volume("vol", SIZE, BS)
    expected: dict[int, str] = {}  # version -> sha256 of the image flushed as that version
    acknowledged: set[int] = set()
    checked: set[int] = set()
    for _ in range(10):
        srv.start()
        known = committed(srv)
        assert known == list(range(1, len(known) + 1))
        assert acknowledged <= set(known), "an acknowledged FLUSH was lost"
        for v in known:
            if v not in checked:
                assert digest_of(srv, f"vol@{v}") == expected[v], f"version {v} differs"
                checked.add(v)
        # The head resumes from the committed version plus whatever pending writes were saved.
        h0 = connect(srv.uri("vol"))
        model = bytearray(h0.pread(SIZE, 0))
        h0.shutdown()
        next_version = len(known) + 1

        def writer(model: bytearray = model, start: int = next_version) -> None:
            version = start
            try:
                h = connect(srv.uri("vol"))
                while True:
                    for _ in range(rng.randint(1, 6)):
                        length = rng.randint(1, 1 << 20)
                        off = rng.randrange(0, SIZE - length)
                        data = rng.randbytes(length)
                        h.pwrite(data, off)
                        model[off : off + length] = data
                    expected[version] = hashlib.sha256(model).hexdigest()
                    h.flush()
                    acknowledged.add(version)
                    version += 1
            except nbd.Error:
                return  # the server was killed under us

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(rng.uniform(0.05, 1.2))
        srv.kill()
        t.join(timeout=30)
        assert not t.is_alive()
    srv.start()
    final = committed(srv)
    assert acknowledged <= set(final) and len(acknowledged) >= 10
    for v in final:
        if v not in checked:
            assert digest_of(srv, f"vol@{v}") == expected[v]
    srv.stop()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB filesystem (tmpfs with a size limit) that the store will fill."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_fua_write_survives_kill9_and_lands_in_the_next_version(tmp_path: Path) -> None:
    """A FUA write is durable when acknowledged, as pending data: after kill -9 of the server
    (a batch far larger than the write, so only FUA can have saved it) it is still there,
    and the next FLUSH commits it, with the writes flushed before it intact."""
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock", "--batch-size", "256M")
    srv.create_volume("vol", SIZE, BS)
    srv.start()
    h = connect(srv.uri("vol"))
    h.pwrite(b"a" * BS, 0)
    h.flush()
    h.pwrite(b"f" * 5000, 3 * BS + 100, nbd.CMD_FLAG_FUA)  # partial block, FUA
    h.pwrite(b"g" * BS, 5 * BS, nbd.CMD_FLAG_FUA)
    h.pwrite(b"n" * BS, 7 * BS)  # no FUA, no FLUSH: a crash may drop it
    assert committed(srv) == [1]
    srv.kill()
    srv.start()
    try:
        assert committed(srv) == [1]
        h = connect(srv.uri("vol"))
        assert h.pread(5000, 3 * BS + 100) == b"f" * 5000
        h.flush()
        assert committed(srv) == [1, 2]
        v2 = connect(srv.uri("vol@2"))
        assert v2.pread(BS, 0) == b"a" * BS
        assert v2.pread(5200, 3 * BS) == bytes(100) + b"f" * 5000 + bytes(100)
        assert v2.pread(BS, 5 * BS) == b"g" * BS
        assert connect(srv.uri("vol@1")).pread(BS, 3 * BS) == bytes(BS)
    finally:
        srv.stop()


@pytest.mark.parametrize("batch", ["64M", "256K"])
def test_full_disk_gives_enospc_and_keeps_versions(small_fs: Path, tmp_path: Path,
                                                   batch: str) -> None:
    srv = ServerProcess(small_fs / "store", tmp_path / "nbd.sock", "--batch-size", batch,
                        "--map-size", "1M")
    run_cli("volume", "create", "vol", "--size", "64M", "--store", str(srv.store))
    rng = random.Random(1)
    good: dict[int, bytes] = {}
    with srv:
        h = connect(srv.uri("vol"))
        model = bytearray(64 << 20)
        failure: nbd.Error | None = None
        for step in range(64):
            off = step << 20
            data = rng.randbytes(1 << 20)
            try:
                h.pwrite(data, off)
                model[off : off + len(data)] = data
                if step % 4 == 3:
                    h.flush()
                    good[len(good) + 1] = bytes(model[: (step + 1) << 20])
            except nbd.Error as exc:
                failure = exc
                break
        assert failure is not None, "the disk never filled"
        assert failure.errnum == errno.ENOSPC, failure
        assert good, "nothing was committed before the disk filled"
        assert srv.alive
        # the server keeps serving, and every committed version is intact
        for version, image in good.items():
            v = connect(srv.uri(f"vol@{version}"))
            assert v.pread(len(image), 0) == image
            v.shutdown()
        listing = subprocess.run(["nbdinfo", "--list", srv.uri("")], capture_output=True,
                                 text=True)
        assert listing.returncode == 0
        h.shutdown()
    # and the store reopens cleanly after the server stopped
    assert [int(v["version"]) for v in json.loads(
        run_cli("versions", "vol", "--json", "--store", str(srv.store)).stdout)] == list(good)


def nbdkit_rss(srv: ServerProcess) -> int:
    """Resident bytes of the nbdkit process serving ``srv`` (a child of ``nbdsink serve``)."""
    assert srv.proc is not None
    pid = srv.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    for line in Path(f"/proc/{children[0]}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.root
def test_writes_on_a_full_disk_stay_bounded_and_resume_when_room_returns(
        small_fs: Path, tmp_path: Path) -> None:
    """A client that writes on while the disk is full: the server keeps a bounded amount of
    it in memory and refuses the rest with ENOSPC (before, it kept every write and grew until
    the kernel killed it). Once the filesystem has room again, writing and FLUSH work, and
    the new version holds every write the server acknowledged."""
    srv = ServerProcess(small_fs / "store", tmp_path / "nbd.sock", "--batch-size", "1M",
                        "--map-size", "1M")
    run_cli("volume", "create", "vol", "--size", "64M", "--store", str(srv.store))
    rng = random.Random(3)
    model = bytearray(64 << 20)
    unknown: set[int] = set()  # MiB steps whose write failed: their content is undefined
    with srv:
        h = connect(srv.uri("vol"))
        step = 0
        while True:
            data = rng.randbytes(1 << 20)
            try:
                h.pwrite(data, (step % 64) << 20)
            except nbd.Error as exc:
                assert exc.errnum == errno.ENOSPC, exc
                unknown.add(step % 64)
                break
            model[(step % 64) << 20 : ((step % 64) + 1) << 20] = data
            step += 1
            assert step < 64, "the disk never filled"
        rss = nbdkit_rss(srv)
        refused = 0
        for i in range(1, 97):  # 96 MiB more, four times the filesystem
            at = (step + i) % 64
            data = rng.randbytes(1 << 20)
            try:
                h.pwrite(data, at << 20)
            except nbd.Error as exc:
                assert exc.errnum == errno.ENOSPC, exc
                unknown.add(at)
                refused += 1
                continue
            unknown.discard(at)
            model[at << 20 : (at + 1) << 20] = data
        grown = nbdkit_rss(srv) - rss
        assert refused >= 80, refused
        assert grown < 32 << 20, f"the server grew by {grown >> 20} MiB"
        with pytest.raises(nbd.Error) as flush_failed:
            h.flush()
        assert flush_failed.value.errnum == errno.ENOSPC
        assert srv.alive

        # The administrator makes room: the server's next save works, writes go on.
        subprocess.run(["mount", "-o", "remount,size=512m", str(small_fs)], check=True)
        time.sleep(1.5)  # past the retry delay of a failed save
        data = rng.randbytes(1 << 20)
        h.pwrite(data, 0)
        unknown.discard(0)
        model[: 1 << 20] = data
        h.flush()
        image = connect(srv.uri("vol@latest")).pread(64 << 20, 0)
        for at in range(64):
            if at not in unknown:
                assert image[at << 20 : (at + 1) << 20] == model[at << 20 : (at + 1) << 20], at
        h.shutdown()


def test_lmdb_map_grows_while_the_disk_has_room(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "store", tmp_path / "nbd.sock", "--map-size", "1M",
                        "--batch-size", "1M")
    srv.create_volume("vol", SIZE, BS)
    image = random.Random(4).randbytes(SIZE)
    (tmp_path / "img").write_bytes(image)
    with srv:
        subprocess.run(["nbdcopy", "--flush", str(tmp_path / "img"), srv.uri("vol")], check=True)
        assert digest_of(srv, "vol@1") == hashlib.sha256(image).hexdigest()
