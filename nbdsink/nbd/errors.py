"""The exceptions of the NBD client.

Every error derives from :class:`NBDError`, itself an :class:`~nbdsink.errors.NbdsinkError`, so
the CLI reports them as ``nbdsink: error: ...``. The protocol layer raises exactly two kinds of
protocol error, split by whose fault it is: :class:`LocalProtocolError` (this side asked for
something the protocol or the server's advertised features forbid) and
:class:`RemoteProtocolError` (the server sent something the protocol forbids). After a
:class:`RemoteProtocolError` the connection is unusable and is closed.
"""

from __future__ import annotations

import errno as _errno
import os

from nbdsink.errors import NbdsinkError
from nbdsink.nbd import protocol as p


class NBDError(NbdsinkError):
    """Root of every error raised by :mod:`nbdsink.nbd`."""


class LocalProtocolError(NBDError):
    """This side tried something the protocol or the server's advertised features forbid."""


class UnsupportedError(LocalProtocolError):
    """The request needs a feature (command or flag) the server did not advertise."""


class RemoteProtocolError(NBDError):
    """The server broke the protocol; the connection has been (or must be) closed."""


class NBDConnectionError(NBDError):
    """The connection could not be made, or was lost (EOF, reset, closed by this side)."""


class NBDTLSError(NBDConnectionError):
    """TLS could not be set up: refused by the server, bad certificate, failed verification."""


class URIError(NBDError):
    """An NBD URI could not be parsed or asks for something unsupported."""

    exit_code = 2


class NBDOptionError(NBDError):
    """The server refused a handshake option; ``message`` is the server's own explanation."""

    def __init__(self, option: int, reply_type: int, message: str) -> None:
        self.option = option
        self.reply_type = reply_type
        self.message = message
        text = f"server refused {p.option_name(option)}: {p.reply_type_name(reply_type)}"
        if message:
            text += f": {message}"
        super().__init__(text)


# NBD error numbers are their own namespace (they happen to match Linux for the common
# ones); anything the protocol does not define is treated as EINVAL, as the spec says.
_NBD_TO_ERRNO = {
    p.NBD_EPERM: _errno.EPERM,
    p.NBD_EIO: _errno.EIO,
    p.NBD_ENOMEM: _errno.ENOMEM,
    p.NBD_EINVAL: _errno.EINVAL,
    p.NBD_ENOSPC: _errno.ENOSPC,
    p.NBD_EOVERFLOW: _errno.EOVERFLOW,
    p.NBD_ENOTSUP: _errno.ENOTSUP,
    p.NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}


def errno_from_nbd(nbd_errno: int) -> int:
    """Map an NBD error number to the Python (host) errno; unknown values become EINVAL."""
    return _NBD_TO_ERRNO.get(nbd_errno, _errno.EINVAL)


class NBDReplyError(NBDError):
    """The server answered a request with an error.

    ``errno`` is the host errno (compare with :mod:`errno` constants), ``nbd_errno`` the raw
    value on the wire, ``message`` the server's text (structured replies only) and ``offset``
    the failing offset when the server said (``NBD_REPLY_TYPE_ERROR_OFFSET``).
    """

    def __init__(
        self, nbd_errno: int, message: str = "", offset: int | None = None, command: str = ""
    ) -> None:
        self.nbd_errno = nbd_errno
        self.errno = errno_from_nbd(nbd_errno)
        self.message = message
        self.offset = offset
        text = f"{command or 'request'} failed: {os.strerror(self.errno)}"
        if offset is not None:
            text += f" at offset {offset}"
        if message:
            text += f": {message}"
        super().__init__(text)
