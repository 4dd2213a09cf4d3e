"""NBD URIs in libnbd's syntax.

``nbd://host[:port]/export``, ``nbds://...`` (TLS required), ``nbd+unix:///export?socket=PATH``
and ``nbds+unix://...``. The export name is the path without its leading slash,
percent-decoded. Query parameters, as libnbd names them: ``socket``, ``tls-certificates``
(a directory holding ``ca-cert.pem`` and optionally ``client-cert.pem``/``client-key.pem``),
``tls-verify-peer`` (``false`` to skip verification) and ``tls-hostname`` (the name to check
the server's certificate against). TLS-PSK (``tls-psk-file``, a user name in the URI) is
refused: Python's ``ssl`` module has no PSK support.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from nbdsink.nbd.errors import URIError

DEFAULT_PORT = 10809

_SCHEMES = {
    "nbd": (False, False),
    "nbds": (True, False),
    "nbd+unix": (False, True),
    "nbds+unix": (True, True),
}
_KNOWN_PARAMS = {"socket", "tls-certificates", "tls-verify-peer", "tls-hostname"}


@dataclass(frozen=True)
class Target:
    """Where to connect and what to ask for, as a parsed URI says."""

    uri: str
    tls: bool
    export: str
    host: str | None = None
    port: int = DEFAULT_PORT
    socket: str | None = None
    tls_certificates: str | None = None
    tls_verify_peer: bool = True
    tls_hostname: str | None = None

    def describe(self) -> str:
        """Where the server is, for error messages."""
        if self.socket is not None:
            return f"unix socket {self.socket}"
        return f"{self.host}:{self.port}"


def _bool(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise URIError(f"{name}={value!r}: expected true or false")


def parse_uri(uri: str) -> Target:
    """Parse an NBD URI; raises :class:`URIError` with the reason when it cannot be used."""
    try:
        parts = urlsplit(uri)
        port_number = parts.port
    except ValueError as exc:
        raise URIError(f"{uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise URIError(f"{uri!r}: scheme must be one of {', '.join(_SCHEMES)}")
    tls, unix = _SCHEMES[scheme]
    if parts.username is not None or parts.password is not None:
        raise URIError(f"{uri!r}: user names are for TLS-PSK, which is not supported")
    if parts.fragment:
        raise URIError(f"{uri!r}: unexpected fragment")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError as exc:
        raise URIError(f"{uri!r}: bad query: {exc}") from None
    params: dict[str, str] = {}
    for key, values in query.items():
        if key == "tls-psk-file":
            raise URIError(
                f"{uri!r}: TLS-PSK is not supported (Python's ssl has no PSK); use X.509"
            )
        if key not in _KNOWN_PARAMS:
            raise URIError(f"{uri!r}: unknown query parameter {key!r}")
        if len(values) != 1:
            raise URIError(f"{uri!r}: {key} given more than once")
        params[key] = values[0]
    if not tls and any(k.startswith("tls-") for k in params):
        raise URIError(f"{uri!r}: TLS parameters need an nbds:// or nbds+unix:// URI")
    path = unquote(parts.path)
    export = path[1:] if path.startswith("/") else path
    socket = params.get("socket")
    host = parts.hostname
    if unix:
        if host:
            raise URIError(f"{uri!r}: a unix-socket URI has no host (nbd+unix:///export?socket=…)")
        if not socket:
            raise URIError(f"{uri!r}: missing ?socket=PATH")
        port = DEFAULT_PORT
    else:
        if socket is not None:
            raise URIError(f"{uri!r}: socket= needs the nbd+unix:// scheme")
        if not host:
            raise URIError(f"{uri!r}: missing host")
        port = port_number if port_number is not None else DEFAULT_PORT
    return Target(
        uri=uri,
        tls=tls,
        export=export,
        host=host if not unix else None,
        port=port,
        socket=socket,
        tls_certificates=params.get("tls-certificates"),
        tls_verify_peer=_bool("tls-verify-peer", params.get("tls-verify-peer", "true")),
        tls_hostname=params.get("tls-hostname"),
    )
