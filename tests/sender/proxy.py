"""A unix-socket proxy the test controls: forwards to the server until told to cut.

It runs its own trio loop in a thread, so a synchronous test can drive it. ``cut()`` drops
every open connection at once (both directions closed, as when a link or a NAT table goes
away) and refuses new ones until ``restore()``.
"""

from __future__ import annotations

import socket as stdsocket
import threading
from pathlib import Path

import trio


class Proxy:
    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.target = target
        self.connections = 0
        self._scopes: set[trio.CancelScope] = set()
        self._refusing = False
        self._stalled = False
        self._unstalled: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def __enter__(self) -> Proxy:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._shutdown)
        self._thread.join(10)

    def cut(self) -> None:
        self._call(self._cut, True)

    def restore(self) -> None:
        self._call(self._cut, False)

    def stall(self, on: bool = True) -> None:
        """Stop forwarding (both ways) but keep every connection open: a server that hangs."""
        self._call(self._set_stall, on)

    def _set_stall(self, on: bool) -> None:
        self._stalled = on
        if not on:
            self._unstalled.set()
            self._unstalled = trio.Event()

    def _call(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        assert self._token is not None
        trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def _cut(self, refuse: bool) -> None:
        self._refusing = refuse
        if refuse:
            for scope in list(self._scopes):
                scope.cancel()

    def _shutdown(self) -> None:
        self._main_scope.cancel()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._unstalled = trio.Event()
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        self.listen.unlink(missing_ok=True)
        await sock.bind(str(self.listen))
        sock.listen(64)
        listener = trio.SocketListener(sock)
        with trio.CancelScope() as self._main_scope:
            self._ready.set()
            await trio.serve_listeners(self._handle, [listener])

    async def _handle(self, client: trio.SocketStream) -> None:
        if self._refusing:
            await client.aclose()
            return
        self.connections += 1
        try:
            upstream = await trio.open_unix_socket(str(self.target))
        except OSError:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery)
                    nursery.start_soon(self._pump, upstream, client, nursery)
            finally:
                self._scopes.discard(scope)
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(upstream)

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, nursery: trio.Nursery
    ) -> None:
        try:
            while data := await src.receive_some(1 << 16):
                while self._stalled:
                    assert self._unstalled is not None
                    await self._unstalled.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()
