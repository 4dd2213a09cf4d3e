"""restore from a local store, in process: what differs is written (every worker's share),
the destination is durable, an error in a worker is the restore's, and a restore that stopped
half-way, run again, ends with the version."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nbdsink import restore
from nbdsink.store import Store
from nbdsink.store.head import Head

BS = 4096
BLOCKS = 1024  # 4 MiB: several spans of LOCAL_RUN, more spans than workers


def _commit(store: Store, name: str, blocks: dict[int, bytes]) -> int:
    head = Head(store, store.volume(name))
    for b, data in blocks.items():
        head.write(memoryview(data), b * BS)
    info = head.commit()
    assert info is not None
    return info.version


def _image(store: Store, name: str, version: int) -> bytes:
    volume = store.volume(name)
    buf = bytearray(volume.size)
    source = restore.LocalSource(store, f"{name}@{version}", None)
    restore.drive(source.read_into(memoryview(buf), 0))
    return bytes(buf)


def _restore(store: Store, spec: str, dest: Path, assume: str | None) -> tuple[int, int]:
    """(blocks planned, bytes written), as the command does it."""
    source = restore.LocalSource(store, spec, assume)
    target = restore.Destination(str(dest))
    try:
        restore.check_destination(target, source.size)
        plan = restore.drive(restore.plan(source, target, assume))
        written = restore.drive(restore.execute(source, target, plan))
    finally:
        target.close()
    return len(plan.blocks), written


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store", create=True)
    s.create_volume("vol", BLOCKS * BS, BS)
    rng = random.Random(3)
    _commit(s, "vol", {b: rng.randbytes(BS) for b in range(BLOCKS)})
    return s


def test_runs_of_adjacent_blocks() -> None:
    assert list(restore.runs([], 4)) == []
    assert list(restore.runs([1, 2, 3, 7, 8, 20], 4)) == [(1, 3), (7, 2), (20, 1)]
    assert list(restore.runs(list(range(10)), 4)) == [(0, 4), (4, 4), (8, 2)]


def test_assume_writes_what_differs_and_fsyncs(store: Store, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(4)
    dest = tmp_path / "dest.img"
    dest.write_bytes(_image(store, "vol", 1))
    # Scattered blocks, a long run (several spans), zeros, and the last block.
    changed = {*rng.sample(range(BLOCKS), 40), *range(300, 700), BLOCKS - 1}
    blocks = {b: (bytes(BS) if b % 7 == 0 else rng.randbytes(BS)) for b in changed}
    v2 = _commit(store, "vol", blocks)
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    planned, written = _restore(store, f"vol@{v2}", dest, "vol@1")
    assert planned == len(changed) and written == len(changed) * BS
    assert dest.read_bytes() == _image(store, "vol", v2)
    assert synced, "the destination was not fsynced"


def test_without_assume_compares_and_a_second_run_writes_nothing(store: Store,
                                                                 tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    image = bytearray(_image(store, "vol", 1))
    for b in (0, 5, 511, BLOCKS - 1):
        image[b * BS + 7] ^= 0xFF
    dest.write_bytes(bytes(image) + b"beyond the version")  # a larger destination is fine
    assert _restore(store, "vol@1", dest, None) == (4, 4 * BS)
    assert dest.read_bytes()[: BLOCKS * BS] == _image(store, "vol", 1)
    assert _restore(store, "vol@1", dest, None) == (0, 0)


def test_a_clone_against_its_base_and_an_unrelated_volume(store: Store, tmp_path: Path) -> None:
    store.clone(store.volume("vol"), 1, "dr")
    v = _commit(store, "dr", {3: b"c" * BS, 900: b"d" * BS})
    dest = tmp_path / "dest.img"
    dest.write_bytes(_image(store, "vol", 1))
    assert _restore(store, f"dr@{v}", dest, "vol@1") == (2, 2 * BS)
    assert dest.read_bytes() == _image(store, "dr", v)
    # No change list relates them: every block's digests are compared.
    store.create_volume("other", BLOCKS * BS, BS)
    _commit(store, "other", {b: b"o" * BS for b in range(0, BLOCKS, 2)})
    dest.write_bytes(_image(store, "other", 1))
    assert _restore(store, "vol@1", dest, "other@1") == (BLOCKS, BLOCKS * BS)
    assert dest.read_bytes() == _image(store, "vol", 1)


def test_an_error_in_a_worker_stops_the_restore_and_running_it_again_finishes(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(5)
    dest = tmp_path / "dest.img"
    dest.write_bytes(_image(store, "vol", 1))
    v2 = _commit(store, "vol", {b: rng.randbytes(BS) for b in range(0, BLOCKS, 3)})
    real_write = restore.Destination.write
    calls = []

    def failing(self: restore.Destination, data: memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        real_write(self, data, offset)

    monkeypatch.setattr(restore.Destination, "write", failing)
    with pytest.raises(OSError, match="Input/output"):
        _restore(store, f"vol@{v2}", dest, "vol@1")
    spans = len(list(restore.runs(list(range(0, BLOCKS, 3)), restore.LOCAL_RUN // BS)))
    assert 3 <= len(calls) < spans  # the workers stopped taking spans
    assert dest.read_bytes() != _image(store, "vol", v2)
    monkeypatch.setattr(restore.Destination, "write", real_write)
    # The device still holds vol@1 plus part of v2: the same plan, again, completes it.
    _restore(store, f"vol@{v2}", dest, "vol@1")
    assert dest.read_bytes() == _image(store, "vol", v2)


def test_ctrl_c_stops_between_steps_and_the_store_still_closes(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import signal
    import threading
    import time

    rng = random.Random(6)
    dest = tmp_path / "dest.img"
    dest.write_bytes(_image(store, "vol", 1))
    v2 = _commit(store, "vol", {b: rng.randbytes(BS) for b in range(0, BLOCKS, 2)})
    real_write = restore.Destination.write
    closed = []
    real_close = restore.Destination.close
    calls = []

    def slow(self: restore.Destination, data: memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 1:  # ^C: Python raises it in the main thread, wherever that is
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        time.sleep(0.01)
        real_write(self, data, offset)

    monkeypatch.setattr(restore.Destination, "write", slow)
    monkeypatch.setattr(restore.Destination, "close",
                        lambda self: (closed.append(True), real_close(self))[1])

    async def whole(source: restore.LocalSource) -> int:
        target = restore.Destination(str(dest))
        try:
            plan = await restore.plan(source, target, "vol@1")
            return await restore.execute(source, target, plan)
        finally:
            target.close()

    source = restore.LocalSource(store, f"vol@{v2}", "vol@1")
    # Python's own handler, whatever this process inherited: started in the background by a
    # shell without job control, SIGINT is ignored, and so is the ^C this test sends.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            restore.run_local(whole(source), source)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert closed and len(calls) < BLOCKS // 2  # stopped early, DEST fsynced and closed
    store.close()  # no read was left half-ended


def test_assume_refuses_a_destination_that_does_not_hold_the_assumed_version(
        store: Store, tmp_path: Path) -> None:
    """--assume trusts the destination: another device (or one written all over while
    nothing tracked it) would end as a mix of both. A few reads catch it first."""
    rng = random.Random(7)
    v2 = _commit(store, "vol", {b: rng.randbytes(BS) for b in rng.sample(range(BLOCKS), 50)})
    dest = tmp_path / "dest.img"
    other = rng.randbytes(BLOCKS * BS)  # another device of the same size
    dest.write_bytes(other)
    with pytest.raises(restore.RestoreError, match="does not hold vol@1 where nothing"):
        _restore(store, f"vol@{v2}", dest, "vol@1")
    assert dest.read_bytes() == other  # nothing written
    # The assumed version, but for a region written while nothing tracked it.
    image = bytearray(_image(store, "vol", 1))
    image[: 64 * BS] = rng.randbytes(64 * BS)
    dest.write_bytes(bytes(image))
    with pytest.raises(restore.RestoreError, match="Run without --assume"):
        _restore(store, f"vol@{v2}", dest, "vol@1")
    assert dest.read_bytes() == bytes(image)
    # As the message says: without --assume the whole device is compared.
    _restore(store, f"vol@{v2}", dest, None)
    assert dest.read_bytes() == _image(store, "vol", v2)


@pytest.mark.root
def test_assume_refuses_a_block_device_nothing_tracks(store: Store, tmp_path: Path) -> None:
    """With no tracker, writes made since the assumed version (a reboot ends eBPF tracking,
    and a boot writes to its disk) cannot be known: --assume is refused."""
    import subprocess

    rng = random.Random(8)
    v2 = _commit(store, "vol", {b: rng.randbytes(BS) for b in range(0, BLOCKS, 5)})
    image = tmp_path / "disk.img"
    image.write_bytes(_image(store, "vol", 1))
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        with pytest.raises(restore.RestoreError, match=f"nothing tracks {dev}"):
            _restore(store, f"vol@{v2}", Path(dev), "vol@1")
        assert image.read_bytes() == _image(store, "vol", 1)
        _restore(store, f"vol@{v2}", Path(dev), None)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
    assert image.read_bytes() == _image(store, "vol", v2)


def test_assume_accepts_a_volume_whose_last_block_is_short(tmp_path: Path) -> None:
    """The map records a short last block's digest padded with zeros: the check of the
    assumption must not take that for a difference (10 blocks: its last place reaches the
    end of the volume)."""
    s = Store(tmp_path / "short", create=True)
    size = 10 * BS - 1024
    s.create_volume("short", size, BS)
    rng = random.Random(9)
    head = Head(s, s.volume("short"))
    head.write(memoryview(rng.randbytes(size)), 0)
    assert head.commit() is not None
    v2 = _commit(s, "short", {3: rng.randbytes(BS)})
    dest = tmp_path / "dest.img"
    dest.write_bytes(_image(s, "short", 1))
    assert _restore(s, f"short@{v2}", dest, "short@1") == (1, BS)
    assert dest.read_bytes() == _image(s, "short", v2)
