"""The trio client against real servers: nbdkit (memory, file, error and delay filters),
qemu-nbd, and nbdcopy reading back what the client wrote (and the reverse)."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
from pathlib import Path

import pytest
import trio
from nbd_servers import Servers

from nbdsink.nbd import (
    LocalProtocolError,
    NBDConnectionError,
    NBDOptionError,
    NBDReplyError,
    UnsupportedError,
    URIError,
    connect,
    list_exports,
)
from nbdsink.nbd import protocol as p

MiB = 1024 * 1024


async def test_memory_roundtrip_zero_trim_flush_and_extents(servers: Servers) -> None:
    uri = servers.nbdkit("memory", "64M")
    async with connect(uri) as conn:
        assert conn.size == 64 * MiB
        assert not conn.read_only
        assert conn.can_flush and conn.can_fua and conn.can_trim and conn.can_zero
        assert conn.can_fast_zero and conn.can_multi_conn and conn.can_block_status
        assert conn.structured_replies
        data = os.urandom(5 * MiB + 4096)
        await conn.pwrite(data, 3 * MiB, fua=True)
        assert await conn.pread(len(data), 3 * MiB) == data
        # Unaligned reads are fine: the client widens them.
        assert await conn.pread(1000, 3 * MiB + 7) == data[7:1007]
        await conn.zero(MiB, 4 * MiB)
        await conn.zero(MiB, 5 * MiB, may_trim=True, fast=True)
        await conn.trim(MiB, 6 * MiB)  # the memory plugin really discards: reads zero
        await conn.cache(MiB, 0)
        await conn.flush()
        got = await conn.pread(6 * MiB, 2 * MiB)
        assert got[:MiB] == bytes(MiB)  # never written
        assert got[MiB : 2 * MiB] == data[:MiB]
        assert got[2 * MiB : 5 * MiB] == bytes(3 * MiB)  # zeroed twice, then trimmed
        assert got[5 * MiB :] == data[4 * MiB : 5 * MiB]
        extents = await conn.block_status(conn.size, 0)
        # Extents tile the export exactly; written data is not reported as a hole.
        assert extents[0][0] == 0
        assert sum(e[1] for e in extents) == conn.size
        assert all(a[0] + a[1] == b[0] for a, b in itertools.pairwise(extents))
        for offset, length, is_hole, _ in extents:
            if offset < 4 * MiB and offset + length > 3 * MiB:
                assert not is_hole
        assert extents[-1][2:] == (True, True)  # the never-written tail


async def test_many_tasks_share_one_connection(servers: Servers) -> None:
    uri = servers.nbdkit("memory", "64M")
    blocks = {i: os.urandom(256 * 1024) for i in range(64)}
    async with connect(uri, window=8) as conn:
        async with trio.open_nursery() as nursery:
            for i, block in blocks.items():
                nursery.start_soon(conn.pwrite, block, i * len(block))
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = bytes(await conn.pread(256 * 1024, i * 256 * 1024))

        async with trio.open_nursery() as nursery:
            for i in blocks:
                nursery.start_soon(read, i)
    assert results == blocks


async def test_file_plugin_writes_reach_the_file(servers: Servers, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MiB)
    uri = servers.nbdkit("file", str(image))
    data = os.urandom(2 * MiB)
    async with connect(uri, request_size=256 * 1024) as conn:
        await conn.pwrite(data, MiB)
        await conn.flush()
        extents = await conn.block_status(4 * MiB, 0)
    on_disk = image.read_bytes()
    assert on_disk[MiB : 3 * MiB] == data
    assert on_disk[:MiB] == bytes(MiB)
    # The file is sparse around the data: the server reports the first MiB as a hole.
    assert extents[0] == (0, MiB, True, True)
    assert any(not hole and off <= MiB < off + n for off, n, hole, _ in extents)


async def test_read_only_export_refuses_writes_locally(servers: Servers) -> None:
    uri = servers.nbdkit("-r", "memory", "1M")
    async with connect(uri) as conn:
        assert conn.read_only and not conn.can_trim and not conn.can_zero
        with pytest.raises(UnsupportedError, match="read-only"):
            await conn.pwrite(bytes(4096), 0)
        assert await conn.pread(4096, 0) == bytes(4096)  # still usable


async def test_error_filter_errno_reaches_the_caller(servers: Servers) -> None:
    uri = servers.nbdkit(
        "--filter=error", "memory", "4M",
        "error-pread=EIO", "error-pread-rate=100%",
        "error-pwrite=ENOSPC", "error-pwrite-rate=100%",
    )  # fmt: skip
    async with connect(uri) as conn:
        with pytest.raises(NBDReplyError) as info:
            await conn.pread(4096, 0)
        assert info.value.errno == errno.EIO
        assert "READ failed" in str(info.value)
        with pytest.raises(NBDReplyError) as info:
            await conn.pwrite(bytes(3 * MiB), 0)  # split: the first error is raised
        assert info.value.errno == errno.ENOSPC
        await conn.flush()  # errors are per request; the connection lives on
        await conn.zero(4096, 0)


async def test_replies_out_of_order_with_the_delay_filter(servers: Servers) -> None:
    uri = servers.nbdkit("--filter=delay", "memory", "4M", "delay-read=600ms")
    finished: list[str] = []
    data = os.urandom(4096)
    async with connect(uri) as conn:
        await conn.pwrite(data, 0)

        async def read() -> None:
            assert await conn.pread(4096, 0) == data
            finished.append("read")

        async def write() -> None:
            await trio.sleep(0.05)  # after the read is on the wire
            await conn.pwrite(os.urandom(4096), 8192)
            finished.append("write")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)
    assert finished == ["write", "read"]


async def test_cancelled_request_leaves_the_connection_usable(servers: Servers) -> None:
    uri = servers.nbdkit("--filter=delay", "memory", "4M", "delay-read=500ms")
    data = os.urandom(8192)
    async with connect(uri) as conn:
        await conn.pwrite(data, 0)
        with trio.move_on_after(0.05) as scope:
            await conn.pread(8192, 0)
        assert scope.cancelled_caught
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.05):
                await conn.pread(4096, 4096)
        # The abandoned replies arrive later and are dropped; the next call gets its own.
        await conn.pwrite(data[::-1], 0)
        assert await conn.pread(8192, 0) == data[::-1]
        assert conn._pending == {}


async def test_cancelled_read_never_writes_into_the_callers_buffer(servers: Servers) -> None:
    uri = servers.nbdkit("--filter=delay", "memory", "4M", "delay-read=300ms")
    async with connect(uri) as conn:
        await conn.pwrite(b"\xee" * 65536, 0)
        buffer = bytearray(65536)
        with trio.move_on_after(0.05):
            await conn.pread_into(buffer, 0)
        buffer[:] = b"\x11" * 65536  # reused at once, as a caller may
    # Leaving the block waited for the abandoned reply: it went to scratch, not to `buffer`.
    assert buffer == b"\x11" * 65536


async def test_qemu_nbd_export(servers: Servers, tmp_path: Path) -> None:
    image = tmp_path / "qemu.img"
    with image.open("wb") as f:
        f.truncate(8 * MiB)
    uri = servers.qemu_nbd(image, "disk", "-D", "a qemu disk", "--cache=none", "--discard=unmap")
    data = os.urandom(3 * MiB)
    async with connect(uri, request_size=64 * MiB) as conn:
        assert conn.export_name == "disk"
        assert conn.description == "a qemu disk"
        assert conn.block_size[2] <= 32 * MiB  # qemu-nbd states its limit
        assert conn.request_size <= 32 * MiB  # and larger requests are never sent
        await conn.pwrite(data, MiB)
        await conn.zero(MiB, 5 * MiB)
        await conn.trim(4096, 7 * MiB)
        await conn.flush()
        assert await conn.pread(3 * MiB, MiB) == data
        extents = await conn.block_status(conn.size, 0)
        assert sum(n for _, n, _, _ in extents) == conn.size
    assert image.read_bytes()[MiB : 4 * MiB] == data
    assert await list_exports(uri) == [("disk", "a qemu disk")]


async def test_unknown_export_reports_the_server_message(servers: Servers, tmp_path: Path) -> None:
    image = tmp_path / "qemu.img"
    image.write_bytes(bytes(MiB))
    uri = servers.qemu_nbd(image, "disk")
    with pytest.raises(NBDOptionError) as info:
        async with connect(uri.replace("/disk?", "/nope?")):
            pass
    assert info.value.option == p.NBD_OPT_GO
    assert info.value.reply_type == p.NBD_REP_ERR_UNKNOWN
    assert "nope" in info.value.message  # qemu names the export it does not have


async def test_list_exports_from_nbdkit(servers: Servers) -> None:
    uri = servers.nbdkit(
        "--filter=exportname", "memory", "1M",
        "exportname=alpha", "exportname=beta", "exportname-list=explicit",
    )  # fmt: skip
    names = [name for name, _ in await list_exports(uri)]
    assert names == ["alpha", "beta"]


async def test_nbdcopy_reads_what_the_client_wrote(servers: Servers, tmp_path: Path) -> None:
    uri = servers.nbdkit("memory", "8M")
    data = os.urandom(8 * MiB)
    async with connect(uri) as conn:
        await conn.pwrite(data, 0)
        await conn.flush()
    out = tmp_path / "out.img"
    subprocess.run(["nbdcopy", uri, str(out)], check=True)
    assert out.read_bytes() == data


async def test_client_reads_what_nbdcopy_wrote(servers: Servers, tmp_path: Path) -> None:
    uri = servers.nbdkit("memory", "8M")
    source = tmp_path / "in.img"
    data = os.urandom(4 * MiB) + bytes(2 * MiB) + os.urandom(2 * MiB)
    source.write_bytes(data)
    subprocess.run(["nbdcopy", str(source), uri], check=True)
    async with connect(uri) as conn:
        assert await conn.pread(conn.size, 0) == data


async def test_connection_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(NBDConnectionError, match="cannot connect"):
        async with connect(f"nbd+unix:///?socket={tmp_path}/missing.sock"):
            pass
    with pytest.raises(URIError):
        async with connect("http://example.com/"):
            pass


async def test_range_checks_before_sending(servers: Servers) -> None:
    uri = servers.nbdkit("memory", "1M")
    async with connect(uri) as conn:
        with pytest.raises(LocalProtocolError, match="outside the export"):
            await conn.pread(4096, conn.size - 100)
        with pytest.raises(LocalProtocolError, match="outside the export"):
            await conn.pwrite(b"x", -1)


async def test_server_exit_fails_waiting_calls(servers: Servers) -> None:
    uri = servers.nbdkit("--filter=delay", "memory", "1M", "delay-read=2")
    async with connect(uri) as conn:

        async def kill_server() -> None:
            await trio.sleep(0.2)
            servers.procs[0].kill()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_server)
            with pytest.raises(NBDConnectionError):
                await conn.pread(4096, 0)
        with pytest.raises(NBDConnectionError):
            await conn.flush()


async def test_a_stalled_server_fails_sends_and_replies_within_the_timeout(
    servers: Servers, tmp_path: Path
) -> None:
    """A server that accepts and then stops reading and answering: a large write blocks in
    the send, a read waits for its reply, a new connection for its handshake; each fails
    after the timeout, never hangs."""
    import urllib.parse

    from sender.proxy import Proxy

    uri = servers.nbdkit("memory", "64M")
    target = Path(urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)["socket"][0])
    proxy = Proxy(tmp_path / "proxy.sock", target)
    via = f"nbd+unix:///?socket={tmp_path / 'proxy.sock'}"
    await trio.to_thread.run_sync(proxy.__enter__)
    try:
        async with connect(via, timeout=1.0) as conn:
            await conn.pwrite(b"x" * 4096, 0)
            await trio.to_thread.run_sync(proxy.stall)
            with trio.fail_after(10), pytest.raises(NBDConnectionError, match="stalled"):
                await conn.pwrite(b"y" * (32 << 20), 0)  # far more than the socket buffers
        await trio.to_thread.run_sync(proxy.stall, False)
        async with connect(via, timeout=1.0) as conn:
            await trio.to_thread.run_sync(proxy.stall)
            with trio.fail_after(10), pytest.raises(NBDConnectionError, match="stalled"):
                await conn.pread(4096, 0)
        with trio.fail_after(10), pytest.raises(NBDConnectionError, match="stalled"):
            async with connect(via, timeout=1.0):
                pass
        await trio.to_thread.run_sync(proxy.stall, False)
    finally:
        await trio.to_thread.run_sync(proxy.__exit__, None, None, None)
