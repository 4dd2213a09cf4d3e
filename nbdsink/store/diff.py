"""Which blocks can differ between two versions, known from the store's change lists alone:
what ``restore --assume`` writes, without comparing the digests of every block.

A block can differ between versions M < N of one volume only if some version number in
(M, N] has a map entry for it: each map entry is listed in ``changes`` under its version's
number (pruning a version leaves its entries, and their listing, under its number, and drops
those the next version shadows, so the listing of the numbers in (M, N] stays complete). For a clone, against the version of its
base volume it was made from, the blocks are those the clone ever wrote.
"""

from __future__ import annotations

from nbdsink.store import keys
from nbdsink.store.store import Reading, Store, VolumeInfo


def candidate_blocks(store: Store, r: Reading, volume: VolumeInfo, version: int,
                     since: VolumeInfo, since_version: int) -> set[int] | None:
    """The blocks of ``volume@version`` that may differ from ``since@since_version`` (a
    superset: a block written back to its old content is in it), or None when the change
    lists cannot tell (unrelated volumes, a clone of a clone, or ``since`` newer)."""
    if volume.id == since.id and since_version <= version:
        return _listed(store, r, volume.id, since_version + 1, version)
    if volume.parent == since.name and volume.base == since_version:
        return _listed(store, r, volume.id, 0, version)
    return None


def _listed(store: Store, r: Reading, vid: int, low: int, high: int) -> set[int]:
    """Blocks listed in ``changes`` for versions low..high of volume ``vid``."""
    out: set[int] = set()
    cur = r.txn.cursor(db=store._changes)
    if not cur.set_range(keys.change_key(vid, low, 0)):
        return out
    for key in cur.iternext(keys=True, values=False):
        key_vid, key_version, block = keys.unpack_change_key(bytes(key))
        if key_vid != vid or key_version > high:
            break
        out.add(block)
    return out
