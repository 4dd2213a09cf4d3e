"""Chunk runs: the representation of dirty sets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nbdsink.tracker import runs
from nbdsink.tracker.base import merge_chunks


@given(st.lists(st.integers(0, 300)))
def test_runs_round_trip(chunks: list[int]) -> None:
    r = runs.runs_from_chunks(chunks)
    assert runs.chunks(r) == sorted(set(chunks))
    assert runs.to_extents(r, 4096, 301 * 4096 - 100) == merge_chunks(sorted(set(chunks)), 4096, 301 * 4096 - 100)


@given(st.lists(st.integers(0, (1 << 64) - 1), max_size=8))
def test_from_bitmap_words(words: list[int]) -> None:
    expected = [w * 64 + b for w, v in enumerate(words) for b in range(64) if v >> b & 1]
    assert runs.chunks(runs.from_bitmap_words(list(enumerate(words)))) == expected


@given(st.lists(st.lists(st.integers(0, 200))), st.lists(st.integers(0, 200)))
def test_union(sets: list[list[int]], other: list[int]) -> None:
    got = runs.union(*(runs.runs_from_chunks(s) for s in sets), runs.runs_from_chunks(other))
    assert runs.chunks(got) == sorted(set().union(*map(set, sets), other))
