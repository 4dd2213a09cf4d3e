"""An in-memory NBD server built on the sans-IO server role, for driving the client.

``DiskServer`` answers options and requests against a bytearray; knobs choose what it
advertises and how it replies (simple or structured, chunked, out of order). ``pump`` wires a
client state machine to it synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nbdsink.nbd import protocol as p
from nbdsink.nbd.events import NEED_DATA, ConnectionClosed, Event
from nbdsink.nbd.sansio import ClientConnection
from nbdsink.nbd.server import (
    ClientClosed,
    ClientFlags,
    OptionRequest,
    Request,
    ServerConnection,
)

ALL_FLAGS = (
    p.NBD_FLAG_HAS_FLAGS
    | p.NBD_FLAG_SEND_FLUSH
    | p.NBD_FLAG_SEND_FUA
    | p.NBD_FLAG_SEND_TRIM
    | p.NBD_FLAG_SEND_WRITE_ZEROES
    | p.NBD_FLAG_SEND_FAST_ZERO
    | p.NBD_FLAG_SEND_CACHE
    | p.NBD_FLAG_CAN_MULTI_CONN
)


@dataclass
class DiskServer:
    """A scripted NBD server over a bytearray."""

    size: int = 1 << 20
    flags: int = ALL_FLAGS
    handshake_flags: int = p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES
    structured: bool = True  # accept NBD_OPT_STRUCTURED_REPLY
    go: bool = True  # accept NBD_OPT_GO (else ERR_UNSUP: the client falls back)
    block_size: tuple[int, int, int] | None = (512, 4096, 1 << 20)
    description: str = "a test disk"
    chunk_size: int = 0  # >0: split read replies into chunks of this size (holes for zeroes)
    reverse: bool = False  # queue replies and release them in reverse order on flush()
    exports: tuple[str, ...] = ("", "other")
    disk: bytearray = field(default_factory=bytearray)
    requests: list[Request] = field(default_factory=list)
    queued: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conn = ServerConnection()
        if not self.disk:
            self.disk = bytearray(self.size)
        self.structured_on = False
        self.context_id = 0

    def start(self) -> bytes:
        return self.conn.greeting(self.handshake_flags)

    def feed(self, data: bytes) -> bytes:
        """Client bytes in, server bytes out."""
        self.conn.receive_data(data)
        out = bytearray()
        while (event := self.conn.next_event()) is not None:
            if isinstance(event, ClientClosed):
                break
            out += self.handle(event)
        return bytes(out)

    def release(self) -> bytes:
        """Queued replies, last first."""
        out = b"".join(reversed(self.queued))
        self.queued.clear()
        return out

    def handle(self, event: ClientFlags | OptionRequest | Request) -> bytes:
        if isinstance(event, ClientFlags):
            return b""
        if isinstance(event, OptionRequest):
            return self.option(event)
        self.requests.append(event)
        reply = self.request(event)
        if self.reverse and event.command != p.NBD_CMD_DISC:
            self.queued.append(reply)
            return b""
        return reply

    def option(self, event: OptionRequest) -> bytes:
        conn, opt = self.conn, event.option
        if opt == p.NBD_OPT_STRUCTURED_REPLY:
            if not self.structured:
                return conn.option_reply(opt, p.NBD_REP_ERR_UNSUP)
            self.structured_on = True
            return conn.option_reply(opt, p.NBD_REP_ACK)
        if opt == p.NBD_OPT_SET_META_CONTEXT:
            self.context_id = 7
            data = p.U32.pack(7) + p.BASE_ALLOCATION.encode()
            return conn.option_reply(opt, p.NBD_REP_META_CONTEXT, data) + conn.option_reply(
                opt, p.NBD_REP_ACK
            )
        if opt == p.NBD_OPT_LIST:
            out = b"".join(
                conn.option_reply(opt, p.NBD_REP_SERVER, p.encode_string(name) + b"desc")
                for name in self.exports
            )
            return out + conn.option_reply(opt, p.NBD_REP_ACK)
        if opt == p.NBD_OPT_GO and self.go:
            (n,) = p.U32.unpack_from(event.data)
            name = event.data[4 : 4 + n].decode()
            if name not in self.exports:
                return conn.option_reply(opt, p.NBD_REP_ERR_UNKNOWN, b"no such export")
            out = conn.info_export(opt, self.size, self.flags)
            if self.block_size:
                out += conn.info_block_size(opt, *self.block_size)
            desc = p.U16.pack(p.NBD_INFO_DESCRIPTION) + self.description.encode()
            out += conn.option_reply(opt, p.NBD_REP_INFO, desc)
            return out + conn.option_reply(opt, p.NBD_REP_ACK)
        if opt == p.NBD_OPT_EXPORT_NAME:
            return conn.export_name_reply(self.size, self.flags)
        if opt == p.NBD_OPT_ABORT:
            return conn.option_reply(opt, p.NBD_REP_ACK)
        return conn.option_reply(opt, p.NBD_REP_ERR_UNSUP)

    def request(self, req: Request) -> bytes:
        conn, cookie = self.conn, req.cookie
        end = req.offset + req.length
        if req.command == p.NBD_CMD_DISC:
            return b""
        if req.command in (p.NBD_CMD_READ, p.NBD_CMD_WRITE) and end > self.size:
            return self._error(cookie, p.NBD_EINVAL, "beyond the end")
        if req.command == p.NBD_CMD_WRITE:
            self.disk[req.offset : end] = req.data
            return self._ok(cookie)
        if req.command in (p.NBD_CMD_WRITE_ZEROES, p.NBD_CMD_TRIM):
            self.disk[req.offset : end] = bytes(req.length)
            return self._ok(cookie)
        if req.command == p.NBD_CMD_READ:
            data = bytes(self.disk[req.offset : end])
            if not self.structured_on:
                return conn.simple_reply(cookie, 0, data)
            if not self.chunk_size:
                return conn.data_chunk(cookie, req.offset, data, done=True)
            chunks = []
            for start in range(0, req.length, self.chunk_size):
                piece = data[start : start + self.chunk_size]
                if piece.count(0) == len(piece):
                    chunks.append(conn.hole_chunk(cookie, req.offset + start, len(piece)))
                else:
                    chunks.append(conn.data_chunk(cookie, req.offset + start, piece))
            # Send them out of order, then an empty final chunk.
            return b"".join(reversed(chunks)) + conn.chunk(cookie, p.NBD_REPLY_TYPE_NONE, done=True)
        if req.command == p.NBD_CMD_BLOCK_STATUS:
            extents = []
            for start in range(req.offset, end, 4096):
                piece = self.disk[start : min(start + 4096, end)]
                zero = piece.count(0) == len(piece)
                state = p.NBD_STATE_HOLE | p.NBD_STATE_ZERO if zero else 0
                extents.append((len(piece), state))
            return conn.block_status_chunk(cookie, self.context_id, extents)
        return self._ok(cookie)

    def _ok(self, cookie: int) -> bytes:
        if self.structured_on:
            return self.conn.chunk(cookie, p.NBD_REPLY_TYPE_NONE, done=True)
        return self.conn.simple_reply(cookie)

    def _error(self, cookie: int, error: int, message: str) -> bytes:
        if self.structured_on:
            return self.conn.error_chunk(cookie, error, message)
        return self.conn.simple_reply(cookie, error)


def events(client: ClientConnection) -> list[Event]:
    """Every event the client can produce from what it has been fed."""
    out: list[Event] = []
    while (event := client.next_event()) is not NEED_DATA:
        out.append(event)  # type: ignore[arg-type]
        if isinstance(event, ConnectionClosed):
            break
        if len(out) > 10_000:
            raise AssertionError("runaway event stream")
    return out


def connect_in_memory(server: DiskServer, export: str = "") -> ClientConnection:
    """Run the client's handshake against ``server`` the way the trio client does."""
    client = ClientConnection()
    client.receive_data(server.start())
    events(client)
    out = client.send_client_flags()
    client.receive_data(server.feed(out + client.opt_structured_reply()))
    events(client)
    if client.structured_replies:
        client.receive_data(server.feed(client.opt_set_meta_context(export, [p.BASE_ALLOCATION])))
        events(client)
    client.receive_data(server.feed(client.opt_go(export)))
    events(client)
    if client.export is None:
        assert not server.go
        client.receive_data(server.feed(client.opt_export_name(export)))
        events(client)
    assert client.export is not None
    return client
