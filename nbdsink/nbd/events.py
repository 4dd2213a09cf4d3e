"""Events the sans-IO client produces from the server's bytes.

Each is a frozen dataclass; :data:`NEED_DATA` is the sentinel for "feed me more bytes".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA
"""Returned by ``next_event`` when no complete event is buffered yet."""
NeedData = _Sentinel


@dataclass(frozen=True)
class Greeting:
    """The server's newstyle greeting; answer it with ``send_client_flags()``."""

    flags: int


@dataclass(frozen=True)
class OptionAck:
    """The server accepted an option (other than GO, which ends in :class:`ExportReady`)."""

    option: int


@dataclass(frozen=True)
class OptionError:
    """The server refused an option; ``message`` is its explanation, possibly empty."""

    option: int
    reply_type: int
    message: str


@dataclass(frozen=True)
class ServerExport:
    """One export named in answer to ``NBD_OPT_LIST``."""

    name: str
    description: str


@dataclass(frozen=True)
class MetaContext:
    """The server agreed to a metadata context (``NBD_OPT_SET_META_CONTEXT``)."""

    context_id: int
    name: str


@dataclass(frozen=True)
class ExportReady:
    """The handshake is over: transmission phase with this export."""

    size: int
    flags: int
    block_size: tuple[int, int, int] | None
    name: str | None
    description: str | None


@dataclass(frozen=True, eq=False)
class Reply:
    """The complete reply to one request (all chunks of a structured reply gathered).

    ``error`` is the NBD errno (0 for success) of the first error chunk; ``data`` is the
    read buffer for a successful READ; ``extents`` are ``(offset, length, flags)`` clipped to
    the request for a successful BLOCK_STATUS.
    """

    cookie: int
    command: int
    offset: int
    length: int
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    data: bytearray | memoryview | None = None
    extents: tuple[tuple[int, int, int], ...] = field(default=())


@dataclass(frozen=True)
class ConnectionClosed:
    """The server closed the connection at a message boundary."""


Event = (
    Greeting
    | OptionAck
    | OptionError
    | ServerExport
    | MetaContext
    | ExportReady
    | Reply
    | ConnectionClosed
)
