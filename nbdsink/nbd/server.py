"""The server side of NBD as a sans-IO state machine, small and strict.

It exists so the client can be exercised against a peer whose every byte a test controls:
in-memory handshakes, replies out of order, deliberately broken replies. It parses the
client's bytes into events and builds replies; what to answer is the caller's business.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nbdsink.nbd import protocol as p
from nbdsink.nbd.errors import LocalProtocolError, RemoteProtocolError


@dataclass(frozen=True)
class ClientFlags:
    """The client's answer to the greeting."""

    flags: int


@dataclass(frozen=True)
class OptionRequest:
    """A handshake option and its raw payload."""

    option: int
    data: bytes


@dataclass(frozen=True)
class Request:
    """A transmission request; ``data`` is the payload of a WRITE."""

    flags: int
    command: int
    cookie: int
    offset: int
    length: int
    data: bytes = b""


@dataclass(frozen=True)
class ClientClosed:
    """The client closed the connection at a message boundary."""


ServerEvent = ClientFlags | OptionRequest | Request | ClientClosed


class ServerState(enum.Enum):
    """Where the server side is."""

    CLIENT_FLAGS = "waiting for client flags"
    OPTIONS = "negotiating options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class ServerConnection:
    """Server role: :meth:`greeting` first, then feed bytes and answer the events."""

    def __init__(self, *, max_payload: int = p.DEFAULT_MAX_PAYLOAD) -> None:
        self.state = ServerState.CLIENT_FLAGS
        self.client_flags = 0
        self.max_payload = max_payload
        self._buf = bytearray()
        self._eof = False

    def greeting(self, flags: int = p.NBD_FLAG_FIXED_NEWSTYLE | p.NBD_FLAG_NO_ZEROES) -> bytes:
        """The newstyle greeting the server sends first."""
        return p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, flags)

    def receive_data(self, data: bytes) -> None:
        """Feed the client's bytes; empty means the client closed."""
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> ServerEvent | None:
        """The next complete client message, or None when more bytes are needed."""
        event = self._parse()
        if event is None and self._eof:
            if self._buf:
                raise RemoteProtocolError("client closed the connection mid-message")
            self.state = ServerState.CLOSED
            return ClientClosed()
        return event

    def _parse(self) -> ServerEvent | None:
        buf = self._buf
        if self.state is ServerState.CLIENT_FLAGS:
            if len(buf) < 4:
                return None
            (flags,) = p.U32.unpack_from(buf)
            del buf[:4]
            self.client_flags = flags
            self.state = ServerState.OPTIONS
            return ClientFlags(flags)
        if self.state is ServerState.OPTIONS:
            if len(buf) < p.OPTION_HEADER.size:
                return None
            magic, option, length = p.OPTION_HEADER.unpack_from(buf)
            if magic != p.IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic {magic:#x}")
            if length > p.MAX_OPTION_DATA:
                raise RemoteProtocolError(f"option payload of {length} bytes is too long")
            end = p.OPTION_HEADER.size + length
            if len(buf) < end:
                return None
            data = bytes(buf[p.OPTION_HEADER.size : end])
            del buf[:end]
            return OptionRequest(option, data)
        if self.state is ServerState.TRANSMISSION:
            if len(buf) < p.REQUEST.size:
                return None
            magic, flags, command, cookie, offset, length = p.REQUEST.unpack_from(buf)
            if magic != p.REQUEST_MAGIC:
                raise RemoteProtocolError(f"bad request magic {magic:#x}")
            end = p.REQUEST.size
            if command == p.NBD_CMD_WRITE:
                if length > self.max_payload:
                    raise RemoteProtocolError(f"WRITE of {length} bytes is too large")
                end += length
            if len(buf) < end:
                return None
            data = bytes(buf[p.REQUEST.size : end])
            del buf[:end]
            if command == p.NBD_CMD_DISC:
                self.state = ServerState.CLOSED
            return Request(flags, command, cookie, offset, length, data)
        return None

    # ---- replies -----------------------------------------------------------------------

    def option_reply(self, option: int, reply_type: int, data: bytes = b"") -> bytes:
        """One option reply; an ACK to NBD_OPT_GO starts the transmission phase."""
        if option == p.NBD_OPT_GO and reply_type == p.NBD_REP_ACK:
            self.state = ServerState.TRANSMISSION
        return p.encode_option_reply(option, reply_type, data)

    def info_export(self, option: int, size: int, flags: int) -> bytes:
        """``NBD_REP_INFO`` / ``NBD_INFO_EXPORT``."""
        data = p.INFO_EXPORT.pack(p.NBD_INFO_EXPORT, size, flags)
        return self.option_reply(option, p.NBD_REP_INFO, data)

    def info_block_size(self, option: int, minimum: int, preferred: int, maximum: int) -> bytes:
        """``NBD_REP_INFO`` / ``NBD_INFO_BLOCK_SIZE``."""
        data = p.INFO_BLOCK_SIZE.pack(p.NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum)
        return self.option_reply(option, p.NBD_REP_INFO, data)

    def export_name_reply(self, size: int, flags: int) -> bytes:
        """The answer to ``NBD_OPT_EXPORT_NAME``; starts the transmission phase."""
        if self.state is not ServerState.OPTIONS:
            raise LocalProtocolError("export name reply outside option negotiation")
        self.state = ServerState.TRANSMISSION
        pad = b"" if self.client_flags & p.NBD_FLAG_C_NO_ZEROES else bytes(124)
        return p.EXPORT_NAME_REPLY.pack(size, flags) + pad

    @staticmethod
    def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
        """A simple reply (with the read data for a successful READ)."""
        return p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie) + data

    @staticmethod
    def chunk(cookie: int, chunk_type: int, payload: bytes = b"", done: bool = False) -> bytes:
        """One structured reply chunk."""
        flags = p.NBD_REPLY_FLAG_DONE if done else 0
        header = p.STRUCTURED_HEADER.pack(
            p.STRUCTURED_REPLY_MAGIC, flags, chunk_type, cookie, len(payload)
        )
        return header + payload

    @classmethod
    def data_chunk(cls, cookie: int, offset: int, data: bytes, done: bool = False) -> bytes:
        """``NBD_REPLY_TYPE_OFFSET_DATA``."""
        return cls.chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_DATA, p.U64.pack(offset) + data, done)

    @classmethod
    def hole_chunk(cls, cookie: int, offset: int, length: int, done: bool = False) -> bytes:
        """``NBD_REPLY_TYPE_OFFSET_HOLE``."""
        payload = p.U64.pack(offset) + p.U32.pack(length)
        return cls.chunk(cookie, p.NBD_REPLY_TYPE_OFFSET_HOLE, payload, done)

    @classmethod
    def block_status_chunk(
        cls, cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool = True
    ) -> bytes:
        """``NBD_REPLY_TYPE_BLOCK_STATUS`` with ``(length, flags)`` descriptors."""
        payload = p.U32.pack(context_id) + b"".join(p.EXTENT.pack(n, f) for n, f in extents)
        return cls.chunk(cookie, p.NBD_REPLY_TYPE_BLOCK_STATUS, payload, done)

    @classmethod
    def error_chunk(
        cls,
        cookie: int,
        error: int,
        message: str = "",
        offset: int | None = None,
        done: bool = True,
    ) -> bytes:
        """``NBD_REPLY_TYPE_ERROR``, or ``ERROR_OFFSET`` when an offset is given."""
        raw = message.encode()
        payload = p.ERROR_CHUNK.pack(error, len(raw)) + raw
        chunk_type = p.NBD_REPLY_TYPE_ERROR
        if offset is not None:
            payload += p.U64.pack(offset)
            chunk_type = p.NBD_REPLY_TYPE_ERROR_OFFSET
        return cls.chunk(cookie, chunk_type, payload, done)
