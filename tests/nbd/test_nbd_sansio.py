"""The sans-IO client against the sans-IO server role, wired together in memory."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nbd_testserver import ALL_FLAGS, DiskServer, connect_in_memory, events

from nbdsink.nbd import protocol as p
from nbdsink.nbd.errors import LocalProtocolError, RemoteProtocolError, UnsupportedError
from nbdsink.nbd.events import (
    NEED_DATA,
    ConnectionClosed,
    ExportReady,
    OptionAck,
    OptionError,
    Reply,
    ServerExport,
)
from nbdsink.nbd.sansio import ClientConnection, State
from nbdsink.nbd.server import ServerConnection

S = ServerConnection  # reply builders are static


def roundtrip(client: ClientConnection, server: DiskServer, *requests: bytes) -> list[Reply]:
    """Send request bytes, feed back whatever the server answers (queued ones too)."""
    out = server.feed(b"".join(requests)) + server.release()
    client.receive_data(out)
    replies = events(client)
    assert all(isinstance(r, Reply) for r in replies)
    return replies  # type: ignore[return-value]


def write(client: ClientConnection, offset: int, data: bytes, flags: int = 0) -> bytes:
    _, header = client.request(p.NBD_CMD_WRITE, offset, len(data), flags, data)
    return header + data


def test_handshake_go_reports_the_export() -> None:
    server = DiskServer(size=1 << 20, block_size=(512, 4096, 65536))
    client = connect_in_memory(server)
    assert client.state is State.TRANSMISSION
    assert client.structured_replies
    assert client.meta_contexts == {7: p.BASE_ALLOCATION}
    export = client.export
    assert isinstance(export, ExportReady)
    assert export.size == 1 << 20
    assert export.flags == ALL_FLAGS
    assert export.block_size == (512, 4096, 65536)
    assert export.description == "a test disk"
    assert client.limits == (512, 4096, 65536)


@pytest.mark.parametrize("zeroes", [True, False])
def test_export_name_fallback_without_go(zeroes: bool) -> None:
    flags = p.NBD_FLAG_FIXED_NEWSTYLE | (p.NBD_FLAG_NO_ZEROES if zeroes else 0)
    server = DiskServer(go=False, structured=False, handshake_flags=flags)
    client = connect_in_memory(server, "other")
    assert client.export is not None
    assert client.export.size == server.size
    assert client.export.block_size is None
    assert client.export.name == "other"
    assert not client.structured_replies
    assert client.limits == (1, 4096, p.DEFAULT_MAX_PAYLOAD)
    # Simple replies carry read data straight after the header.
    data = os.urandom(8192)
    roundtrip(client, server, write(client, 4096, data))
    _, header = client.request(p.NBD_CMD_READ, 4096, 8192)
    [reply] = roundtrip(client, server, header)
    assert reply.error == 0 and reply.data == data


def test_unknown_export_is_an_option_error_with_the_server_message() -> None:
    server = DiskServer()
    client = ClientConnection()
    client.receive_data(server.start())
    events(client)
    client.receive_data(server.feed(client.send_client_flags() + client.opt_go("nope")))
    [event] = events(client)
    assert event == OptionError(p.NBD_OPT_GO, p.NBD_REP_ERR_UNKNOWN, "no such export")
    assert client.state is State.OPTIONS  # another option may follow


def test_list_exports_and_abort() -> None:
    server = DiskServer(exports=("a", "b"))
    client = ClientConnection()
    client.receive_data(server.start())
    events(client)
    client.receive_data(server.feed(client.send_client_flags() + client.opt_list()))
    assert events(client) == [
        ServerExport("a", "desc"),
        ServerExport("b", "desc"),
        OptionAck(p.NBD_OPT_LIST),
    ]
    client.receive_data(server.feed(client.opt_abort()))
    assert events(client) == [OptionAck(p.NBD_OPT_ABORT)]
    client.receive_data(b"")
    assert isinstance(client.next_event(), ConnectionClosed)


@pytest.mark.parametrize("chunk_size", [0, 512, 1536])
def test_structured_reads_out_of_order_reassemble(chunk_size: int) -> None:
    server = DiskServer(chunk_size=chunk_size, reverse=True)
    client = connect_in_memory(server)
    data = os.urandom(3 * 4096) + bytes(4096) + os.urandom(4096)
    roundtrip(client, server, write(client, 8192, data))
    cookies = []
    headers = []
    for offset in (8192, 8192 + 4096, 8192 + 8192):
        cookie, header = client.request(p.NBD_CMD_READ, offset, 12288)
        cookies.append(cookie)
        headers.append(header)
    replies = roundtrip(client, server, *headers)
    assert [r.cookie for r in replies] == cookies[::-1]  # the server answered last first
    for reply in replies:
        assert reply.error == 0
        assert reply.data == server.disk[reply.offset : reply.offset + reply.length]
    assert client.in_flight == 0


def test_read_into_a_caller_buffer_and_receive_buffer_path() -> None:
    server = DiskServer()
    client = connect_in_memory(server)
    data = os.urandom(65536)
    roundtrip(client, server, write(client, 0, data))
    target = bytearray(65536)
    _, header = client.request(p.NBD_CMD_READ, 0, 65536, into=memoryview(target))
    wire = server.feed(header)
    # Deliver the reply header by receive_data, the payload through recv_into-style calls.
    client.receive_data(wire[:40])
    assert client.next_event() is NEED_DATA
    position = 40
    while (view := client.receive_buffer()) is not None:
        n = min(len(view), 10000)
        view[:n] = wire[position : position + n]
        client.received_into(n)
        position += n
        event = client.next_event()
        if event is not NEED_DATA:
            break
    assert isinstance(event, Reply)
    assert event.data is not None and bytes(event.data) == data
    assert target == data
    assert position == len(wire)


def test_writes_zeroes_trim_flush_and_block_status() -> None:
    server = DiskServer()
    client = connect_in_memory(server)
    roundtrip(client, server, write(client, 0, b"\xff" * 16384, p.NBD_CMD_FLAG_FUA))
    _, zero = client.request(
        p.NBD_CMD_WRITE_ZEROES, 4096, 4096, p.NBD_CMD_FLAG_NO_HOLE | p.NBD_CMD_FLAG_FAST_ZERO
    )
    _, trim = client.request(p.NBD_CMD_TRIM, 12288, 4096)
    _, flush = client.request(p.NBD_CMD_FLUSH)
    _, cache = client.request(p.NBD_CMD_CACHE, 0, 4096)
    replies = roundtrip(client, server, zero, trim, flush, cache)
    assert [r.error for r in replies] == [0, 0, 0, 0]
    assert server.requests[1].flags == p.NBD_CMD_FLAG_NO_HOLE | p.NBD_CMD_FLAG_FAST_ZERO
    _, status = client.request(p.NBD_CMD_BLOCK_STATUS, 0, 16384)
    [reply] = roundtrip(client, server, status)
    hole = p.NBD_STATE_HOLE | p.NBD_STATE_ZERO
    assert reply.extents == ((0, 4096, 0), (4096, 4096, hole), (8192, 4096, 0), (12288, 4096, hole))


def test_error_replies_carry_errno_message_and_offset() -> None:
    server = DiskServer()
    client = connect_in_memory(server)
    cookie, _ = client.request(p.NBD_CMD_READ, 0, 8192)
    client.receive_data(
        S.data_chunk(cookie, 0, b"x" * 4096)
        + S.error_chunk(cookie, p.NBD_EIO, "bad sector", offset=4096, done=False)
        + S.error_chunk(cookie, p.NBD_ENOSPC, "later error")
    )
    [reply] = events(client)
    assert (reply.error, reply.message, reply.error_offset) == (p.NBD_EIO, "bad sector", 4096)
    assert reply.data is None


def test_disconnect_then_eof_closes_cleanly() -> None:
    server = DiskServer()
    client = connect_in_memory(server)
    server.feed(client.disconnect())
    with pytest.raises(LocalProtocolError):
        client.request(p.NBD_CMD_FLUSH)
    client.receive_data(b"")
    assert isinstance(client.next_event(), ConnectionClosed)


@pytest.mark.parametrize(
    ("flags", "command", "offset", "length", "error"),
    [
        (ALL_FLAGS & ~p.NBD_FLAG_SEND_FUA, p.NBD_CMD_WRITE, 0, 512, UnsupportedError),
        (ALL_FLAGS & ~p.NBD_FLAG_SEND_TRIM, p.NBD_CMD_TRIM, 0, 512, UnsupportedError),
        (ALL_FLAGS & ~p.NBD_FLAG_SEND_FLUSH, p.NBD_CMD_FLUSH, 0, 0, UnsupportedError),
        (ALL_FLAGS | p.NBD_FLAG_READ_ONLY, p.NBD_CMD_WRITE, 0, 512, UnsupportedError),
        (ALL_FLAGS, p.NBD_CMD_READ, 100, 512, LocalProtocolError),  # unaligned
        (ALL_FLAGS, p.NBD_CMD_READ, 0, 2 << 20, LocalProtocolError),  # over the maximum
        (ALL_FLAGS, p.NBD_CMD_READ, (1 << 20) - 512, 1024, LocalProtocolError),  # past the end
        (ALL_FLAGS, p.NBD_CMD_READ, 0, 0, LocalProtocolError),
    ],
)
def test_requests_the_server_did_not_advertise_are_refused_locally(
    flags: int, command: int, offset: int, length: int, error: type[Exception]
) -> None:
    server = DiskServer(flags=flags)
    client = connect_in_memory(server)
    cmd_flags = p.NBD_CMD_FLAG_FUA if command == p.NBD_CMD_WRITE else 0
    data = bytes(length) if command == p.NBD_CMD_WRITE else None
    with pytest.raises(error):
        client.request(command, offset, length, cmd_flags, data)
    assert client.in_flight == 0
    assert client.state is State.TRANSMISSION


def test_fast_zero_and_df_need_advertising() -> None:
    server = DiskServer(flags=ALL_FLAGS & ~p.NBD_FLAG_SEND_FAST_ZERO)
    client = connect_in_memory(server)
    with pytest.raises(UnsupportedError, match="FAST_ZERO"):
        client.request(p.NBD_CMD_WRITE_ZEROES, 0, 512, p.NBD_CMD_FLAG_FAST_ZERO)
    with pytest.raises(UnsupportedError, match="DF"):
        client.request(p.NBD_CMD_READ, 0, 512, p.NBD_CMD_FLAG_DF)
    with pytest.raises(LocalProtocolError, match="does not apply"):
        client.request(p.NBD_CMD_READ, 0, 512, p.NBD_CMD_FLAG_NO_HOLE)


def test_block_status_needs_a_context() -> None:
    server = DiskServer(structured=False)
    client = connect_in_memory(server)
    with pytest.raises(UnsupportedError, match="metadata context"):
        client.request(p.NBD_CMD_BLOCK_STATUS, 0, 4096)


def _broken(server_bytes: bytes, request_length: int = 4096) -> RemoteProtocolError:
    client = connect_in_memory(DiskServer())
    client.request(p.NBD_CMD_READ, 0, request_length)  # cookie 1
    client.request(p.NBD_CMD_WRITE, 0, 512, 0, bytes(512))  # cookie 2
    client.receive_data(server_bytes)
    with pytest.raises(RemoteProtocolError) as info:
        events(client)
        client.receive_data(b"")
        events(client)
    assert client.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="already failed"):
        client.next_event()
    return info.value


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\x12\x34\x56\x78" + bytes(12), "bad reply magic"),
        (S.simple_reply(99), "not in flight"),
        (S.data_chunk(1, 4000, b"x" * 200, done=True), "outside its request"),
        (S.data_chunk(2, 0, b"x" * 512, done=True), "sent to a WRITE"),
        (S.hole_chunk(1, 0, 8192, done=True), "outside"),
        (S.data_chunk(1, 0, b"x" * 4096) + S.hole_chunk(1, 0, 512, done=True), "cover"),
        (S.data_chunk(1, 0, b"x" * 2048, done=True), "cover"),
        (S.chunk(1, p.NBD_REPLY_TYPE_OFFSET_DATA, bytes(8) + b"x" * 5000), "bad length"),
        (S.chunk(1, 77, b"", done=True), "unknown structured reply type"),
        (S.chunk(1, p.NBD_REPLY_TYPE_NONE, b"", done=False), "must be empty and final"),
        (S.error_chunk(1, 0, "no errno"), "error number 0"),
        (S.chunk(2, p.NBD_REPLY_TYPE_BLOCK_STATUS, bytes(12), done=True), "sent to a WRITE"),
        (S.simple_reply(1) + b"x" * 100, "mid-payload"),
        (S.data_chunk(1, 0, b"x" * 4096)[:30], "closed the connection"),
        (S.simple_reply(2)[:10], "middle of a message"),
    ],
)
def test_server_protocol_violations_raise_and_kill_the_connection(wire: bytes, match: str) -> None:
    assert match in str(_broken(wire))


def test_oversized_chunk_fails_before_any_payload_arrives() -> None:
    header = p.STRUCTURED_HEADER.pack(
        p.STRUCTURED_REPLY_MAGIC, 0, p.NBD_REPLY_TYPE_ERROR, 1, 0xFFFFFFFF
    )
    assert "bad length" in str(_broken(header))


def test_structured_reply_without_negotiation_is_a_violation() -> None:
    client = connect_in_memory(DiskServer(structured=False))
    cookie, _ = client.request(p.NBD_CMD_READ, 0, 512)
    client.receive_data(S.data_chunk(cookie, 0, bytes(512), done=True))
    with pytest.raises(RemoteProtocolError, match="without NBD_OPT_STRUCTURED_REPLY"):
        client.next_event()


@pytest.mark.parametrize(
    ("greeting", "match"),
    [
        (b"NOTMAGIC" + bytes(10), "not an NBD server"),
        (p.U64.pack(p.NBDMAGIC) + p.U64.pack(p.OLDSTYLE_MAGIC) + bytes(2), "oldstyle"),
        (p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, 0), "fixed newstyle"),
        (b"", "before its greeting"),
    ],
)
def test_bad_greetings(greeting: bytes, match: str) -> None:
    client = ClientConnection()
    client.receive_data(greeting)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=match):
        client.next_event()


def test_option_reply_checks() -> None:
    def after_flags() -> ClientConnection:
        client = ClientConnection()
        client.receive_data(DiskServer().start())
        events(client)
        client.send_client_flags()
        return client

    client = after_flags()
    client.opt_list()
    client.receive_data(p.encode_option_reply(p.NBD_OPT_GO, p.NBD_REP_ACK))
    with pytest.raises(RemoteProtocolError, match="while waiting for NBD_OPT_LIST"):
        client.next_event()
    client = after_flags()
    client.opt_list()
    client.receive_data(p.OPTION_REPLY_HEADER.pack(p.OPTION_REPLY_MAGIC, 3, 2, 1 << 30))
    with pytest.raises(RemoteProtocolError, match="too long"):
        client.next_event()
    client = after_flags()
    client.opt_go("")
    client.receive_data(p.encode_option_reply(p.NBD_OPT_GO, p.NBD_REP_ACK))
    with pytest.raises(RemoteProtocolError, match="without NBD_INFO_EXPORT"):
        client.next_event()
    client = after_flags()
    client.opt_starttls()
    client.receive_data(p.encode_option_reply(p.NBD_OPT_STARTTLS, p.NBD_REP_ACK) + b"early")
    with pytest.raises(RemoteProtocolError, match="after accepting STARTTLS"):
        client.next_event()
    client = after_flags()
    client.receive_data(b"unprompted")
    with pytest.raises(RemoteProtocolError, match="unprompted"):
        client.next_event()


# ---- fuzzing: whatever the server sends, the client ends in an event or a clean error ------


def drain(client: ClientConnection, wire: bytes, step: int) -> None:
    """Feed ``wire`` in ``step``-byte pieces, then EOF; must end, and only in clean ways."""
    try:
        for start in range(0, len(wire), step):
            client.receive_data(wire[start : start + step])
            events(client)
        client.receive_data(b"")
        for _ in range(100):
            event = client.next_event()
            assert event is not NEED_DATA  # after EOF the client never waits for more
            if isinstance(event, ConnectionClosed):
                break
        else:
            raise AssertionError("events never stopped after EOF")
    except RemoteProtocolError:
        assert client.state is State.ERROR
    # Nothing is kept beyond what was fed: memory stays bounded by the input.
    assert len(client._buf) <= len(wire)


def valid_reply_stream() -> tuple[ClientConnection, bytes]:
    server = DiskServer(chunk_size=1024)
    client = connect_in_memory(server)
    server.disk[0:4096] = b"\x01" * 2048 + bytes(2048)
    wire = b""
    for command, offset, length in [
        (p.NBD_CMD_READ, 0, 4096),
        (p.NBD_CMD_BLOCK_STATUS, 0, 8192),
        (p.NBD_CMD_FLUSH, 0, 0),
        (p.NBD_CMD_READ, 8192, 2048),
    ]:
        _, header = client.request(command, offset, length)
        wire += server.feed(header)
    return client, wire


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(wire=st.binary(max_size=2000), step=st.integers(1, 64))
def test_fuzz_random_bytes_in_transmission(wire: bytes, step: int) -> None:
    client, _ = valid_reply_stream()
    drain(client, wire, step)


@FUZZ
@given(
    data=st.data(),
    step=st.integers(1, 4096),
)
def test_fuzz_mutated_valid_replies(data: st.DataObject, step: int) -> None:
    client, wire = valid_reply_stream()
    mutated = bytearray(wire)
    for _ in range(data.draw(st.integers(0, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(0, len(mutated) - 1)))
        if kind == "flip" and mutated:
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del mutated[at:]
        elif kind == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=32))
        elif kind == "delete":
            del mutated[at : at + data.draw(st.integers(1, 32))]
    drain(client, bytes(mutated), step)


@FUZZ
@given(wire=st.binary(max_size=600), step=st.integers(1, 64))
def test_fuzz_handshake(wire: bytes, step: int) -> None:
    client = ClientConnection()
    client.receive_data(DiskServer().start())
    events(client)
    client.send_client_flags()
    client.opt_go("")
    drain(client, wire, step)
