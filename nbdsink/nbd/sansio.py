"""The NBD client protocol as a sans-IO state machine: bytes in, events out.

:class:`ClientConnection` does no I/O and knows nothing of sockets, trio or time. The
transport feeds it the server's bytes (:meth:`~ClientConnection.receive_data`, or
:meth:`~ClientConnection.receive_buffer` + :meth:`~ClientConnection.received_into` to let a
large read payload land straight in its destination), pulls events with
:meth:`~ClientConnection.next_event`, and sends whatever bytes the request methods return.

Every byte from the server is checked: a bad magic, a reply to a cookie not in flight, a
chunk outside its request, an oversized or truncated message all raise
:class:`~nbdsink.nbd.errors.RemoteProtocolError`, after which the connection is dead. Requests
the server did not advertise support for raise :class:`~nbdsink.nbd.errors.LocalProtocolError`
before anything is sent. Memory stays bounded: payloads are only as large as the request they
answer, and nothing is buffered beyond what the transport hands in.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from nbdsink.nbd import protocol as p
from nbdsink.nbd.errors import LocalProtocolError, RemoteProtocolError, UnsupportedError
from nbdsink.nbd.events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportReady,
    Greeting,
    MetaContext,
    NeedData,
    OptionAck,
    OptionError,
    Reply,
    ServerExport,
)


class State(enum.Enum):
    """Where the connection is; the value reads well in error messages."""

    GREETING = "waiting for the server greeting"
    CLIENT_FLAGS = "greeting received, client flags not yet sent"
    OPTIONS = "negotiating options"
    OPTION_REPLY = "waiting for an option reply"
    TLS = "STARTTLS accepted, waiting for the transport to start TLS"
    EXPORT_NAME_REPLY = "waiting for the NBD_OPT_EXPORT_NAME reply"
    TRANSMISSION = "transmission"
    DISCONNECTING = "disconnect sent"
    CLOSED = "closed"
    ERROR = "failed"


_LARGE_READ = 64 * 1024
"""READ payloads at least this large are received directly into their buffer."""
_HEADER_READ = p.STRUCTURED_HEADER.size + 8 + 4
"""A structured header plus an OFFSET_DATA offset (a simple header is shorter), rounded up."""


class _Rx(enum.Enum):
    """What the transmission-phase parser waits for."""

    HEADER = enum.auto()
    SINK = enum.auto()  # payload bytes streaming into a read buffer
    CHUNK = enum.auto()  # a whole (bounded) structured chunk payload


# Which option reply types (besides ACK and errors) each option may receive.
_OPTION_REPLY_TYPES = {
    p.NBD_OPT_LIST: {p.NBD_REP_SERVER},
    p.NBD_OPT_GO: {p.NBD_REP_INFO},
    p.NBD_OPT_INFO: {p.NBD_REP_INFO},
    p.NBD_OPT_SET_META_CONTEXT: {p.NBD_REP_META_CONTEXT},
    p.NBD_OPT_LIST_META_CONTEXT: {p.NBD_REP_META_CONTEXT},
}

# Commands that address a range of the export.
_RANGE_COMMANDS = {
    p.NBD_CMD_READ,
    p.NBD_CMD_WRITE,
    p.NBD_CMD_TRIM,
    p.NBD_CMD_CACHE,
    p.NBD_CMD_WRITE_ZEROES,
    p.NBD_CMD_BLOCK_STATUS,
}
_WRITING_COMMANDS = {p.NBD_CMD_WRITE, p.NBD_CMD_TRIM, p.NBD_CMD_WRITE_ZEROES}
# Command -> transmission flag the server must have set for us to send it.
_COMMAND_NEEDS = {
    p.NBD_CMD_FLUSH: p.NBD_FLAG_SEND_FLUSH,
    p.NBD_CMD_TRIM: p.NBD_FLAG_SEND_TRIM,
    p.NBD_CMD_WRITE_ZEROES: p.NBD_FLAG_SEND_WRITE_ZEROES,
    p.NBD_CMD_CACHE: p.NBD_FLAG_SEND_CACHE,
}
# Command flag -> (commands it applies to, transmission flag it needs or 0).
_FLAG_RULES = {
    p.NBD_CMD_FLAG_FUA: (_WRITING_COMMANDS, p.NBD_FLAG_SEND_FUA),
    p.NBD_CMD_FLAG_NO_HOLE: ({p.NBD_CMD_WRITE_ZEROES}, 0),
    p.NBD_CMD_FLAG_DF: ({p.NBD_CMD_READ}, p.NBD_FLAG_SEND_DF),
    p.NBD_CMD_FLAG_REQ_ONE: ({p.NBD_CMD_BLOCK_STATUS}, 0),
    p.NBD_CMD_FLAG_FAST_ZERO: ({p.NBD_CMD_WRITE_ZEROES}, p.NBD_FLAG_SEND_FAST_ZERO),
}
_FLAG_NAMES = {
    p.NBD_CMD_FLAG_FUA: "FUA",
    p.NBD_CMD_FLAG_NO_HOLE: "NO_HOLE",
    p.NBD_CMD_FLAG_DF: "DF",
    p.NBD_CMD_FLAG_REQ_ONE: "REQ_ONE",
    p.NBD_CMD_FLAG_FAST_ZERO: "FAST_ZERO",
}


@dataclass
class _InFlight:
    """A request sent and not yet fully answered."""

    command: int
    offset: int
    length: int
    buffer: bytearray | memoryview | None = None
    structured: bool = False  # a structured chunk has arrived for it
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of data/holes
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    extents: tuple[tuple[int, int, int], ...] | None = None


def _text(raw: bytes | bytearray | memoryview) -> str:
    return bytes(raw).decode("utf-8", errors="replace")


class ClientConnection:
    """The client side of one NBD connection, from greeting to disconnect."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self.handshake_flags = 0
        self.no_zeroes = False
        self.structured_replies = False
        self.meta_contexts: dict[int, str] = {}
        self.export: ExportReady | None = None
        self._buf = bytearray()
        self._eof = False
        self._option = 0  # the option whose replies we await
        self._meta_queries: set[str] = set()
        # NBD_INFO_* gathered during NBD_OPT_GO
        self._info_export: tuple[int, int] | None = None
        self._info_block_size: tuple[int, int, int] | None = None
        self._info_name: str | None = None
        self._info_description: str | None = None
        self._next_cookie = 1
        self._inflight: dict[int, _InFlight] = {}
        self._large_reads = 0  # READs in flight whose payload is worth a recv_into
        # transmission-phase receive state
        self._rx = _Rx.HEADER
        self._sink: memoryview | None = None
        self._sink_pos = 0
        self._sink_end = 0
        self._cookie = 0  # the reply being parsed
        self._chunk_flags = 0
        self._chunk_type = 0
        self._chunk_length = 0
        self._chunk_data_length = 0

    # ---- input -------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the server; empty data means the server closed the connection."""
        if not data:
            self._eof = True
            return
        if self._sink is not None and not self._buf:
            # Payload for a read buffer: copy it there directly, keep only the rest.
            n = min(len(data), self._sink_end - self._sink_pos)
            self._sink[self._sink_pos : self._sink_pos + n] = data[:n]
            self._sink_pos += n
            if n < len(data):
                self._buf += data[n:]
            return
        self._buf += data

    def receive_buffer(self) -> memoryview | None:
        """Where the next payload bytes belong, for a ``recv_into``-style read; else None.

        Only valid right after :meth:`next_event` returned :data:`NEED_DATA`. Report how
        many bytes were written with :meth:`received_into`.
        """
        if self._sink is None or self._buf or self._eof:
            return None
        return self._sink[self._sink_pos : self._sink_end]

    def received_into(self, n: int) -> None:
        """``n`` bytes were written at the start of :meth:`receive_buffer`; 0 means EOF."""
        if n == 0:
            self._eof = True
            return
        if self._sink is None or n > self._sink_end - self._sink_pos:
            raise LocalProtocolError("received_into() without a matching receive_buffer()")
        self._sink_pos += n

    def receive_size(self, default: int) -> int:
        """How many bytes the transport should ask for next.

        While large reads are in flight, just enough for the next reply header (and a data
        chunk's offset): their payloads then go straight to the caller's buffer through
        :meth:`receive_buffer` instead of being copied out of a big intermediate read.
        """
        if self._large_reads and self._sink is None:
            return _HEADER_READ
        return default

    @property
    def in_flight(self) -> int:
        """Number of requests sent and not yet answered."""
        return len(self._inflight)

    def next_event(self) -> Event | NeedData:
        """The next complete event, or :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` (and the connection is then dead) on anything
        the server may not send.
        """
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection already failed")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.state = State.ERROR
            self._sink = None
            raise

    # ---- handshake output --------------------------------------------------------------

    def send_client_flags(self) -> bytes:
        """Answer the greeting (fixed newstyle, and no zero padding if the server allows)."""
        self._require(State.CLIENT_FLAGS)
        flags = p.NBD_FLAG_C_FIXED_NEWSTYLE
        if self.handshake_flags & p.NBD_FLAG_NO_ZEROES:
            flags |= p.NBD_FLAG_C_NO_ZEROES
            self.no_zeroes = True
        self.state = State.OPTIONS
        return p.U32.pack(flags)

    def opt_starttls(self) -> bytes:
        """``NBD_OPT_STARTTLS``; after its ACK the transport must start TLS, then call
        :meth:`tls_started`."""
        return self._option_request(p.NBD_OPT_STARTTLS)

    def tls_started(self) -> None:
        """The transport now runs TLS; option negotiation continues over it."""
        self._require(State.TLS)
        self.state = State.OPTIONS

    def opt_structured_reply(self) -> bytes:
        """``NBD_OPT_STRUCTURED_REPLY``."""
        return self._option_request(p.NBD_OPT_STRUCTURED_REPLY)

    def opt_set_meta_context(self, export: str, queries: Iterable[str]) -> bytes:
        """``NBD_OPT_SET_META_CONTEXT`` for ``export`` (needs structured replies first)."""
        if not self.structured_replies:
            raise LocalProtocolError("metadata contexts need structured replies first")
        query_list = list(queries)
        payload = p.encode_string(export) + p.U32.pack(len(query_list))
        payload += b"".join(p.encode_string(q) for q in query_list)
        self._meta_queries = set(query_list)
        self.meta_contexts = {}
        return self._option_request(p.NBD_OPT_SET_META_CONTEXT, payload)

    def opt_list(self) -> bytes:
        """``NBD_OPT_LIST``: the server answers with :class:`ServerExport` events, then ACK."""
        return self._option_request(p.NBD_OPT_LIST)

    def opt_go(
        self,
        export: str,
        infos: Iterable[int] = (p.NBD_INFO_BLOCK_SIZE, p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION),
    ) -> bytes:
        """``NBD_OPT_GO``; success ends in :class:`ExportReady`.

        Asking for ``NBD_INFO_BLOCK_SIZE`` promises to honour the server's block sizes,
        which :meth:`request` enforces.
        """
        wanted = list(infos)
        raw = export.encode()
        if len(raw) > p.MAX_STRING:
            raise LocalProtocolError(f"export name longer than {p.MAX_STRING} bytes")
        payload = p.U32.pack(len(raw)) + raw + p.U16.pack(len(wanted))
        payload += b"".join(p.U16.pack(i) for i in wanted)
        self._info_export = self._info_block_size = None
        self._info_name = self._info_description = None
        return self._option_request(p.NBD_OPT_GO, payload)

    def opt_export_name(self, export: str) -> bytes:
        """``NBD_OPT_EXPORT_NAME`` (the fallback for servers without ``NBD_OPT_GO``)."""
        raw = export.encode()
        if len(raw) > p.MAX_STRING:
            raise LocalProtocolError(f"export name longer than {p.MAX_STRING} bytes")
        self._require(State.OPTIONS)
        self._option = p.NBD_OPT_EXPORT_NAME
        self._info_name = export
        self.state = State.EXPORT_NAME_REPLY
        return p.encode_option(p.NBD_OPT_EXPORT_NAME, raw)

    def opt_abort(self) -> bytes:
        """``NBD_OPT_ABORT``: end the handshake; the server may ACK or just close."""
        return self._option_request(p.NBD_OPT_ABORT)

    def _option_request(self, option: int, payload: bytes = b"") -> bytes:
        self._require(State.OPTIONS)
        self._option = option
        self.state = State.OPTION_REPLY
        return p.encode_option(option, payload)

    # ---- transmission output -----------------------------------------------------------

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes | bytearray | memoryview | None = None,
        into: memoryview | None = None,
    ) -> tuple[int, bytes]:
        """Start a request; returns its cookie and the header to send.

        For ``NBD_CMD_WRITE`` the caller sends ``data`` right after the header (it is not
        copied into the returned bytes). A READ lands in ``into`` (a writable byte view of
        exactly ``length`` bytes) when given, else in a new bytearray. Raises :class:`LocalProtocolError` (before any
        state changes) for anything the server did not advertise or the protocol forbids.
        """
        self._require(State.TRANSMISSION)
        self._check_request(command, offset, length, flags, data)
        cookie = self._next_cookie
        self._next_cookie += 1
        buffer: bytearray | memoryview | None = None
        if command == p.NBD_CMD_READ:
            if into is not None and (into.readonly or into.nbytes != length):
                raise LocalProtocolError("READ target must be writable and `length` bytes")
            buffer = into if into is not None else bytearray(length)
        elif into is not None:
            raise LocalProtocolError("only READ takes a target buffer")
        self._inflight[cookie] = _InFlight(command, offset, length, buffer)
        if command == p.NBD_CMD_READ and length >= _LARGE_READ:
            self._large_reads += 1
        return cookie, p.REQUEST.pack(p.REQUEST_MAGIC, flags, command, cookie, offset, length)

    def discard_read(self, cookie: int) -> None:
        """Nobody wants this READ's data any more: the rest of its payload goes to a
        scratch buffer, never into the caller's (which it may already be reusing)."""
        req = self._inflight.get(cookie)
        if req is None or req.buffer is None:
            return
        scratch = bytearray(req.length)
        req.buffer = scratch
        if self._sink is not None and self._cookie == cookie:
            self._sink = memoryview(scratch)  # same offsets: both start at the request

    def disconnect(self) -> bytes:
        """``NBD_CMD_DISC``: no more requests; replies still in flight may arrive."""
        self._require(State.TRANSMISSION)
        self.state = State.DISCONNECTING
        return p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.NBD_CMD_DISC, 0, 0, 0)

    def _check_request(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int,
        data: bytes | bytearray | memoryview | None,
    ) -> None:
        export = self.export
        assert export is not None
        tflags = export.flags if export.flags & p.NBD_FLAG_HAS_FLAGS else 0
        name = p.command_name(command)
        if command == p.NBD_CMD_DISC:
            raise LocalProtocolError("use disconnect() to send NBD_CMD_DISC")
        if command in _WRITING_COMMANDS and tflags & p.NBD_FLAG_READ_ONLY:
            raise UnsupportedError(f"{name} on a read-only export")
        if command in _COMMAND_NEEDS and not tflags & _COMMAND_NEEDS[command]:
            raise UnsupportedError(f"the server does not support {name}")
        if command == p.NBD_CMD_BLOCK_STATUS and not self.meta_contexts:
            raise UnsupportedError("the server did not agree to any metadata context")
        if command not in _RANGE_COMMANDS and command != p.NBD_CMD_FLUSH:
            raise LocalProtocolError(f"unknown command {command}")
        for bit, (commands, needs) in _FLAG_RULES.items():
            if not flags & bit:
                continue
            if command not in commands:
                raise LocalProtocolError(f"flag {_FLAG_NAMES[bit]} does not apply to {name}")
            if needs and not tflags & needs:
                raise UnsupportedError(f"the server does not support flag {_FLAG_NAMES[bit]}")
        if flags & p.NBD_CMD_FLAG_DF and not self.structured_replies:
            raise UnsupportedError("flag DF needs structured replies")
        if flags & ~sum(_FLAG_RULES):
            raise LocalProtocolError(f"unknown command flags {flags:#x}")
        if command == p.NBD_CMD_FLUSH:
            if offset or length:
                raise LocalProtocolError("FLUSH takes neither offset nor length")
        else:
            if length <= 0 or length > 0xFFFFFFFF or offset < 0:
                raise LocalProtocolError(f"{name}: bad length {length} or offset {offset}")
            if offset + length > export.size:
                raise LocalProtocolError(
                    f"{name}: range {offset}+{length} beyond the export size {export.size}"
                )
            minimum, _, maximum = self.limits
            if offset % minimum or length % minimum:
                raise LocalProtocolError(
                    f"{name}: {offset}+{length} not aligned to the server's minimum block "
                    f"size {minimum}"
                )
            if command in (p.NBD_CMD_READ, p.NBD_CMD_WRITE) and length > maximum:
                raise LocalProtocolError(
                    f"{name}: {length} bytes exceeds the server's maximum payload {maximum}"
                )
        if command == p.NBD_CMD_WRITE:
            if data is None or memoryview(data).nbytes != length:
                raise LocalProtocolError("WRITE needs exactly `length` bytes of data")
        elif data is not None:
            raise LocalProtocolError(f"{name} takes no data")

    @property
    def limits(self) -> tuple[int, int, int]:
        """The block sizes to honour: (minimum, preferred, maximum payload)."""
        export = self.export
        if export is None or export.block_size is None:
            return (1, 4096, p.DEFAULT_MAX_PAYLOAD)
        return export.block_size

    def _require(self, state: State) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"not possible now: connection is {self.state.value}")

    # ---- parsing -----------------------------------------------------------------------

    def _next_event(self) -> Event | NeedData:
        state = self.state
        if state is State.GREETING:
            return self._parse_greeting()
        if state is State.OPTION_REPLY:
            return self._parse_option_reply()
        if state is State.EXPORT_NAME_REPLY:
            return self._parse_export_name_reply()
        if state in (State.TRANSMISSION, State.DISCONNECTING):
            return self._parse_transmission()
        # CLIENT_FLAGS, OPTIONS, TLS, CLOSED: the server has nothing to say now.
        if self._buf:
            raise RemoteProtocolError(f"server sent data unprompted ({state.value})")
        if self._eof:
            self.state = State.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _take(self, n: int) -> bytes | None:
        """The next ``n`` buffered bytes, consumed; None when not all there yet."""
        if len(self._buf) < n:
            if self._eof:
                if not self._buf and self._at_boundary():
                    return None
                raise RemoteProtocolError(
                    f"server closed the connection in the middle of a message ({self.state.value})"
                )
            return None
        chunk = bytes(self._buf[:n])
        del self._buf[:n]
        return chunk

    def _at_boundary(self) -> bool:
        if self.state in (State.TRANSMISSION, State.DISCONNECTING):
            return self._rx is _Rx.HEADER
        return self.state is State.OPTION_REPLY and self._option == p.NBD_OPT_ABORT

    def _closed(self) -> ConnectionClosed | NeedData:
        if self._eof:
            self.state = State.CLOSED
            return ConnectionClosed()
        return NEED_DATA

    def _parse_greeting(self) -> Event | NeedData:
        if self._eof and not self._buf:
            raise RemoteProtocolError("server closed the connection before its greeting")
        head = self._take(p.GREETING.size)
        if head is None:
            return NEED_DATA
        magic, second, flags = p.GREETING.unpack(head)
        if magic != p.NBDMAGIC:
            raise RemoteProtocolError(f"bad greeting magic {magic:#x}: not an NBD server")
        if second == p.OLDSTYLE_MAGIC:
            raise RemoteProtocolError("server speaks the oldstyle protocol, which is unsupported")
        if second != p.IHAVEOPT:
            raise RemoteProtocolError(f"bad greeting magic {second:#x}")
        if not flags & p.NBD_FLAG_FIXED_NEWSTYLE:
            raise RemoteProtocolError("server does not support fixed newstyle negotiation")
        self.handshake_flags = flags
        self.state = State.CLIENT_FLAGS
        return Greeting(flags)

    def _parse_option_reply(self) -> Event | NeedData:
        if len(self._buf) < p.OPTION_REPLY_HEADER.size:
            self._take(p.OPTION_REPLY_HEADER.size)  # raises on a truncated header
            return self._closed()
        magic, option, reply_type, length = p.OPTION_REPLY_HEADER.unpack_from(self._buf)
        if magic != p.OPTION_REPLY_MAGIC:
            raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
        if option != self._option:
            raise RemoteProtocolError(
                f"reply for {p.option_name(option)} while waiting for {p.option_name(self._option)}"
            )
        if length > p.MAX_OPTION_REPLY:
            raise RemoteProtocolError(f"option reply of {length} bytes is too long")
        raw = self._take(p.OPTION_REPLY_HEADER.size + length)
        if raw is None:
            return NEED_DATA
        payload = memoryview(raw)[p.OPTION_REPLY_HEADER.size :]
        if reply_type & p.NBD_REP_FLAG_ERROR:
            self.state = State.OPTIONS
            return OptionError(option, reply_type, _text(payload))
        if reply_type == p.NBD_REP_ACK:
            if length:
                raise RemoteProtocolError("ACK with a payload")
            return self._option_acked(option)
        if reply_type not in _OPTION_REPLY_TYPES.get(option, set()):
            raise RemoteProtocolError(
                f"{p.reply_type_name(reply_type)} is not a valid reply to {p.option_name(option)}"
            )
        if reply_type == p.NBD_REP_SERVER:
            name, rest = self._string(payload)
            return ServerExport(name, _text(rest))
        if reply_type == p.NBD_REP_META_CONTEXT:
            if length < 4:
                raise RemoteProtocolError("short META_CONTEXT reply")
            (context_id,) = p.U32.unpack_from(payload)
            name = _text(payload[4:])
            if name not in self._meta_queries:
                raise RemoteProtocolError(f"server offered metadata context {name!r} unasked")
            self.meta_contexts[context_id] = name
            return MetaContext(context_id, name)
        self._parse_info(payload)
        return self.next_event()

    def _string(self, payload: memoryview) -> tuple[str, memoryview]:
        if len(payload) < 4:
            raise RemoteProtocolError("short string in option reply")
        (n,) = p.U32.unpack_from(payload)
        if n > len(payload) - 4 or n > p.MAX_STRING:
            raise RemoteProtocolError("string length beyond the option reply")
        return _text(payload[4 : 4 + n]), payload[4 + n :]

    def _parse_info(self, payload: memoryview) -> None:
        if len(payload) < 2:
            raise RemoteProtocolError("short INFO reply")
        (info,) = p.U16.unpack_from(payload)
        if info == p.NBD_INFO_EXPORT:
            if len(payload) != p.INFO_EXPORT.size:
                raise RemoteProtocolError("NBD_INFO_EXPORT of the wrong length")
            _, size, flags = p.INFO_EXPORT.unpack(payload)
            self._info_export = (size, flags)
        elif info == p.NBD_INFO_BLOCK_SIZE:
            if len(payload) != p.INFO_BLOCK_SIZE.size:
                raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE of the wrong length")
            _, minimum, preferred, maximum = p.INFO_BLOCK_SIZE.unpack(payload)
            if not (
                _power_of_two(minimum)
                and _power_of_two(preferred)
                and minimum <= 64 * 1024
                and minimum <= preferred
                and maximum >= max(preferred, minimum)
                and (maximum == 0xFFFFFFFF or maximum % minimum == 0)
            ):
                raise RemoteProtocolError(
                    f"impossible block sizes: min {minimum}, preferred {preferred}, max {maximum}"
                )
            self._info_block_size = (minimum, preferred, maximum)
        elif info in (p.NBD_INFO_NAME, p.NBD_INFO_DESCRIPTION):
            if len(payload) - 2 > p.MAX_STRING:
                raise RemoteProtocolError("name or description too long")
            if info == p.NBD_INFO_NAME:
                self._info_name = _text(payload[2:])
            else:
                self._info_description = _text(payload[2:])
        # Unknown information types are to be ignored, says the spec.

    def _option_acked(self, option: int) -> Event:
        self.state = State.OPTIONS
        if option == p.NBD_OPT_STARTTLS:
            if self._buf:
                raise RemoteProtocolError("server sent data after accepting STARTTLS")
            self.state = State.TLS
        elif option == p.NBD_OPT_STRUCTURED_REPLY:
            self.structured_replies = True
        elif option == p.NBD_OPT_ABORT:
            self.state = State.CLOSED
        elif option == p.NBD_OPT_GO:
            if self._info_export is None:
                raise RemoteProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
            size, flags = self._info_export
            return self._ready(size, flags, self._info_block_size)
        return OptionAck(option)

    def _ready(self, size: int, flags: int, block_size: tuple[int, int, int] | None) -> Event:
        if size >= 1 << 63:
            raise RemoteProtocolError(f"export size {size} is out of range")
        self.export = ExportReady(size, flags, block_size, self._info_name, self._info_description)
        self.state = State.TRANSMISSION
        return self.export

    def _parse_export_name_reply(self) -> Event | NeedData:
        if self._eof and not self._buf:
            # How a server says it does not know the export: it just hangs up.
            self.state = State.CLOSED
            return ConnectionClosed()
        head = self._take(p.EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else 124))
        if head is None:
            return NEED_DATA
        size, flags = p.EXPORT_NAME_REPLY.unpack_from(head)
        return self._ready(size, flags, None)

    def _parse_transmission(self) -> Event | NeedData:
        while True:
            if self._rx is _Rx.SINK:
                if not self._drain_to_sink():
                    if self._eof:
                        raise RemoteProtocolError("server closed the connection mid-payload")
                    return NEED_DATA
                event = self._sink_done()
            elif self._rx is _Rx.CHUNK:
                payload = self._take(self._chunk_length)
                if payload is None:
                    return NEED_DATA
                self._rx = _Rx.HEADER
                event = self._chunk_payload(payload)
            else:
                if len(self._buf) < 4:
                    self._take(4)  # raises on truncation
                    return self._closed()
                (magic,) = p.U32.unpack_from(self._buf)
                if magic == p.SIMPLE_REPLY_MAGIC:
                    head = self._take(p.SIMPLE_REPLY.size)
                    if head is None:
                        return NEED_DATA
                    event = self._simple_reply(head)
                elif magic == p.STRUCTURED_REPLY_MAGIC:
                    head = self._take(p.STRUCTURED_HEADER.size)
                    if head is None:
                        return NEED_DATA
                    event = self._chunk_header(head)
                else:
                    raise RemoteProtocolError(f"bad reply magic {magic:#x}")
            if event is not None:
                return event

    def _drain_to_sink(self) -> bool:
        """Move buffered bytes into the sink; True once the sink is full."""
        assert self._sink is not None
        if self._buf:
            n = min(len(self._buf), self._sink_end - self._sink_pos)
            self._sink[self._sink_pos : self._sink_pos + n] = self._buf[:n]
            del self._buf[:n]
            self._sink_pos += n
        return self._sink_pos == self._sink_end

    def _start_sink(self, buffer: bytearray | memoryview, start: int, end: int) -> None:
        self._sink = memoryview(buffer).cast("B")
        self._sink_pos = start
        self._sink_end = end
        self._rx = _Rx.SINK

    def _sink_done(self) -> Event | None:
        self._sink = None
        self._rx = _Rx.HEADER
        if self._chunk_type == p.NBD_REPLY_TYPE_OFFSET_DATA:
            return self._chunk_end()
        return self._complete(self._cookie)  # a simple READ reply

    def _lookup(self, cookie: int) -> _InFlight:
        req = self._inflight.get(cookie)
        if req is None:
            raise RemoteProtocolError(f"reply for cookie {cookie}, which is not in flight")
        return req

    def _simple_reply(self, head: bytes) -> Event | None:
        _, error, cookie = p.SIMPLE_REPLY.unpack(head)
        req = self._lookup(cookie)
        if req.structured:
            raise RemoteProtocolError(f"simple reply in the middle of structured reply {cookie}")
        self._cookie = cookie
        self._chunk_type = p.NBD_REPLY_TYPE_NONE
        if error:
            req.error = error
            req.buffer = None
            return self._complete(cookie)
        if req.command == p.NBD_CMD_BLOCK_STATUS:
            raise RemoteProtocolError("successful simple reply to BLOCK_STATUS carries no extents")
        if req.command == p.NBD_CMD_READ:
            assert req.buffer is not None
            self._start_sink(req.buffer, 0, req.length)
            return None
        return self._complete(cookie)

    def _chunk_header(self, head: bytes) -> Event | None:
        _, flags, chunk_type, cookie, length = p.STRUCTURED_HEADER.unpack(head)
        if not self.structured_replies:
            raise RemoteProtocolError("structured reply without NBD_OPT_STRUCTURED_REPLY")
        req = self._lookup(cookie)
        req.structured = True
        self._cookie = cookie
        self._chunk_flags = flags
        self._chunk_type = chunk_type
        self._chunk_length = length
        if flags & ~p.NBD_REPLY_FLAG_DONE:
            raise RemoteProtocolError(f"unknown structured reply flags {flags:#x}")
        if chunk_type == p.NBD_REPLY_TYPE_NONE:
            if not flags & p.NBD_REPLY_FLAG_DONE or length:
                raise RemoteProtocolError("NBD_REPLY_TYPE_NONE must be empty and final")
            return self._chunk_end()
        if chunk_type == p.NBD_REPLY_TYPE_OFFSET_DATA:
            self._need(req, p.NBD_CMD_READ)
            if not 8 < length <= 8 + req.length:
                raise RemoteProtocolError(f"OFFSET_DATA chunk of bad length {length}")
            self._chunk_data_length = length - 8
            self._chunk_length = 8  # the offset; the data streams into the read buffer
        elif chunk_type == p.NBD_REPLY_TYPE_OFFSET_HOLE:
            self._need(req, p.NBD_CMD_READ)
            if length != 12:
                raise RemoteProtocolError(f"OFFSET_HOLE chunk of bad length {length}")
        elif chunk_type == p.NBD_REPLY_TYPE_BLOCK_STATUS:
            self._need(req, p.NBD_CMD_BLOCK_STATUS)
            if length < 12 or (length - 4) % 8 or length > p.MAX_EXTENTS_PAYLOAD:
                raise RemoteProtocolError(f"BLOCK_STATUS chunk of bad length {length}")
        elif chunk_type & p.NBD_REPLY_TYPE_FLAG_ERROR:
            if not 6 <= length <= 6 + p.MAX_STRING + 8:
                raise RemoteProtocolError(f"error chunk of bad length {length}")
        else:
            raise RemoteProtocolError(f"unknown structured reply type {chunk_type}")
        self._rx = _Rx.CHUNK
        return None

    @staticmethod
    def _need(req: _InFlight, command: int) -> None:
        if req.command != command:
            raise RemoteProtocolError(
                f"reply chunk for {p.command_name(command)} sent to a "
                f"{p.command_name(req.command)} request"
            )

    def _in_request(self, req: _InFlight, offset: int, length: int) -> None:
        if offset < req.offset or offset + length > req.offset + req.length:
            raise RemoteProtocolError(
                f"chunk {offset}+{length} outside its request {req.offset}+{req.length}"
            )

    def _chunk_payload(self, payload: bytes) -> Event | None:
        req = self._inflight[self._cookie]
        chunk_type = self._chunk_type
        if chunk_type == p.NBD_REPLY_TYPE_OFFSET_DATA:
            (offset,) = p.U64.unpack(payload)
            length = self._chunk_data_length
            self._in_request(req, offset, length)
            req.chunks.append((offset, offset + length))
            assert req.buffer is not None
            start = offset - req.offset
            self._start_sink(req.buffer, start, start + length)
            return None
        if chunk_type == p.NBD_REPLY_TYPE_OFFSET_HOLE:
            offset, length = struct_hole(payload)
            if length == 0:
                raise RemoteProtocolError("empty OFFSET_HOLE chunk")
            self._in_request(req, offset, length)
            req.chunks.append((offset, offset + length))
            # The read buffer starts zeroed and chunks may not overlap: nothing to write.
        elif chunk_type == p.NBD_REPLY_TYPE_BLOCK_STATUS:
            self._block_status(req, payload)
        else:
            self._error_chunk(req, payload)
        return self._chunk_end()

    def _block_status(self, req: _InFlight, payload: bytes) -> None:
        (context_id,) = p.U32.unpack_from(payload)
        if context_id not in self.meta_contexts:
            raise RemoteProtocolError(f"block status for unknown context id {context_id}")
        if req.extents is not None:
            raise RemoteProtocolError("two BLOCK_STATUS chunks for one context")
        extents: list[tuple[int, int, int]] = []
        position = req.offset
        end = req.offset + req.length
        for length, status in p.EXTENT.iter_unpack(memoryview(payload)[4:]):
            if length == 0:
                raise RemoteProtocolError("zero-length extent in BLOCK_STATUS")
            if position >= end:
                break  # the spec lets the last extent run past the request: ignore the rest
            extents.append((position, min(length, end - position), status))
            position += length
        req.extents = tuple(extents)

    def _error_chunk(self, req: _InFlight, payload: bytes) -> None:
        error, msg_len = p.ERROR_CHUNK.unpack_from(payload)
        if error == 0:
            raise RemoteProtocolError("error chunk with error number 0")
        extra = len(payload) - 6 - msg_len
        if msg_len > p.MAX_STRING or extra < 0:
            raise RemoteProtocolError("error chunk message length beyond the chunk")
        offset: int | None = None
        if self._chunk_type == p.NBD_REPLY_TYPE_ERROR_OFFSET:
            if extra != 8:
                raise RemoteProtocolError("ERROR_OFFSET chunk of bad length")
            (offset,) = p.U64.unpack_from(payload, 6 + msg_len)
            self._in_request(req, offset, 1)
        elif self._chunk_type == p.NBD_REPLY_TYPE_ERROR and extra:
            raise RemoteProtocolError("ERROR chunk of bad length")
        if not req.error:  # the first error is the one reported
            req.error = error
            req.message = _text(payload[6 : 6 + msg_len])
            req.error_offset = offset

    def _chunk_end(self) -> Event | None:
        if self._chunk_flags & p.NBD_REPLY_FLAG_DONE:
            return self._complete(self._cookie)
        return None

    def _complete(self, cookie: int) -> Reply:
        req = self._inflight.pop(cookie)
        if req.command == p.NBD_CMD_READ and req.length >= _LARGE_READ:
            self._large_reads -= 1
        if req.error:
            return Reply(
                cookie,
                req.command,
                req.offset,
                req.length,
                req.error,
                req.message,
                req.error_offset,
            )
        if req.command == p.NBD_CMD_READ and req.structured:
            position = req.offset
            for start, end in sorted(req.chunks):
                if start != position:
                    raise RemoteProtocolError(
                        f"structured read reply {cookie} does not cover the request exactly"
                    )
                position = end
            if position != req.offset + req.length:
                raise RemoteProtocolError(
                    f"structured read reply {cookie} does not cover the request exactly"
                )
        if req.command == p.NBD_CMD_BLOCK_STATUS and not req.extents:
            raise RemoteProtocolError(f"BLOCK_STATUS reply {cookie} without extents")
        return Reply(
            cookie,
            req.command,
            req.offset,
            req.length,
            data=req.buffer,
            extents=req.extents or (),
        )


def struct_hole(payload: bytes) -> tuple[int, int]:
    """(offset, length) of an OFFSET_HOLE chunk payload."""
    (offset,) = p.U64.unpack_from(payload)
    (length,) = p.U32.unpack_from(payload, 8)
    return offset, length


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
