"""Pruning, sweeping, compaction and volume deletion, against a model of every version."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nbdsink.server.session import Heads, Session
from nbdsink.store import Store, UnknownVersion, reclaim
from nbdsink.store.head import Head
from nbdsink.store.readers import ReaderLock
from nbdsink.store.retention import Policy

BS = 16384
BLOCKS = 96
SIZE = BS * BLOCKS


def read(store: Store, name: str, size: int = SIZE) -> bytes:
    buf = bytearray(size)
    Session(store, Heads(store), name, readonly=True).pread(memoryview(buf), 0)
    return bytes(buf)


class Model:
    """A volume written through a Head, and the image every committed version must have."""

    def __init__(self, store: Store, name: str = "vol", seed: int = 1) -> None:
        self.store = store
        self.volume = store.create_volume(name, SIZE, BS)
        self.head = Head(store, self.volume)
        self.rng = random.Random(seed)
        self.image = bytearray(SIZE)
        self.images: dict[int, bytes] = {}
        self.pool = [self.rng.randbytes(BS) for _ in range(6)]

    def commit_round(self, changes: int = 12) -> int:
        for _ in range(changes):
            b = self.rng.randrange(BLOCKS)
            kind = self.rng.random()
            data = (bytes(BS) if kind < 0.1 else self.rng.choice(self.pool) if kind < 0.4
                    else self.rng.randbytes(BS))
            self.head.write(memoryview(data), b * BS)
            self.image[b * BS : (b + 1) * BS] = data
        info = self.head.commit()
        if info is None:  # nothing changed: no version
            assert not self.images or self.images[max(self.images)] == self.image
            return max(self.images, default=0)
        self.images[info.version] = bytes(self.image)
        return info.version

    def check(self) -> None:
        listed = [v.version for v in self.store.versions(self.volume)]
        assert set(listed) <= set(self.images)
        for v in listed:
            assert read(self.store, f"{self.volume.name}@{v}") == self.images[v], f"version {v}"


def test_keep_last_prunes_and_the_rest_read_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True, segment_bytes=1 << 20)
    m = Model(store)
    for _ in range(10):
        m.commit_round()
    report = reclaim.prune(store, m.volume, Policy(keep_last=3))
    assert report.pruned == [1, 2, 3, 4, 5, 6, 7]
    assert [v.version for v in store.versions(m.volume)] == [8, 9, 10]
    m.check()
    with pytest.raises(UnknownVersion, match="pruned"):
        store.version(m.volume, 4)
    # Version numbers are never reused.
    assert m.commit_round() == 11
    m.check()


@pytest.mark.parametrize("seed", range(6))
def test_random_prunes_against_the_model(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = Store(tmp_path / "s", create=True, segment_bytes=256 << 10)
    m = Model(store, seed=seed)
    for _ in range(25):
        for _ in range(rng.randint(1, 3)):
            m.commit_round(rng.randint(1, 30))
        if rng.random() < 0.5:
            policy = Policy(keep_last=rng.randint(1, 6))
            reclaim.prune(store, m.volume, policy)
        if rng.random() < 0.3:
            reclaim.sweep(store, grace=0)
            reclaim.compact(store, min_dead=0.2, seal_active=rng.random() < 0.5)
        m.check()
    store.close()
    store = Store(tmp_path / "s")
    m.store = store
    m.check()


def test_space_comes_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True, segment_bytes=1 << 20)
    m = Model(store)
    for _ in range(12):
        m.commit_round(changes=BLOCKS)  # every block rewritten: each version is unique data
    before = reclaim.usage(store)["total"]["disk_bytes"]
    unique = sum(v.bytes_stored for v in store.versions(m.volume)[:-2])
    reclaim.prune(store, m.volume, Policy(keep_last=2))
    swept = reclaim.sweep(store, grace=0)
    assert swept.bytes >= unique * 0.9
    reclaim.compact(store, min_dead=0.1, seal_active=True)
    after = reclaim.usage(store)["total"]["disk_bytes"]
    assert before - after >= 0.8 * unique, (before, after, unique)
    m.check()


def test_protected_versions_are_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    m = Model(store)
    for _ in range(6):
        m.commit_round()
    store.pin(m.volume, 2, note="before the upgrade")
    reader = ReaderLock(store.path, m.volume.id, 4)
    try:
        report = reclaim.prune(store, m.volume, Policy(keep_last=1))
    finally:
        reader.release()
    assert report.kept[2] == "pinned" and report.kept[4] == "open reader"
    assert [v.version for v in store.versions(m.volume)] == [2, 4, 6]
    assert store.version(m.volume, 2).pinned == "before the upgrade"
    m.check()
    assert store.unpin(m.volume, 2)
    reclaim.prune(store, m.volume, Policy(keep_last=1))
    assert [v.version for v in store.versions(m.volume)] == [6]
    m.check()


def test_an_interrupted_prune_is_finished_by_the_next_pass(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    m = Model(store)
    for _ in range(5):
        m.commit_round(changes=40)
    assert reclaim._start_prune(store, m.volume, 3)  # the crash: record gone, entries not merged
    store.close()
    store = Store(tmp_path / "s")
    m.store = store
    assert reclaim.finish_pruning(store) == 1
    m.check()


def test_a_chunk_taken_as_stored_while_it_becomes_garbage_survives(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True)
    m = Model(store)
    content = m.rng.randbytes(BS)
    m.head.write(memoryview(content), 0)
    m.image[:BS] = content
    m.images[m.head.commit().version] = bytes(m.image)  # type: ignore[union-attr]
    other = m.rng.randbytes(BS)
    m.head.write(memoryview(other), 0)
    m.image[:BS] = other
    m.commit_round(changes=0)
    # A writer takes `content` as stored (referenced by version 1) ...
    m.head.write(memoryview(content), 5 * BS)
    m.image[5 * BS : 6 * BS] = content
    # ... while pruning version 1 drops its last reference ...
    reclaim.prune(store, m.volume, Policy(keep_last=1))
    # ... and a sweep runs: the chunk is too young to go.
    assert reclaim.sweep(store).chunks == 0
    m.images[m.head.commit().version] = bytes(m.image)  # type: ignore[union-attr]
    assert reclaim.sweep(store, grace=0).chunks >= 0
    m.check()


def test_delete_volume(tmp_path: Path) -> None:
    store = Store(tmp_path / "s", create=True, segment_bytes=1 << 20)
    a, b = Model(store, "a", seed=1), Model(store, "b", seed=2)
    for _ in range(4):
        a.commit_round(changes=BLOCKS)
        b.commit_round(changes=BLOCKS)
    reclaim.delete_volume(store, "a")
    assert [v.name for v in store.volumes()] == ["b"]
    reclaim.sweep(store, grace=0)
    reclaim.compact(store, min_dead=0.1, seal_active=True)
    b.check()
    total = reclaim.usage(store)["total"]
    assert total["referenced_bytes"] <= 4 * SIZE
    again = Model(store, "a", seed=3)  # the name is free again
    again.commit_round()
    again.check()
