"""NBD: a sans-IO protocol core (:mod:`nbdsink.nbd.sansio`) and a trio client over it.

async with nbdsink.nbd.connect("nbds://backup:10809/web01-root", tls=TLSConfig(...)) as conn:
    data = await conn.pread(4096, 0)

names = await nbdsink.nbd.list_exports("nbd+unix:///?socket=/run/nbd.sock")
"""

from nbdsink.nbd.client import Connection, Extent, connect, list_exports, open_connection
from nbdsink.nbd.errors import (
    LocalProtocolError,
    NBDConnectionError,
    NBDError,
    NBDOptionError,
    NBDReplyError,
    NBDTLSError,
    RemoteProtocolError,
    UnsupportedError,
    URIError,
)
from nbdsink.nbd.tls import TLSConfig
from nbdsink.nbd.uri import Target, parse_uri

__all__ = [
    "Connection",
    "Extent",
    "LocalProtocolError",
    "NBDConnectionError",
    "NBDError",
    "NBDOptionError",
    "NBDReplyError",
    "NBDTLSError",
    "RemoteProtocolError",
    "TLSConfig",
    "Target",
    "URIError",
    "UnsupportedError",
    "connect",
    "list_exports",
    "open_connection",
    "parse_uri",
]
