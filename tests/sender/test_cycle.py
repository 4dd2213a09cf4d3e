"""The cycle algorithm: full sync, increments, failures that lose nothing, freezes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from nbdsink.sender.cycle import Cycle, CycleOptions, FreezeBudgetExceeded
from nbdsink.sender.device import Device
from nbdsink.sender.state import SenderState, StateDir
from nbdsink.sender.transfer import Transfer, TransferConfig

from .memory import ConnectionCut, FileTracker, MemoryRemote

CS = 65536
SIZE = 64 * CS


@pytest.fixture
def rig(tmp_path: Path):  # type: ignore[no-untyped-def]
    dev_path = tmp_path / "dev"
    with open(dev_path, "wb") as f:
        f.truncate(SIZE)
    tracker = FileTracker(str(dev_path), CS)
    rnd = random.Random(1)
    for i in range(0, 64, 3):  # every third chunk holds data, the rest are zero
        tracker.write(i * CS + rnd.randrange(CS - 100), os.urandom(100))
    remote = MemoryRemote(SIZE, CS)
    device = Device(str(dev_path))
    state_dir = StateDir(tmp_path / "state")
    state = SenderState(device=str(dev_path), uri="mem:", volume="vol", size=SIZE,
                        chunk_size=CS, tracker="test")
    yield tracker, remote, device, state_dir, state
    device.close()


def make_cycle(rig, options: CycleOptions | None = None, **cfg: int) -> Cycle:  # type: ignore[no-untyped-def]
    tracker, remote, device, state_dir, state = rig
    config = TransferConfig(chunk_size=CS, max_request=cfg.get("max_request", 4 * CS),
                            window=cfg.get("window", 4))
    return Cycle(tracker=tracker, transfer=Transfer(device, remote, config), remote=remote,
                 state_dir=state_dir, state=state, options=options or CycleOptions())


def device_bytes(rig) -> bytes:  # type: ignore[no-untyped-def]
    return Path(rig[0].device).read_bytes()


async def test_full_sync_sends_only_data_and_commits_a_version(rig) -> None:  # type: ignore[no-untyped-def]
    _, remote, _, state_dir, _ = rig
    result = await make_cycle(rig).run(full=True)
    assert remote.versions[-1].image == device_bytes(rig)
    assert result.version == 1 and result.consistency == "none"
    # Fresh remote reads zeros: only the 22 data chunks go over the wire as data.
    assert result.stats.bytes_written == 22 * CS
    saved = state_dir.load()
    assert saved is not None and saved.synced and saved.last_version == 1 and saved.pending == []


async def test_full_sync_against_a_remote_holding_most_of_it(rig) -> None:  # type: ignore[no-untyped-def]
    tracker, remote, _, _, _ = rig
    remote.head[:] = device_bytes(rig)
    tracker.write(5 * CS, b"changed")        # differs from the remote
    remote.head[7 * CS : 8 * CS] = os.urandom(CS)  # remote has data where the device has zeros
    result = await make_cycle(rig).run(full=True)
    assert remote.versions[-1].image == device_bytes(rig)
    assert result.stats.bytes_written == CS
    assert result.stats.bytes_zeroed == CS


async def test_increment_sends_what_changed(rig) -> None:  # type: ignore[no-untyped-def]
    tracker, remote, _, _, _ = rig
    cycle = make_cycle(rig)
    await cycle.run(full=True)
    tracker.write(10 * CS + 5, b"a")
    tracker.write(40 * CS, bytes(CS))  # a chunk zeroed: WRITE_ZEROES
    result = await cycle.run()
    assert remote.versions[-1].image == device_bytes(rig)
    assert result.stats.bytes_written == CS and result.stats.bytes_zeroed == CS
    nothing = await cycle.run()
    assert nothing.version is None and len(remote.versions) == 2


async def test_a_cut_mid_cycle_loses_nothing(rig) -> None:  # type: ignore[no-untyped-def]
    tracker, remote, _, state_dir, _ = rig
    cycle = make_cycle(rig, max_request=CS, window=1)
    await cycle.run(full=True)
    for i in range(8):
        tracker.write((20 + 2 * i) * CS, os.urandom(CS))
    remote.fail_after = remote.requests + 3
    with pytest.raises(ConnectionCut):
        await cycle.run()
    remote.restart()  # and the server lost its pending writes too
    state = state_dir.load()
    assert state is not None and state.last_version == 1
    result = await make_cycle(rig).run()
    assert result.version == 2
    assert remote.versions[-1].image == device_bytes(rig)


class GateFreezer:
    """Freezes by closing a gate the test's writer waits on; snapshots the device when frozen."""

    mountpoint = "/test"

    def __init__(self, path: str) -> None:
        self.path = path
        self.open = trio.Event()
        self.open.set()
        self.snapshots: list[bytes] = []
        self.calls: list[str] = []

    async def sync(self) -> None:
        self.calls.append("sync")

    async def before(self) -> None:
        self.calls.append("pre")

    async def freeze(self) -> None:
        self.calls.append("freeze")
        self.open = trio.Event()
        self.snapshots.append(Path(self.path).read_bytes())

    async def while_frozen(self, frozen_at: str) -> None:
        self.calls.append("frozen")

    async def thaw(self) -> None:
        self.calls.append("thaw")
        self.open.set()

    async def after(self) -> None:
        self.calls.append("post")


