"""The trio NBD client: a thin transport over :class:`~nbdsink.nbd.sansio.ClientConnection`.

One reader task parses replies and hands each to the task that awaits it (matched by cookie,
in whatever order the server answers). Requests are sent whole under a lock, at most
``window`` of them in flight. Large calls are split into requests the server accepts and
issued concurrently. Cancelling a call never leaves a half-written request: the send itself
is shielded, and a reply that arrives for a cancelled call is simply dropped.

    async with connect("nbd+unix:///disk?socket=/run/nbd.sock") as conn:
        await conn.pwrite(b"x" * 4096, 0)
        data = await conn.pread(4096, 0)
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import trio

from nbdsink.nbd import protocol as p
from nbdsink.nbd.errors import (
    LocalProtocolError,
    NBDConnectionError,
    NBDError,
    NBDOptionError,
    NBDReplyError,
    NBDTLSError,
)
from nbdsink.nbd.events import (
    NEED_DATA,
    ConnectionClosed,
    Event,
    ExportReady,
    Greeting,
    MetaContext,
    OptionAck,
    OptionError,
    Reply,
    ServerExport,
)
from nbdsink.nbd.sansio import ClientConnection
from nbdsink.nbd.tls import TLSConfig
from nbdsink.nbd.uri import Target, parse_uri

DEFAULT_WINDOW = 16
"""Requests in flight per connection unless told otherwise."""
DEFAULT_REQUEST_SIZE = 4 * 1024 * 1024
"""Largest READ/WRITE payload sent in one request (the server's maximum may be lower)."""
_UNPAYLOADED_REQUEST = 1 << 30
"""Largest range sent in one TRIM / WRITE_ZEROES / CACHE / BLOCK_STATUS request."""
_RECEIVE_SIZE = 256 * 1024
_CLOSE_TIMEOUT = 5.0

Extent = tuple[int, int, bool, bool]
"""``(offset, length, is_hole, is_zero)`` from ``base:allocation``."""
Buffer = bytes | bytearray | memoryview


def _io_error(exc: BaseException, doing: str) -> NBDConnectionError:
    """One error type for everything the byte stream can throw at us."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    if isinstance(cause, ssl.SSLError):
        return NBDTLSError(f"TLS failure while {doing}: {cause.reason or cause}")
    if isinstance(exc, trio.ClosedResourceError):
        return NBDConnectionError(f"connection closed while {doing}")
    detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return NBDConnectionError(f"connection lost while {doing}: {detail}")


_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Channel:
    """The stream and the protocol object while the handshake runs."""

    def __init__(self, stream: trio.abc.Stream, target: Target) -> None:
        self.stream = stream
        self.target = target
        self.proto = ClientConnection()
        # With TLS 1.3 a server rejects a client certificate only after our side of the
        # handshake is done: the first thing we then see is the connection dropping.
        self.tls_unconfirmed = False

    def _lost(self, exc: BaseException | None) -> NBDConnectionError:
        error = None if exc is None else _io_error(exc, "negotiating with the server")
        if isinstance(error, NBDTLSError):
            return error  # a TLS alert says best what went wrong
        if self.tls_unconfirmed:
            return NBDTLSError(
                f"{self.target.describe()} dropped the connection right after the TLS "
                "handshake: it did not accept this client (client certificate missing or "
                "not trusted?)"
            )
        if error is None:
            return NBDConnectionError(
                f"{self.target.describe()} closed the connection during the handshake"
            )
        return error

    async def send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except _STREAM_ERRORS as exc:
            raise self._lost(exc) from exc

    async def event(self) -> Event:
        while True:
            event = self.proto.next_event()
            if event is NEED_DATA:
                try:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                except _STREAM_ERRORS as exc:
                    raise self._lost(exc) from exc
                self.proto.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                raise self._lost(None)
            self.tls_unconfirmed = False
            return event

    async def option_done(self, option: int) -> OptionAck | OptionError:
        """Skip to the end of an option's replies; raise for an error reply."""
        while True:
            event = await self.event()
            if isinstance(event, OptionError):
                raise _option_error(event)
            if isinstance(event, OptionAck):
                return event

    async def start(self, tls: TLSConfig | None) -> None:
        """Greeting, client flags, and STARTTLS when asked for."""
        event = await self.event()
        assert isinstance(event, Greeting)
        await self.send(self.proto.send_client_flags())
        if tls is None:
            return
        await self.send(self.proto.opt_starttls())
        event = await self.event()
        if isinstance(event, OptionError):
            raise NBDTLSError(
                f"{self.target.describe()} refused TLS: {_option_error(event).message or 'no reason given'}"
            )
        hostname = tls.server_hostname(self.target)
        ssl_stream = trio.SSLStream(
            self.stream, tls.context(check_hostname=hostname is not None), server_hostname=hostname
        )
        try:
            await ssl_stream.do_handshake()
        except _STREAM_ERRORS as exc:
            raise _io_error(exc, "starting TLS") from exc
        self.stream = ssl_stream
        self.tls_unconfirmed = True
        self.proto.tls_started()

    async def negotiate(self, export: str) -> ExportReady:
        """Structured replies, base:allocation, then GO (or EXPORT_NAME on old servers)."""
        proto = self.proto
        await self.send(proto.opt_structured_reply())
        event = await self.event()
        if isinstance(event, OptionError) and event.reply_type != p.NBD_REP_ERR_UNSUP:
            raise _option_error(event)
        if proto.structured_replies:
            await self.send(proto.opt_set_meta_context(export, [p.BASE_ALLOCATION]))
            # Any refusal here only means no block status: NBD_OPT_GO, next, gives the
            # authoritative answer about the export itself.
            while not isinstance(event := await self.event(), OptionAck | OptionError):
                assert isinstance(event, MetaContext)
        await self.send(proto.opt_go(export))
        while True:
            event = await self.event()
            if isinstance(event, ExportReady):
                return event
            if isinstance(event, OptionError):
                if event.reply_type != p.NBD_REP_ERR_UNSUP:
                    raise _option_error(event)
                break
        # A server from before NBD_OPT_GO: the old way, which reports no errors but EOF.
        await self.send(proto.opt_export_name(export))
        try:
            event = await self.event()
        except NBDConnectionError as exc:
            raise NBDConnectionError(f"{exc} (unknown export {export!r}?)") from exc
        assert isinstance(event, ExportReady)
        return event

    async def abort(self) -> None:
        """NBD_OPT_ABORT and close, as politely as the server allows."""
        with trio.move_on_after(_CLOSE_TIMEOUT) as scope:
            scope.shield = True
            try:
                await self.send(self.proto.opt_abort())
                event = await self.event()
                assert isinstance(event, OptionAck | OptionError)
            except NBDError:
                pass  # the server may just hang up, as the spec allows
        await trio.aclose_forcefully(self.stream)


def _option_error(event: OptionError) -> NBDOptionError:
    error = NBDOptionError(event.option, event.reply_type, event.message)
    if event.reply_type == p.NBD_REP_ERR_TLS_REQD:
        error.args = (f"{error}: the server requires TLS, use an nbds:// URI",)
    return error


async def _open_stream(target: Target) -> trio.abc.Stream:
    try:
        if target.socket is not None:
            return await trio.open_unix_socket(target.socket)
        assert target.host is not None
        return await trio.open_tcp_stream(target.host, target.port)
    except OSError as exc:
        detail = exc.strerror or str(exc)
        raise NBDConnectionError(f"cannot connect to {target.describe()}: {detail}") from exc


def _tls_for(target: Target, tls: TLSConfig | None) -> TLSConfig | None:
    if tls is not None and not target.tls:
        raise LocalProtocolError(f"TLS settings given for {target.uri}; use nbds:// for TLS")
    if target.tls and tls is None:
        return TLSConfig.from_target(target)
    return tls


async def _handshake(
    uri: str, tls: TLSConfig | None, run: Callable[[_Channel], Awaitable[None]]
) -> _Channel:
    target = parse_uri(uri)
    tls = _tls_for(target, tls)
    channel = _Channel(await _open_stream(target), target)
    try:
        await channel.start(tls)
        await run(channel)
    except BaseException:
        await trio.aclose_forcefully(channel.stream)
        raise
    return channel


class _Pending:
    """A request in flight and the task waiting for it."""

    __slots__ = ("abandoned", "done", "failure", "reply")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: Reply | None = None
        self.failure: NBDError | None = None
        self.abandoned = False


def _copy_error(error: NBDError) -> NBDError:
    # Each waiting task gets its own exception object, so tracebacks don't mix.
    try:
        return type(error)(*error.args)
    except TypeError:
        return NBDConnectionError(str(error))


class Connection:
    """An NBD connection in the transmission phase. Made by :func:`connect`.

    ``size`` is the export size in bytes; ``block_size`` the server's
    ``(minimum, preferred, maximum)`` (protocol defaults when it states none); the ``can_*``
    flags say which commands and flags the server advertised. All I/O methods may be called
    concurrently from many tasks.
    """

    def __init__(
        self, channel: _Channel, export: ExportReady, *, window: int, request_size: int,
        timeout: float | None = None,
    ) -> None:
        self.timeout = timeout
        """Seconds a request may wait for its reply; past that the connection is failed (a
        stalled server): None waits for ever."""
        self._stream = channel.stream
        # Plain sockets let large read payloads land straight in the caller's buffer.
        socket_stream = channel.stream
        self._socket = (
            socket_stream.socket if isinstance(socket_stream, trio.SocketStream) else None
        )
        self._proto = channel.proto
        self.uri = channel.target.uri
        self.export_name = export.name if export.name is not None else channel.target.export
        self.description = export.description
        self.size = export.size
        self.tls = isinstance(channel.stream, trio.SSLStream)
        self.block_size = self._proto.limits
        minimum, _, maximum = self.block_size
        request_size = min(request_size, maximum)
        self.request_size = max(minimum, request_size - request_size % minimum)
        self.window = window
        flags = export.flags if export.flags & p.NBD_FLAG_HAS_FLAGS else 0
        self.read_only = bool(flags & p.NBD_FLAG_READ_ONLY)
        writable = not self.read_only
        self.can_flush = bool(flags & p.NBD_FLAG_SEND_FLUSH)
        self.can_fua = bool(flags & p.NBD_FLAG_SEND_FUA)
        self.can_trim = writable and bool(flags & p.NBD_FLAG_SEND_TRIM)
        self.can_zero = writable and bool(flags & p.NBD_FLAG_SEND_WRITE_ZEROES)
        self.can_fast_zero = self.can_zero and bool(flags & p.NBD_FLAG_SEND_FAST_ZERO)
        self.can_cache = bool(flags & p.NBD_FLAG_SEND_CACHE)
        self.can_multi_conn = bool(flags & p.NBD_FLAG_CAN_MULTI_CONN)
        self.can_block_status = bool(self._proto.meta_contexts)
        self.structured_replies = self._proto.structured_replies
        self._window = trio.Semaphore(window)
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Pending] = {}
        self._idle = trio.Event()
        self._idle.set()
        self._failure: NBDError | None = None
        self._closed = False
        self._reader_scope: trio.CancelScope | None = None
        self._recv_scope: trio.CancelScope | None = None  # a recv_into a caller's buffer

    # ---- public I/O ----------------------------------------------------------------------

    async def pread(self, length: int, offset: int) -> bytearray:
        """Read ``length`` bytes at ``offset``."""
        self._check_range(length, offset)
        minimum = self.block_size[0]
        start = offset - offset % minimum
        end = min(self.size, -(-(offset + length) // minimum) * minimum)
        if (start, end) == (offset, offset + length):
            buffer = bytearray(length)
            await self._read_into(memoryview(buffer), offset)
            return buffer
        # Unaligned: read the enclosing aligned blocks, return the part asked for.
        wide = bytearray(end - start)
        await self._read_into(memoryview(wide), start)
        return wide[offset - start : offset - start + length]

    async def pread_into(self, buffer: bytearray | memoryview, offset: int) -> None:
        """Read ``len(buffer)`` bytes at ``offset`` straight into ``buffer`` (aligned I/O)."""
        view = memoryview(buffer).cast("B")
        self._check_range(view.nbytes, offset)
        self._check_aligned(view.nbytes, offset, "read")
        await self._read_into(view, offset)

    async def pwrite(self, data: Buffer, offset: int, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; ``fua`` forces it to stable storage first."""
        view = memoryview(data).cast("B")
        self._check_range(view.nbytes, offset)
        self._check_aligned(view.nbytes, offset, "write")
        flags = p.NBD_CMD_FLAG_FUA if fua else 0

        async def piece(start: int, length: int) -> None:
            chunk = view[start - offset : start - offset + length]
            await self._request(p.NBD_CMD_WRITE, start, length, flags, data=chunk)

        await self._split(offset, view.nbytes, self.request_size, piece)

    async def zero(
        self,
        length: int,
        offset: int,
        fast: bool = False,
        may_trim: bool = False,
        fua: bool = False,
    ) -> None:
        """Write zeroes. ``fast``: fail with ENOTSUP rather than be slower than a write;
        ``may_trim``: the server may punch a hole instead of allocating."""
        flags = 0 if may_trim else p.NBD_CMD_FLAG_NO_HOLE
        flags |= p.NBD_CMD_FLAG_FAST_ZERO if fast else 0
        flags |= p.NBD_CMD_FLAG_FUA if fua else 0
        await self._ranged(p.NBD_CMD_WRITE_ZEROES, length, offset, flags)

    async def trim(self, length: int, offset: int, fua: bool = False) -> None:
        """Discard a range (the server may ignore it; reads may return anything after)."""
        await self._ranged(p.NBD_CMD_TRIM, length, offset, p.NBD_CMD_FLAG_FUA if fua else 0)

    async def cache(self, length: int, offset: int) -> None:
        """Ask the server to prefetch a range."""
        await self._ranged(p.NBD_CMD_CACHE, length, offset, 0)

    async def flush(self) -> None:
        """Make every write the server has acknowledged durable."""
        await self._request(p.NBD_CMD_FLUSH, 0, 0, 0)

    async def block_status(self, length: int, offset: int) -> list[Extent]:
        """``base:allocation`` of a range: ``(offset, length, is_hole, is_zero)`` extents
        covering exactly ``offset .. offset + length``."""
        self._check_range(length, offset)
        minimum = self.block_size[0]
        end = offset + length
        position = offset - offset % minimum
        aligned_end = min(self.size, -(-end // minimum) * minimum)
        limit = _UNPAYLOADED_REQUEST - _UNPAYLOADED_REQUEST % minimum
        extents: list[Extent] = []
        while position < end:
            count = min(aligned_end - position, limit)
            reply = await self._request(p.NBD_CMD_BLOCK_STATUS, position, count, 0)
            for ext_offset, ext_length, status in reply.extents:
                lo, hi = max(ext_offset, offset), min(ext_offset + ext_length, end)
                if lo < hi:
                    hole = bool(status & p.NBD_STATE_HOLE)
                    zero = bool(status & p.NBD_STATE_ZERO)
                    if extents and extents[-1][2:] == (hole, zero):
                        last = extents.pop()
                        lo = last[0]
                    extents.append((lo, hi - lo, hole, zero))
                position = ext_offset + ext_length
        return extents

    async def aclose(self) -> None:
        """Disconnect: wait briefly for replies still due, send NBD_CMD_DISC, close."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if self._failure is None:
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    try:
                        await self._idle.wait()
                        async with self._send_lock:
                            if self._failure is None:
                                await self._stream.send_all(self._proto.disconnect())
                    except (*_STREAM_ERRORS, NBDError):
                        pass  # closing anyway
            self._fail(NBDConnectionError("the connection is closed"))
            if self._reader_scope is not None:
                self._reader_scope.cancel()
            await trio.aclose_forcefully(self._stream)

    # ---- requests ------------------------------------------------------------------------

    def _check_range(self, length: int, offset: int) -> None:
        if length < 0 or offset < 0 or offset + length > self.size:
            raise LocalProtocolError(
                f"range {offset}+{length} outside the export (size {self.size})"
            )

    def _check_aligned(self, length: int, offset: int, what: str) -> None:
        minimum = self.block_size[0]
        if offset % minimum or length % minimum:
            raise LocalProtocolError(
                f"{what} of {offset}+{length} is not aligned to the server's minimum block "
                f"size {minimum}"
            )

    async def _ranged(self, command: int, length: int, offset: int, flags: int) -> None:
        self._check_range(length, offset)
        self._check_aligned(length, offset, p.command_name(command))
        minimum = self.block_size[0]

        async def piece(start: int, count: int) -> None:
            await self._request(command, start, count, flags)

        await self._split(
            offset, length, _UNPAYLOADED_REQUEST - _UNPAYLOADED_REQUEST % minimum, piece
        )

    async def _read_into(self, view: memoryview, offset: int) -> None:
        async def piece(start: int, length: int) -> None:
            target = view[start - offset : start - offset + length]
            await self._request(p.NBD_CMD_READ, start, length, 0, into=target)

        await self._split(offset, view.nbytes, self.request_size, piece)

    async def _split(
        self,
        offset: int,
        length: int,
        limit: int,
        piece: Callable[[int, int], Awaitable[None]],
    ) -> None:
        """Run ``piece(start, length)`` over ``offset .. offset+length`` in ``limit`` steps,
        concurrently (the window bounds what is in flight); raise the first failure."""
        if length == 0:
            return
        if length <= limit:
            await piece(offset, length)
            return
        errors: list[BaseException] = []

        async with trio.open_nursery() as nursery:

            async def run(start: int, count: int) -> None:
                try:
                    await piece(start, count)
                except NBDError as exc:
                    errors.append(exc)
                    nursery.cancel_scope.cancel()

            for index in range(math.ceil(length / limit)):
                start = offset + index * limit
                nursery.start_soon(run, start, min(limit, offset + length - start))
        if errors:
            raise errors[0]

    async def _request(
        self,
        command: int,
        offset: int,
        length: int,
        flags: int,
        data: memoryview | None = None,
        into: memoryview | None = None,
    ) -> Reply:
        self._raise_if_failed()
        await self._window.acquire()
        registered = False
        try:
            async with self._send_lock:
                self._raise_if_failed()
                cookie, header = self._proto.request(command, offset, length, flags, data, into)
                pending = _Pending()
                self._pending[cookie] = pending
                self._idle = trio.Event() if len(self._pending) == 1 else self._idle
                registered = True
                # Shielded: a request is on the wire whole or the connection is dead. A server
                # that stops reading blocks the send: the deadline covers that too.
                with trio.CancelScope(shield=True):
                    try:
                        with trio.move_on_after(self.timeout or math.inf) as sending:
                            await self._stream.send_all(header)
                            if data is not None:
                                await self._stream.send_all(data)
                        if sending.cancelled_caught:
                            self._fail(NBDConnectionError(
                                f"could not send {p.command_name(command)} within "
                                f"{self.timeout:g}s (server stalled)"))
                            await trio.aclose_forcefully(self._stream)
                    except _STREAM_ERRORS as exc:
                        self._fail(_io_error(exc, f"sending {p.command_name(command)}"))
                        await trio.aclose_forcefully(self._stream)  # stops the reader too
        finally:
            if not registered:
                self._window.release()
        try:
            if self.timeout is None:
                await pending.done.wait()
            else:
                with trio.move_on_after(self.timeout):
                    await pending.done.wait()
                if not pending.done.is_set():
                    # A server that accepted the request and never answers: the connection
                    # cannot be trusted to answer in order any more. Fail it; the caller
                    # reconnects.
                    self._fail(NBDConnectionError(
                        f"no reply to {p.command_name(command)} within {self.timeout:g}s "
                        "(server stalled)"))
                    await trio.aclose_forcefully(self._stream)
                    await pending.done.wait()
        except BaseException:
            pending.abandoned = True  # its reply will be read and dropped
            if command == p.NBD_CMD_READ and not pending.done.is_set():
                self._proto.discard_read(cookie)
                if self._recv_scope is not None:
                    # The reader may be parked in recv_into() on the caller's buffer.
                    self._recv_scope.cancel()
            raise
        if pending.failure is not None:
            raise _copy_error(pending.failure) from pending.failure
        reply = pending.reply
        assert reply is not None
        if reply.error:
            raise NBDReplyError(
                reply.error, reply.message, reply.error_offset, p.command_name(command)
            )
        return reply

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise _copy_error(self._failure) from self._failure

    def _fail(self, error: NBDError) -> None:
        """The connection is unusable: wake every waiter with ``error``."""
        if self._failure is None:
            self._failure = error
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.failure = self._failure
            entry.done.set()
            self._window.release()
        self._idle.set()

    def _deliver(self, reply: Reply) -> None:
        entry = self._pending.pop(reply.cookie, None)
        if entry is None:
            return  # the connection failed meanwhile; every waiter has been told
        self._window.release()
        if not self._pending:
            self._idle.set()
        if not entry.abandoned:
            entry.reply = reply
            entry.done.set()

    async def _reader(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Parse replies until the connection ends; never raises (failures go to waiters)."""
        proto = self._proto
        with trio.CancelScope() as scope:
            self._reader_scope = scope
            task_status.started()
            try:
                while True:
                    event = proto.next_event()
                    if event is NEED_DATA:
                        if self._socket is None:  # TLS: decrypted bytes come as bytes
                            proto.receive_data(await self._stream.receive_some(_RECEIVE_SIZE))
                        elif (view := proto.receive_buffer()) is not None:
                            with trio.CancelScope() as self._recv_scope:
                                proto.received_into(await self._socket.recv_into(view))
                            self._recv_scope = None
                        else:
                            size = proto.receive_size(_RECEIVE_SIZE)
                            proto.receive_data(await self._stream.receive_some(size))
                    elif isinstance(event, Reply):
                        self._deliver(event)
                    elif isinstance(event, ConnectionClosed):
                        self._fail(NBDConnectionError("the server closed the connection"))
                        return
                    else:  # pragma: no cover - the state machine emits nothing else now
                        raise LocalProtocolError(f"unexpected event {event!r}")
            except NBDError as exc:
                self._fail(exc)
            except _STREAM_ERRORS as exc:
                self._fail(_io_error(exc, "reading replies"))
            # A server that broke the protocol gets no more from us.
            await trio.aclose_forcefully(self._stream)


async def open_connection(
    nursery: trio.Nursery,
    uri: str,
    tls: TLSConfig | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    request_size: int = DEFAULT_REQUEST_SIZE,
    timeout: float | None = None,
) -> Connection:
    """Connect and start the reply reader in ``nursery``; close with :meth:`Connection.aclose`.

    ``timeout`` bounds the connect and handshake, and each request's wait for its reply."""
    if window < 1:
        raise LocalProtocolError("window must be at least 1")
    export: list[ExportReady] = []

    async def go(channel: _Channel) -> None:
        export.append(await channel.negotiate(channel.target.export))

    if timeout is None:
        channel = await _handshake(uri, tls, go)
    else:
        with trio.move_on_after(timeout) as scope:
            channel = await _handshake(uri, tls, go)
        if scope.cancelled_caught:
            raise NBDConnectionError(f"{uri}: no connection and handshake within {timeout:g}s "
                                     "(server stalled or unreachable)")
    conn = Connection(channel, export[0], window=window, request_size=request_size,
                      timeout=timeout)
    await nursery.start(conn._reader)
    return conn


@asynccontextmanager
async def connect(
    uri: str,
    tls: TLSConfig | None = None,
    *,
    window: int = DEFAULT_WINDOW,
    request_size: int = DEFAULT_REQUEST_SIZE,
    timeout: float | None = None,
) -> AsyncIterator[Connection]:
    """Connect to an NBD export named by a libnbd-style URI; disconnect on exit.

    ``tls`` overrides the URI's ``tls-*`` parameters (nbds:// schemes only). ``window`` is
    the number of requests kept in flight, ``request_size`` the largest READ/WRITE payload,
    ``timeout`` the deadline of the connect and handshake and of each request's reply.
    """
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            conn = await open_connection(
                nursery, uri, tls, window=window, request_size=request_size, timeout=timeout
            )
            try:
                yield conn
            finally:
                await conn.aclose()
    except BaseExceptionGroup as group:
        # The reader never raises, so a group holds just what the body raised: unwrap it
        # (outside this block, so it is not chained to the group).
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
    if error is not None:
        raise error


async def list_exports(uri: str, tls: TLSConfig | None = None) -> list[tuple[str, str]]:
    """The ``(name, description)`` of every export the server lists (``NBD_OPT_LIST``)."""
    names: list[tuple[str, str]] = []

    async def collect(channel: _Channel) -> None:
        await channel.send(channel.proto.opt_list())
        while True:
            event = await channel.event()
            if isinstance(event, ServerExport):
                names.append((event.name, event.description))
            elif isinstance(event, OptionError):
                raise _option_error(event)
            elif isinstance(event, OptionAck):
                return

    channel = await _handshake(uri, tls, collect)
    await channel.abort()
    return names


__all__: Sequence[str] = ["Connection", "Extent", "connect", "list_exports", "open_connection"]
