"""Sets of chunk numbers as sorted, disjoint runs ``(first, count)``.

Dirty sets are kept as runs rather than one integer per chunk so that a large sequential
write (an initial copy, a discard of the whole device) costs little to store and merge.
"""

from __future__ import annotations

from collections.abc import Iterable

from nbdsink.tracker.base import Extent

Run = tuple[int, int]
"""(first chunk, number of chunks)."""


def runs_from_chunks(chunks: Iterable[int]) -> list[Run]:
    """Runs from chunk numbers in any order (duplicates allowed)."""
    return normalize((c, 1) for c in chunks)


def normalize(runs: Iterable[Run]) -> list[Run]:
    """Sort and merge overlapping or touching runs."""
    out: list[Run] = []
    for first, count in sorted(r for r in runs if r[1] > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_count = out[-1]
            out[-1] = (last_first, max(last_count, first + count - last_first))
        else:
            out.append((first, count))
    return out


def union(*sets: Iterable[Run]) -> list[Run]:
    """The union of several run lists."""
    return normalize(r for s in sets for r in s)


def count(runs: Iterable[Run]) -> int:
    """Number of chunks in ``runs``."""
    return sum(n for _, n in runs)


def chunks(runs: Iterable[Run]) -> list[int]:
    """Every chunk number in ``runs``, ascending (for small sets and tests)."""
    return [c for first, n in runs for c in range(first, first + n)]


def to_extents(runs: Iterable[Run], chunk_size: int, device_size: int) -> list[Extent]:
    """Byte extents for ``runs``, the last clipped to the device, empty ones dropped."""
    out: list[Extent] = []
    for first, n in normalize(runs):
        off = first * chunk_size
        end = min((first + n) * chunk_size, device_size)
        if end > off:
            out.append((off, end - off))
    return out


def from_bitmap_words(words: Iterable[tuple[int, int]]) -> list[Run]:
    """Runs from ``(word index, 64-bit word)`` pairs in ascending word order (bit i = chunk 64w+i)."""
    out: list[Run] = []
    for w, v in words:
        base = w * 64
        if v == 0xFFFF_FFFF_FFFF_FFFF:
            _append(out, base, 64)
            continue
        while v:
            low = (v & -v).bit_length() - 1
            # Length of the run of ones starting at bit ``low``.
            shifted = v >> low
            length = ((shifted + 1) & ~shifted).bit_length() - 1
            _append(out, base + low, length)
            v &= ~(((1 << length) - 1) << low)
    return out


def _append(out: list[Run], first: int, n: int) -> None:
    if out and out[-1][0] + out[-1][1] == first:
        out[-1] = (out[-1][0], out[-1][1] + n)
    else:
        out.append((first, n))
