"""Functions of the nbdkit server that its 1.32 Python module does not bind, called through ctypes.

nbdkit 1.32's ``nbdkit`` module offers only ``debug``, ``export_name``, ``parse_size``,
``set_error`` and ``shutdown`` (plugins/python/modfunctions.c at v1.32.5). The server itself
exports more of its public C API to plugins (``nm -D /usr/bin/nbdkit``: ``nbdkit_error``,
``nbdkit_export_name``, ``nbdkit_is_tls``, ``nbdkit_peer_name``, ``nbdkit_peer_uid``,
``nbdkit_peer_gid``, ``nbdkit_peer_pid``), and the Python plugin runs inside that process, so
those symbols resolve from the main program. Each function here works only in a thread nbdkit
runs a connection's callback in (they read nbdkit's thread-local connection); elsewhere, or
outside nbdkit, they return None and the caller falls back to what the module offers.

No certificate or TLS-PSK identity is reachable: nbdkit 1.32 keeps the GnuTLS session private
to the server and has no ``nbdkit_peer_tls_dn`` (see docs/access.md).
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass
from functools import cache

_SOCKADDR_SIZE = 128  # sizeof (struct sockaddr_storage)


@cache
def _server() -> ctypes.CDLL | None:
    """The nbdkit program's own symbols, or None when this process is not nbdkit."""
    try:
        lib = ctypes.CDLL(None)
        lib.nbdkit_peer_name  # noqa: B018 (probe: AttributeError when not inside nbdkit)
    except (OSError, AttributeError):
        return None
    lib.nbdkit_error.restype = None
    lib.nbdkit_export_name.restype = ctypes.c_char_p
    lib.nbdkit_export_name.argtypes = []
    lib.nbdkit_is_tls.restype = ctypes.c_int
    lib.nbdkit_is_tls.argtypes = []
    lib.nbdkit_peer_name.restype = ctypes.c_int
    lib.nbdkit_peer_name.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    for fn in (lib.nbdkit_peer_uid, lib.nbdkit_peer_gid):
        fn.restype = ctypes.c_int64
        fn.argtypes = []
    return lib


def log_error(message: str) -> bool:
    """One line in nbdkit's log through ``nbdkit_error`` (so it carries nbdkit's prefix with
    the connection's thread, ``nbdkit: python[N]: error:``, and goes wherever ``--log``
    sends nbdkit's own lines). False when not inside nbdkit."""
    lib = _server()
    if lib is None:
        return False
    # Passed as an argument of "%s", never as the format: a name may hold '%'.
    lib.nbdkit_error(b"%s", message.encode("utf-8", "backslashreplace"))
    return True


def export_name_bytes() -> bytes | None:
    """The export name exactly as the client sent it (``nbdkit.export_name()`` raises
    UnicodeDecodeError on a name that is not UTF-8, losing the bytes)."""
    lib = _server()
    if lib is None:
        return None
    raw: bytes | None = lib.nbdkit_export_name()
    return raw


@dataclass(frozen=True)
class PeerInfo:
    """What nbdkit 1.32 can tell about the other end of the connection."""

    family: int
    """socket.AF_INET, AF_INET6, AF_UNIX, or another address family."""
    address: str | None = None
    """The IP address (IPv4-mapped IPv6 addresses as plain IPv4), for AF_INET and AF_INET6."""
    uid: int | None = None
    """The peer's user and group ids (SO_PEERCRED), for AF_UNIX."""
    gid: int | None = None
    tls: bool = False


def peer() -> PeerInfo | None:
    """The client of the current connection (None when nbdkit cannot say)."""
    lib = _server()
    if lib is None:
        return None
    buf = ctypes.create_string_buffer(_SOCKADDR_SIZE)
    size = ctypes.c_uint32(_SOCKADDR_SIZE)
    if lib.nbdkit_peer_name(buf, ctypes.byref(size)) == -1:
        return None
    raw = buf.raw[: size.value]
    tls = lib.nbdkit_is_tls() == 1
    return _peer_from(raw, tls, lib)


def _peer_from(raw: bytes, tls: bool, lib: ctypes.CDLL | None) -> PeerInfo | None:
    if len(raw) < 2:
        return None
    (family,) = struct.unpack_from("=H", raw)  # sa_family_t, in host order
    if family == socket.AF_INET and len(raw) >= 8:
        return PeerInfo(family, socket.inet_ntop(socket.AF_INET, raw[4:8]), tls=tls)
    if family == socket.AF_INET6 and len(raw) >= 24:
        addr = raw[8:24]
        if addr[:12] == b"\0" * 10 + b"\xff\xff":  # ::ffff:a.b.c.d, an IPv4 client of [::]
            return PeerInfo(family, socket.inet_ntop(socket.AF_INET, addr[12:]), tls=tls)
        return PeerInfo(family, socket.inet_ntop(socket.AF_INET6, addr), tls=tls)
    if family == socket.AF_UNIX and lib is not None:
        # Asked only of a unix socket: on any other, nbdkit_peer_uid logs an error.
        uid, gid = lib.nbdkit_peer_uid(), lib.nbdkit_peer_gid()
        return PeerInfo(family, uid=uid if uid >= 0 else None,
                        gid=gid if gid >= 0 else None, tls=tls)
    return PeerInfo(family, tls=tls)
