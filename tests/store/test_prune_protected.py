"""Pruning the versions above a protected one (a pin; a clone base and an open reader are
protected the same way): every version left reads back as written, says how many blocks it
changed since the version before it, and a prune costs what the next version changed, not
what was written since the protected version."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

from nbdsink.store import Store, check, keys, reclaim
from nbdsink.store.diff import candidate_blocks
from nbdsink.store.head import Head, read_into
from nbdsink.store.retention import Policy

BS = 4096
BLOCKS = 128
PER_CYCLE = 5


def _image(store: Store, version: int) -> bytes:
    buf = bytearray(BS * BLOCKS)
    read_into(store, store.volume("vol"), version, memoryview(buf), 0)
    return bytes(buf)


def _changes_under(store: Store, vid: int, version: int) -> int:
    prefix = keys.change_key(vid, version, 0)[:12]
    n = 0
    with store.env.begin(db=store._changes) as txn:
        cur = txn.cursor(db=store._changes)
        if cur.set_range(prefix):
            for key in cur.iternext(keys=True, values=False):
                if bytes(key)[:12] != prefix:
                    break
                n += 1
    return n


def test_prunes_above_a_pinned_version(tmp_path: Path) -> None:
    rng = random.Random(11)
    store = Store(tmp_path / "s", create=True)
    volume = store.create_volume("vol", BS * BLOCKS, BS)
    head = Head(store, volume)
    image = bytearray(rng.randbytes(BS * BLOCKS))
    head.write(memoryview(image), 0)
    assert head.commit() is not None
    store.pin(volume, 1)
    truth = {1: bytes(image)}
    for _ in range(40):
        for b in rng.sample(range(BLOCKS), PER_CYCLE):
            data = rng.randbytes(BS)  # new content every time: no write sets a block back
            image[b * BS : (b + 1) * BS] = data
            head.write(memoryview(data), b * BS)
        info = head.commit()
        assert info is not None
        truth[info.version] = bytes(image)
        reclaim.prune(store, store.volume("vol"), Policy(keep_last=5))
        reclaim.sweep(store, grace=0)
        left = [v.version for v in store.versions(volume)]
        # The pinned version, and the newest five.
        assert left == sorted({1, *sorted(truth)[-5:]})
        for v in left:
            assert _image(store, v) == truth[v]
    versions = store.versions(volume)
    for before, after in itertools.pairwise(versions):
        a, b = truth[before.version], truth[after.version]
        differ = {i for i in range(BLOCKS) if a[i * BS : (i + 1) * BS] != b[i * BS : (i + 1) * BS]}
        assert after.blocks_changed == len(differ)
        found = store.read(lambda r, x=before.version, y=after.version: candidate_blocks(
            store, r, volume, y, volume, x))
        assert found is not None and differ <= found
    # The version right above the pinned one holds only the entries it wrote itself: the
    # pruned versions' entries stayed under their own numbers, so no prune moved them.
    assert _changes_under(store, volume.id, versions[1].version) <= PER_CYCLE
    assert check.verify(store, full=True).clean
    store.close()
