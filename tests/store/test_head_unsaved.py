"""While saves fail (a full disk), a head keeps a bounded amount of writes in memory.

Past UNSAVED_BATCHES batches, writes are refused with the failure's errno and not kept; what
was acknowledged stays readable and is committed once saves work again.
"""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any

import pytest

from nbdsink.store import Store, StoreFull
from nbdsink.store import head as head_module
from nbdsink.store.head import UNSAVED_BATCHES, Head, UnsavedLimit

BS = 65536
BATCH = 16 * BS
SIZE = 256 * BS


class FailingSaves:
    """Makes Store.save_chunks fail as a full disk does, while ``failing`` is set."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failing = False
        self.calls = 0
        real = store.save_chunks

        def save_chunks(chunks: Any) -> Any:
            self.calls += 1
            if self.failing:
                raise StoreFull("no space left on the store's disk")
            return real(chunks)
        monkeypatch.setattr(store, "save_chunks", save_chunks)


def test_writes_are_refused_past_the_bound_and_resume_when_saves_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(7)
    store = Store(tmp_path / "store", create=True)
    head = Head(store, store.create_volume("vol", SIZE, BS), batch_bytes=BATCH)
    saves = FailingSaves(store, monkeypatch)
    model = bytearray(SIZE)
    first = rng.randbytes(BATCH)
    head.write(memoryview(first), 0)
    model[:BATCH] = first
    assert head.commit() is not None
    committed = bytes(model)

    saves.failing = True
    accepted = refused = failed = 0
    for _ in range(200):  # 200 blocks of new data: 12.5 batches' worth
        block = rng.randrange(SIZE // BS)
        data = rng.randbytes(BS)
        try:
            head.write(memoryview(data), block * BS)
        except UnsavedLimit as exc:
            assert exc.errno == errno.ENOSPC
            assert "refused, not kept" in str(exc)
            refused += 1
            continue
        except StoreFull:
            # The write that tried the save: the client saw the error, its data stay staged
            # (a write that failed leaves its blocks undefined; these read as written).
            failed += 1
            model[block * BS : (block + 1) * BS] = data
            continue
        accepted += 1
        model[block * BS : (block + 1) * BS] = data
        # What was acknowledged reads back at once, from memory.
        assert head_read(head, block * BS, BS) == data
        # Memory stays bounded: never more than the bound and one request.
        assert head._filling.nbytes <= UNSAVED_BATCHES * BATCH + BS + 64
    assert failed >= 1 and refused > 100 and accepted >= UNSAVED_BATCHES * 16 - 16, \
        (accepted, refused, failed)
    # Save attempts are rate-limited, not one per write.
    assert saves.calls < 10, saves.calls
    # Refused writes left nothing behind: the head reads as the model everywhere.
    assert head_read(head) == bytes(model)
    # A FLUSH fails as the saves do, and the last version is untouched.
    with pytest.raises(StoreFull):
        head.commit()
    assert read_version(store, head, 1) == committed

    # Room again: after the retry delay the next write saves, and everything commits.
    saves.failing = False
    monkeypatch.setattr(head_module, "SAVE_RETRY_SECONDS", 0.0)
    data = rng.randbytes(BS)
    head.write(memoryview(data), 0)
    model[:BS] = data
    info = head.commit()
    assert info is not None and info.version == 2
    assert read_version(store, head, 2) == bytes(model)
    store.close()


def head_read(head: Head, offset: int = 0, length: int = SIZE) -> bytes:
    buf = bytearray(length)
    head.read_into(memoryview(buf), offset)
    return bytes(buf)


def read_version(store: Store, head: Head, version: int) -> bytes:
    buf = bytearray(SIZE)
    head_module.read_into(store, head.volume, version, memoryview(buf), 0)
    return bytes(buf)
