"""The head's dedup shortcut: a digest counts as stored only when it is durable.

Forced interleavings (a save held open while other writes arrive) of the defect where a
FLUSH committed a block whose chunk was never stored: the chunk had been staged in a batch
for a block that was then overwritten, so saving that batch stored nothing under its digest,
while a write of the same content elsewhere had taken it as stored.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbdsink.store import Store, StoreError
from nbdsink.store.head import Head
from nbdsink.store.keys import map_key

BS = 65536
SIZE = 64 * BS


class HeldSave:
    """Makes the head's next LMDB write wait until released, so a test can act while a
    batch is being saved (``Head._saving`` set, nothing in LMDB yet)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.entered = threading.Event()
        self.release = threading.Event()
        self._real = store.write
        self._armed = True

    def __call__(self, fn: Callable[[Any], Any]) -> Any:
        if self._armed:
            self._armed = False
            self.entered.set()
            assert self.release.wait(10)
        return self._real(fn)


def _read_block(store: Store, head: Head, version: int, block: int) -> bytes:
    from nbdsink.store.head import read_into

    buf = bytearray(BS)
    read_into(store, head.volume, version, memoryview(buf), block * BS)
    return bytes(buf)


@pytest.mark.parametrize("while_saving", [True, False])
def test_content_of_an_overwritten_block_is_stored_when_written_again(
    tmp_path: Path, while_saving: bool
) -> None:
    store = Store(tmp_path / "s", create=True)
    vol = store.create_volume("v", SIZE, BS)
    head = Head(store, vol, batch_bytes=1 << 30)
    rng = random.Random(1)
    a, other = rng.randbytes(BS), rng.randbytes(BS)
    head.write(memoryview(a), 0)
    head.write(memoryview(other), 0)  # the batch keeps chunk A, but no block points at it
    if while_saving:
        held = HeldSave(store)
        store.write = held  # type: ignore[method-assign]
        saver = threading.Thread(target=head.save)
        saver.start()
        assert held.entered.wait(10)
        head.write(memoryview(a), 5 * BS)  # A is only in the batch being saved
        held.release.set()
        saver.join()
        store.write = held._real  # type: ignore[method-assign]
    else:
        head.write(memoryview(a), 5 * BS)  # A is only in the filling batch
    info = head.commit()
    assert info is not None and info.version == 1
    assert _read_block(store, head, 1, 0) == other
    assert _read_block(store, head, 1, 5) == a
    store.close()
    # and after reopening (what a restart sees)
    store = Store(tmp_path / "s")
    assert _read_block(store, Head(store, store.volume("v")), 1, 5) == a
    store.close()


def test_failed_save_keeps_the_chunks_later_writes_refer_to(tmp_path: Path) -> None:
    """A save that fails puts its batch back; a write that took a chunk from it meanwhile
    still finds it stored by the next successful save."""
    store = Store(tmp_path / "s", create=True)
    vol = store.create_volume("v", SIZE, BS)
    head = Head(store, vol, batch_bytes=1 << 30)
    a = random.Random(2).randbytes(BS)
    head.write(memoryview(a), 0)
    real = store.write
    entered, release = threading.Event(), threading.Event()

    def failing(fn: Callable[[Any], Any]) -> Any:
        entered.set()
        assert release.wait(10)
        raise StoreError("injected: disk full")

    store.write = failing  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def save() -> None:
        try:
            head.save()
        except StoreError as exc:
            errors.append(exc)

    saver = threading.Thread(target=save)
    saver.start()
    assert entered.wait(10)
    head.write(memoryview(a), 9 * BS)
    release.set()
    saver.join()
    assert errors
    store.write = real  # type: ignore[method-assign]
    assert head.commit() is not None
    assert _read_block(store, head, 1, 0) == a
    assert _read_block(store, head, 1, 9) == a
    store.close()


def test_recording_a_block_without_its_chunk_is_refused(tmp_path: Path) -> None:
    """The last guard: stage_blocks will not record a digest the store does not hold."""
    store = Store(tmp_path / "s", create=True)
    vol = store.create_volume("v", SIZE, BS)
    head = Head(store, vol)
    missing = bytes(range(32))

    def stage(txn: Any) -> None:
        counters = store.pending_counters(txn, vol)
        store.stage_blocks(txn, vol, counters, [(3, missing)])

    with pytest.raises(StoreError, match="does not hold it"):
        store.write(stage)
    assert store.read(lambda r: r.txn.get(map_key(vol.id, 3, 1), db=store._map)) is None
    assert head.commit() is None
    store.close()
