"""The change lists name every block that differs between two versions (what restore
--assume writes), through prunes of middle and oldest versions and for clones."""

from __future__ import annotations

import random
from pathlib import Path

from nbdsink.store import Store, reclaim
from nbdsink.store.diff import candidate_blocks
from nbdsink.store.head import Head
from nbdsink.store.retention import Policy

BS = 4096
BLOCKS = 256


def _differ(store: Store, a: tuple[str, int], b: tuple[str, int]) -> set[int]:
    va, vb = store.volume(a[0]), store.volume(b[0])
    mine = store.read(lambda r: store.block_digests(r, va, a[1], 0, BLOCKS))
    theirs = store.read(lambda r: store.block_digests(r, vb, b[1], 0, BLOCKS))
    return {i for i, (x, y) in enumerate(zip(mine, theirs, strict=True)) if x != y}


def _candidates(store: Store, a: tuple[str, int], b: tuple[str, int]) -> set[int] | None:
    va, vb = store.volume(a[0]), store.volume(b[0])
    return store.read(lambda r: candidate_blocks(store, r, va, a[1], vb, b[1]))


def _commit_random(store: Store, name: str, rng: random.Random, pool: list[bytes],
                   written: dict[int, set[int]]) -> int:
    head = Head(store, store.volume(name))
    blocks = set()
    for _ in range(rng.randint(1, 40)):
        b = rng.randrange(BLOCKS)
        head.write(memoryview(rng.choice(pool)), b * BS)  # repeats: some writes change nothing
        blocks.add(b)
    info = head.commit()
    assert info is not None
    written[info.version] = blocks
    return info.version


def test_change_lists_cover_every_difference_through_prunes_and_clones(tmp_path: Path) -> None:
    rng = random.Random(7)
    store = Store(tmp_path / "store", create=True)
    store.create_volume("vol", BLOCKS * BS, BS)
    pool = [rng.randbytes(BS) for _ in range(5)]
    written: dict[int, set[int]] = {}
    for _ in range(30):
        _commit_random(store, "vol", rng, pool, written)
    # Prune some middle versions and the oldest ones (the two kinds of merge).
    vol = store.volume("vol")
    reclaim.prune(store, vol, Policy(keep_last=12))
    kept = [v.version for v in store.versions(vol)]
    for v in rng.sample(kept[1:-1], 4):
        assert reclaim._start_prune(store, vol, v)
        reclaim.finish_pruning(store)
    reclaim.sweep(store, grace=0)
    kept = [v.version for v in store.versions(vol)]
    checked = 0
    for m in kept:
        for n in kept:
            if m > n:
                continue
            candidates = _candidates(store, ("vol", n), ("vol", m))
            assert candidates is not None
            truth = _differ(store, ("vol", n), ("vol", m))
            assert truth <= candidates, (m, n, truth - candidates)
            # Only blocks written after M can be listed.
            assert candidates <= set().union(*(written[v] for v in written if m < v <= n))
            checked += 1
    assert checked == len(kept) * (len(kept) + 1) // 2 and len(kept) == 8
    # A clone against the version it was made from: exactly what the clone wrote can differ.
    base = kept[len(kept) // 2]
    store.clone(vol, base, "dr")
    clone_written: dict[int, set[int]] = {}
    for _ in range(5):
        latest = _commit_random(store, "dr", rng, pool, clone_written)
    candidates = _candidates(store, ("dr", latest), ("vol", base))
    assert candidates is not None
    assert _differ(store, ("dr", latest), ("vol", base)) <= candidates
    assert candidates <= set().union(*clone_written.values())
    # Unrelated pairs are left to a full comparison.
    other = kept[-1] if kept[-1] != base else kept[0]
    assert _candidates(store, ("dr", latest), ("vol", other)) is None
    assert _candidates(store, ("vol", kept[0]), ("vol", kept[-1])) is None
    store.close()
