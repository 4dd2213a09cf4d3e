"""Several consumers of one tracking (nbdsink.tracker.consumers), over an in-memory backend."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from sender.memory import FileTracker

from nbdsink.tracker import runs
from nbdsink.tracker.base import DirtySet, TrackerError
from nbdsink.tracker.consumers import (
    MAX_ENTRIES,
    ConsumerLost,
    ConsumerTracker,
    consumer_records,
    drop_consumer,
)

CS = 4096
CHUNKS = 256


@pytest.fixture
def backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileTracker:
    monkeypatch.setenv("NBDSINK_TRACKER_CONSUMERS", str(tmp_path / "consumers"))
    dev = tmp_path / "dev"
    dev.write_bytes(bytes(CS * CHUNKS))
    return FileTracker(str(dev), CS)


def chunks_of(ds: DirtySet) -> set[int]:
    out: set[int] = set()
    for off, length in ds.extents:
        out.update(range(off // CS, (off + length) // CS))
    return out


def test_each_consumer_gets_everything_since_its_own_acknowledgement(backend: FileTracker) -> None:
    a = ConsumerTracker(backend, "A")
    assert not a.fresh  # the first consumer inherits the tracking
    backend.write(0, b"x" * CS)
    b = ConsumerTracker(backend, "B")
    assert b.fresh  # it joined a tracking in use: it knows nothing before now
    backend.write(5 * CS, b"y")
    ga = a.checkpoint()
    assert chunks_of(ga) == {0, 5}
    a.acknowledge(ga.generation)
    backend.write(9 * CS, b"z")
    gb = b.checkpoint()
    assert chunks_of(gb) == {5, 9}  # A's acknowledgement took nothing from B
    ga2 = a.checkpoint()
    assert chunks_of(ga2) == {9}
    # B never acknowledged: it keeps being told
    assert chunks_of(b.checkpoint()) == {5, 9}
    b.acknowledge(gb.generation)
    assert chunks_of(b.checkpoint()) == set()


def test_random_interleavings_against_a_model(backend: FileTracker) -> None:
    rng = random.Random(7)
    names = ["A", "B", "C"]
    views = {n: ConsumerTracker(backend, n) for n in names}
    # model: per consumer, chunk -> the generation count at which it was written (pending)
    owed: dict[str, set[int]] = {n: set() for n in names}
    given: dict[str, tuple[int, set[int]]] = {}
    for _ in range(400):
        op = rng.random()
        who = rng.choice(names)
        if op < 0.5:
            c = rng.randrange(CHUNKS)
            backend.write(c * CS, b"w")
            for n in names:
                owed[n].add(c)
        elif op < 0.8:
            ds = views[who].checkpoint()
            got = chunks_of(ds)
            assert owed[who] <= got, f"{who} under-reported"
            given[who] = (ds.generation, set(owed[who]))
        elif who in given:
            gen, seen = given.pop(who)
            views[who].acknowledge(gen)
            owed[who] -= seen
            # Whatever was written after that checkpoint is still owed, and still reported.
    for n in names:
        assert owed[n] <= chunks_of(views[n].checkpoint())


def test_entries_stay_bounded_for_a_consumer_that_never_acknowledges(backend: FileTracker) -> None:
    idle = ConsumerTracker(backend, "idle")
    busy = ConsumerTracker(backend, "busy")
    for i in range(3 * MAX_ENTRIES):
        backend.write((i % CHUNKS) * CS, b"q")
        busy.acknowledge(busy.checkpoint().generation)
    ds = idle.checkpoint()
    assert chunks_of(ds) == set(range(3 * MAX_ENTRIES))
    records = consumer_records(backend)
    assert records["busy"]["pending_bytes"] == 0
    assert records["idle"]["pending_bytes"] == 3 * MAX_ENTRIES * CS


def test_a_replaced_tracking_voids_every_consumer(backend: FileTracker) -> None:
    a = ConsumerTracker(backend, "A")
    a.acknowledge(a.checkpoint().generation)
    replacement = FileTracker(backend.device, CS)  # another tracking of the same device
    b = ConsumerTracker(replacement, "B")
    assert b.fresh  # the record it found was about another tracking
    # A's tracking is gone: A learns it at its next checkpoint
    with pytest.raises(ConsumerLost):
        a.checkpoint()
    again = ConsumerTracker(replacement, "A")
    assert again.fresh  # it had a record, for a tracking that is gone


def test_acknowledging_beyond_the_last_checkpoint_is_refused(backend: FileTracker) -> None:
    a = ConsumerTracker(backend, "A")
    ds = a.checkpoint()
    with pytest.raises(TrackerError, match="cannot acknowledge"):
        a.acknowledge(ds.generation + 1)


def test_a_forgotten_consumer_is_told_so(backend: FileTracker) -> None:
    a = ConsumerTracker(backend, "A")
    ConsumerTracker(backend, "B")
    drop_consumer(backend, "A")
    assert set(consumer_records(backend)) == {"B"}
    with pytest.raises(ConsumerLost):
        a.checkpoint()


def test_merged_extents_are_runs(backend: FileTracker) -> None:
    a = ConsumerTracker(backend, "A")
    for c in (1, 2, 3, 7):
        backend.write(c * CS, b"r")
    assert a.checkpoint().extents == runs.to_extents([(1, 3), (7, 1)], CS, CS * CHUNKS)
