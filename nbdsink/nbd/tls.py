"""X.509 TLS settings for NBD connections, turned into an :class:`ssl.SSLContext`."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from nbdsink.nbd.errors import NBDTLSError
from nbdsink.nbd.uri import Target

# Where libnbd looks for certificates when a URI names no directory.
_DEFAULT_DIRS = ("~/.pki/libnbd", "/etc/pki/libnbd")


@dataclass(frozen=True)
class TLSConfig:
    """How to authenticate the server (and optionally this client) with X.509.

    ``ca_file`` is the CA bundle the server's certificate must chain to (None: the system's
    trust store). ``cert_file``/``key_file`` give a client certificate for servers that verify
    their peers. ``hostname`` is the name the server's certificate must carry; by default the
    URI's host, and no name check over a unix socket (there is no host name to compare). With
    ``verify_peer=False`` the server is not authenticated at all: encryption only.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    hostname: str | None = None
    verify_peer: bool = True

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str], **kwargs: object) -> TLSConfig:
        """The libnbd/nbdkit layout: ``ca-cert.pem``, optional ``client-cert.pem`` and
        ``client-key.pem``."""
        base = Path(directory).expanduser()
        ca = base / "ca-cert.pem"
        cert = base / "client-cert.pem"
        key = base / "client-key.pem"
        return cls(
            ca_file=str(ca) if ca.exists() else None,
            cert_file=str(cert) if cert.exists() else None,
            key_file=str(key) if cert.exists() and key.exists() else None,
            **kwargs,  # type: ignore[arg-type]
        )

    @classmethod
    def from_target(cls, target: Target) -> TLSConfig:
        """Settings from a URI's ``tls-*`` parameters, falling back to libnbd's default
        certificate directories, then to the system trust store."""
        extra = {"verify_peer": target.tls_verify_peer, "hostname": target.tls_hostname}
        if target.tls_certificates is not None:
            if not Path(target.tls_certificates).is_dir():
                raise NBDTLSError(f"tls-certificates: no directory {target.tls_certificates}")
            return cls.from_directory(target.tls_certificates, **extra)
        for candidate in _DEFAULT_DIRS:
            if (Path(candidate).expanduser() / "ca-cert.pem").exists():
                return cls.from_directory(candidate, **extra)
        return cls(verify_peer=target.tls_verify_peer, hostname=target.tls_hostname)

    def server_hostname(self, target: Target) -> str | None:
        """The name to verify the server's certificate against (None: no name check)."""
        if not self.verify_peer:
            return None
        return self.hostname if self.hostname is not None else target.host

    def context(self, check_hostname: bool) -> ssl.SSLContext:
        """A client-side context; raises :class:`NBDTLSError` for unreadable files."""
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if not self.verify_peer:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            else:
                ctx.check_hostname = check_hostname
            if self.cert_file is not None:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise NBDTLSError(f"cannot load TLS certificates: {exc}") from exc
        return ctx
