"""The trio client against scripted servers on a unix socket: the window bound, request
splitting and alignment, old servers without NBD_OPT_GO, and servers that break the protocol."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from nbd_testserver import DiskServer

from nbdsink.nbd import (
    LocalProtocolError,
    NBDConnectionError,
    RemoteProtocolError,
    UnsupportedError,
    connect,
)
from nbdsink.nbd import protocol as p
from nbdsink.nbd.server import ServerConnection

Script = Callable[[trio.SocketStream, DiskServer], Awaitable[None]]


async def echo_script(stream: trio.SocketStream, server: DiskServer) -> None:
    """Answer everything as it comes."""
    await stream.send_all(server.start())
    while data := await stream.receive_some(1 << 20):
        await stream.send_all(server.feed(data))


@asynccontextmanager
async def scripted(
    tmp_path: Path, server: DiskServer, script: Script = echo_script
) -> AsyncIterator[str]:
    """Serve one connection with ``script``; yields the URI."""
    path = str(tmp_path / "scripted.sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await listener.bind(path)
    listener.listen(1)
    finished = trio.Event()

    async def serve() -> None:
        sock, _ = await listener.accept()
        stream = trio.SocketStream(sock)
        try:
            await script(stream, server)
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()
            finished.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield f"nbd+unix:///?socket={path}"
        with trio.fail_after(10):
            await finished.wait()
    listener.close()


async def test_window_bounds_requests_in_flight(tmp_path: Path) -> None:
    server = DiskServer(size=1 << 20, reverse=True)
    most = 0

    async def hold_replies(stream: trio.SocketStream, server: DiskServer) -> None:
        # Reply only once the window is full (20 requests = 5 full windows), last first,
        # after giving a client that ignored its window the chance to send more.
        nonlocal most
        await stream.send_all(server.start())
        while data := await stream.receive_some(1 << 20):
            await stream.send_all(server.feed(data))
            if len(server.queued) >= 4:
                with trio.move_on_after(0.05):
                    server.feed(await stream.receive_some(1 << 20))
                most = max(most, len(server.queued))
                await stream.send_all(server.release())

    blocks = [os.urandom(4096) for _ in range(20)]
    with trio.fail_after(30):  # a client that overran its window could leave replies held
        async with (
            scripted(tmp_path, server, hold_replies) as uri,
            connect(uri, window=4) as conn,
            trio.open_nursery() as nursery,
        ):
            for i, block in enumerate(blocks):
                nursery.start_soon(conn.pwrite, block, i * 4096)
    assert most == 4
    assert server.disk[: 20 * 4096] == b"".join(blocks)


async def test_requests_split_and_aligned_to_the_server_block_sizes(tmp_path: Path) -> None:
    server = DiskServer(size=4 << 20, block_size=(4096, 65536, 256 * 1024))
    data = os.urandom(1 << 20)
    async with scripted(tmp_path, server) as uri, connect(uri) as conn:
        assert conn.block_size == (4096, 65536, 256 * 1024)
        assert conn.request_size == 256 * 1024
        await conn.pwrite(data, 8192)
        assert await conn.pread(5000, 8192 + 100) == data[100:5100]
        with pytest.raises(LocalProtocolError, match="not aligned"):
            await conn.pwrite(b"x" * 100, 0)
        await conn.zero(2 << 20, 2 << 20)
    writes = [r for r in server.requests if r.command == p.NBD_CMD_WRITE]
    assert sorted((r.offset, r.length) for r in writes) == [
        (8192 + i * 256 * 1024, 256 * 1024) for i in range(4)
    ]
    reads = [r for r in server.requests if r.command == p.NBD_CMD_READ]
    assert [(r.offset, r.length) for r in reads] == [(8192, 8192)]  # widened to whole blocks
    assert server.disk[8192 : 8192 + len(data)] == data
    for request in server.requests:
        assert request.offset % 4096 == 0 and request.length % 4096 == 0
        assert request.flags == (
            p.NBD_CMD_FLAG_NO_HOLE if request.command == p.NBD_CMD_WRITE_ZEROES else 0
        )


async def test_server_without_go_or_structured_replies(tmp_path: Path) -> None:
    server = DiskServer(go=False, structured=False, handshake_flags=p.NBD_FLAG_FIXED_NEWSTYLE)
    data = os.urandom(65536)
    async with scripted(tmp_path, server) as uri, connect(uri) as conn:
        assert not conn.structured_replies and not conn.can_block_status
        assert conn.description is None
        await conn.pwrite(data, 0)
        assert await conn.pread(65536, 0) == data
        with pytest.raises(UnsupportedError):
            await conn.block_status(4096, 0)


async def test_server_hanging_up_after_export_name(tmp_path: Path) -> None:
    async def refuse(stream: trio.SocketStream, server: DiskServer) -> None:
        await stream.send_all(server.start())
        while data := await stream.receive_some(1 << 20):
            server.conn.receive_data(data)
            while (event := server.conn.next_event()) is not None:
                if getattr(event, "option", None) == p.NBD_OPT_EXPORT_NAME:
                    return  # how old servers say "no such export"
                await stream.send_all(server.handle(event))  # type: ignore[arg-type]

    server = DiskServer(go=False)
    async with scripted(tmp_path, server, refuse) as uri:
        with pytest.raises(NBDConnectionError, match="unknown export"):
            async with connect(uri):
                pass


@pytest.mark.parametrize(
    "bad_reply",
    [
        lambda cookie: ServerConnection.simple_reply(cookie + 1000),  # never sent
        lambda cookie: b"\xde\xad\xbe\xef" + bytes(12),  # bad magic
        lambda cookie: ServerConnection.data_chunk(cookie, 1 << 30, bytes(512), done=True),
    ],
)
async def test_protocol_violation_fails_calls_and_closes(
    tmp_path: Path, bad_reply: Callable[[int], bytes]
) -> None:
    saw_eof = False

    async def misbehave(stream: trio.SocketStream, server: DiskServer) -> None:
        nonlocal saw_eof
        await stream.send_all(server.start())
        while data := await stream.receive_some(1 << 20):
            server.conn.receive_data(data)
            while (event := server.conn.next_event()) is not None:
                if getattr(event, "command", None) == p.NBD_CMD_READ:
                    await stream.send_all(bad_reply(event.cookie))  # type: ignore[union-attr]
                else:
                    await stream.send_all(server.handle(event))  # type: ignore[arg-type]
        saw_eof = True

    server = DiskServer()
    async with scripted(tmp_path, server, misbehave) as uri, connect(uri) as conn:
        with pytest.raises(RemoteProtocolError):
            await conn.pread(512, 0)
        with pytest.raises(RemoteProtocolError):
            await conn.flush()  # the connection is dead for everyone
    assert saw_eof
