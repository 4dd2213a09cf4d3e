"""Turning a nursery's exception group back into the one error a user should see.

When one writer task fails (the connection dropped), its siblings are cancelled and the
nursery raises a group. The caller wants "connection reset by peer", not a tree: the first
error that is not a cancellation is re-raised as itself. A group of cancellations only is
left alone, for the cancel scope that caused it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import trio


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(leaves(exc))
        else:
            out.append(exc)
    return out


@contextlib.asynccontextmanager
async def open_nursery() -> AsyncIterator[trio.Nursery]:
    """``trio.open_nursery()`` that raises the first real error of its tasks unwrapped."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        real = [e for e in leaves(group) if not isinstance(e, trio.Cancelled)]
        if not real:
            raise
        raise real[0] from None