async def test_frozen_versions_equal_the_device_at_the_freeze(rig) -> None:  # type: ignore[no-untyped-def]
    tracker, remote, _, _, _ = rig
    freezer = GateFreezer(tracker.device)
    # A low assumed read rate makes the first cycle converge before it freezes.
    cycle = make_cycle(rig, CycleOptions(freezer=freezer, max_freeze=0.5,
                                         initial_read_rate=CS / 0.5), window=2)
    rnd = random.Random(7)
    stop = trio.Event()

    async def writer() -> None:
        while not stop.is_set():
            # Check the gate and write with no checkpoint in between: a trio checkpoint
            # here would let a freeze start between the check and the write.
            while not freezer.open.is_set():
                await freezer.open.wait()
            tracker.write(rnd.randrange(SIZE - 10), os.urandom(rnd.choice([10, 5000])))
            await trio.sleep(0)

    results = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        results.append(await cycle.run(full=True))
        for _ in range(4):
            await trio.sleep(0.01)
            results.append(await cycle.run())
        stop.set()
    assert results[0].converge_rounds >= 1
    committed = [r for r in results if r.version is not None]
    assert len(committed) == len(freezer.snapshots) == len(remote.versions) >= 4
    for version, snapshot in zip(remote.versions, freezer.snapshots, strict=True):
        assert version.consistency == "frozen" and "frozen_at" in version.labels
        bad = [c for c in range(SIZE // CS)
               if version.image[c * CS : (c + 1) * CS] != snapshot[c * CS : (c + 1) * CS]]
        assert not bad, (version.number, bad, [(r.converge_rounds, r.freeze_attempts) for r in results])
    assert freezer.calls[0] == "sync"
    around = [c for c in freezer.calls if c not in ("sync", "frozen")]
    assert around == ["pre", "freeze", "thaw", "post"] * (len(around) // 4)
    # The frozen hook runs inside the freeze, once per freeze that made a version.
    assert freezer.calls.count("frozen") == len(committed)
    for i, call in enumerate(freezer.calls):
        if call == "frozen":
            assert freezer.calls[i - 1] == "freeze" and freezer.calls[i + 1] == "thaw"
    # A sync right before each freeze leaves FIFREEZE little to flush.
    assert all(freezer.calls[i - 1] == "sync" for i, c in enumerate(freezer.calls) if c == "pre")


async def test_a_freeze_that_never_fits_thaws_and_keeps_everything(rig) -> None:  # type: ignore[no-untyped-def]
    tracker, remote, _, state_dir, _ = rig

    class BusyFreezer(GateFreezer):
        async def before(self) -> None:
            # The application keeps writing right up to the freeze.
            await super().before()
            tracker.write(33 * CS, os.urandom(3 * CS))

    freezer = BusyFreezer(tracker.device)
    cycle = make_cycle(rig, CycleOptions(freezer=freezer, max_freeze=0.001, converge_rounds=1,
                                         freeze_attempts=2, initial_read_rate=1.0))
    with pytest.raises(FreezeBudgetExceeded):
        await cycle.run(full=True)
    assert freezer.open.is_set()  # thawed
    assert freezer.calls.count("freeze") == freezer.calls.count("thaw") == 2
    assert freezer.calls[0] == "sync"
    assert remote.versions == []
    saved = state_dir.load()
    assert saved is not None and saved.pending == [(0, SIZE)]
    # The sent-but-uncommitted data is pending in the state: a later cycle commits it all,
    # even after the server lost its pending writes.
    remote.restart()
    later = make_cycle(rig)
    later.state = saved
    await later.run()
    assert remote.versions[-1].image == device_bytes(rig)
