"""Extent arithmetic and coalescing: the requests rebuild exactly the device's bytes."""

from __future__ import annotations

import itertools
import os

from hypothesis import given
from hypothesis import strategies as st

from nbdsink.sender.plan import (
    Write,
    Zero,
    ZeroMerger,
    align,
    ops_for_buffer,
    runs,
    split,
    total,
    union,
)

CS = 4096


def test_union_merges_overlapping_and_touching() -> None:
    assert union([(0, 10), (20, 5)], [(10, 5), (24, 10)]) == [(0, 15), (20, 14)]
    assert union([], [(5, 0)]) == []


def test_align_widens_to_chunks_and_clips() -> None:
    assert align([(100, 10), (4096 * 3 - 1, 2)], CS, 4096 * 10) == [(0, 4096), (8192, 8192)]
    assert align([(4096 * 9 + 1, 10_000)], CS, 4096 * 9 + 512) == [(4096 * 9, 512)]


def test_split_cuts_into_max_len_pieces() -> None:
    assert list(split([(0, 10), (20, 25)], 10)) == [(0, 10), (20, 10), (30, 10), (40, 5)]


def _apply(image: bytearray, ops: list[Write | Zero]) -> None:
    for op in ops:
        if isinstance(op, Write):
            image[op.offset : op.offset + op.length] = op.data
        else:
            image[op.offset : op.offset + op.length] = bytes(op.length)


@given(st.lists(st.sampled_from(["zero", "data"]), min_size=1, max_size=40), st.integers(0, 3))
def test_ops_rebuild_buffer_and_never_send_zero_chunks(kinds: list[str], tail: int) -> None:
    chunks = [bytes(CS) if k == "zero" else os.urandom(CS) for k in kinds]
    buf = b"".join(chunks) + (os.urandom(512) * tail)
    base = 7 * CS
    ops = list(ops_for_buffer(base, buf, CS))
    image = bytearray(os.urandom(base + len(buf)))
    _apply(image, ops)
    assert bytes(image[base:]) == buf
    # Zero chunks are never sent as data, and runs alternate (maximal coalescing).
    for op in ops:
        if isinstance(op, Write):
            assert all(op.data[i : i + CS] != bytes(CS)[: len(op.data[i : i + CS])]
                       for i in range(0, op.length, CS))
    assert all(type(a) is not type(b) for a, b in itertools.pairwise(ops))
    assert sum((op.length for op in ops), 0) == len(buf)


def test_runs_of_a_buffer() -> None:
    buf = bytes(CS) * 2 + b"x" * CS + bytes(CS)
    assert list(runs(buf, CS)) == [(0, 2 * CS, True), (2 * CS, 3 * CS, False), (3 * CS, 4 * CS, True)]


def test_zero_merger_joins_touching_zero_runs_up_to_limit() -> None:
    m = ZeroMerger(max_zero=3 * CS)
    out = []
    for op in [Zero(0, CS), Zero(CS, CS), Zero(2 * CS, CS), Zero(3 * CS, CS), Write(4 * CS, b"a" * CS),
               Zero(6 * CS, CS)]:
        out += m.push(op)
    out += m.flush()
    assert out == [Zero(0, 3 * CS), Zero(3 * CS, CS), Write(4 * CS, b"a" * CS), Zero(6 * CS, CS)]
    assert total([(o.offset, o.length) for o in out]) == 6 * CS
