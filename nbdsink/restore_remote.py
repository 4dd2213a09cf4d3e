"""``nbdsink restore nbd[s]://host/VOL@N ...``: the version's data and digests over NBD from
an nbdsink server, under trio (the plan and the writing are :mod:`nbdsink.restore`'s)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ParamSpec, TypeVar

import trio

from nbdsink import nbd
from nbdsink.contract import DIGEST_SIZE, digests_export
from nbdsink.errors import UsageError
from nbdsink.nbd import TLSConfig
from nbdsink.restore import RestoreError, Source
from nbdsink.sender.remote import block_size_from_description, with_export

P = ParamSpec("P")
T = TypeVar("T")


class RemoteSource(Source):
    """``nbd[s]://host/VOL@N``: data and digests over NBD from an nbdsink server."""

    def __init__(self, uri: str, tls: TLSConfig | None, assume: str | None) -> None:
        self.uri = uri
        self.tls = tls
        export = nbd.parse_uri(uri).export
        if "@" not in export:
            raise UsageError(f"{uri!r} must name a version (VOL@N or VOL@latest)")
        self.name = export
        self.assume = assume
        self._conns: dict[str, nbd.Connection] = {}

    @contextlib.asynccontextmanager
    async def opened(self) -> AsyncIterator[RemoteSource]:
        async with contextlib.AsyncExitStack() as stack:
            data = await stack.enter_async_context(nbd.connect(self.uri, self.tls))
            self._conns["data"] = data
            self.size = data.size
            volume, _, selector = self.name.partition("@")
            head = await stack.enter_async_context(
                nbd.connect(with_export(self.uri, volume), self.tls))
            self.block_size = block_size_from_description(head.description) or head.block_size[1]
            try:
                self._conns["digests"] = await stack.enter_async_context(
                    nbd.connect(with_export(self.uri, digests_export(volume, selector)), self.tls))
                if self.assume:
                    vol, _, sel = self.assume.partition("@")
                    self._conns["assumed"] = await stack.enter_async_context(
                        nbd.connect(with_export(self.uri, digests_export(vol, sel)), self.tls))
            except nbd.NBDOptionError as exc:
                raise RestoreError(f"the server gives no digests ({exc}): restore needs an "
                                   "nbdsink server") from exc
            yield self

    async def _read_digests(self, which: str, first: int, count: int) -> bytes:
        conn = self._conns[which]
        return bytes(await conn.pread(count * DIGEST_SIZE, first * DIGEST_SIZE))

    async def digests(self, first: int, count: int) -> bytes:
        return await self._read_digests("digests", first, count)

    async def changed_blocks(self, first: int, count: int) -> list[int]:
        # Both versions' digests of the range: 32 bytes per block cross the network, no data.
        theirs = await self._read_digests("digests", first, count)
        before = await self._read_digests("assumed", first, count)
        return [first + i for i in range(count)
                if theirs[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
                != before[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]]

    async def read_into(self, buf: memoryview, offset: int) -> None:
        buf[:] = await self._conns["data"].pread(len(buf), offset)

    async def blocking(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        # In a worker thread: the connections' tasks keep running meanwhile.
        return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def run(uri: str, tls: TLSConfig | None, assume: str | None,
        work: Callable[[RemoteSource], Awaitable[T]]) -> T:
    """Connect to the version ``uri`` names (and ``assume``'s digests), run ``work`` on it."""
    async def main() -> T:
        async with RemoteSource(uri, tls, assume).opened() as source:
            return await work(source)
    return trio.run(main)
