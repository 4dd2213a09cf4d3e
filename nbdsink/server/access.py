"""``nbdsink serve --access FILE``: which client may open which volume, and whether to write.

nbdkit 1.32 tells a plugin who the client is only by its socket: the IP address of a TCP
client, the user and group ids of a unix-socket client (see :mod:`nbdsink.server.nbdkit_c`).
It does not tell which certificate (or TLS-PSK identity) the client authenticated with, so
rules name addresses and ids, never certificates; TLS with ``--tls-verify-peer`` still decides
who may connect at all. docs/access.md says what this protects against and what it does not.

The file is TOML, a list of rules::

    [[allow]]
    clients = ["10.1.0.7", "10.1.0.0/24", "2001:db8::/64"]   # TCP clients: addresses, networks
    volumes = ["web01-root", "web01-*"]                      # names or shell patterns
    access = "write"                                         # or "read"

    [[allow]]
    clients = ["uid:1001", "gid:50", "unix", "any"]          # unix-socket peers; any client
    volumes = ["*"]
    access = "read"

A client may open an export of a volume only when a rule names both; with ``read`` every
export of that volume is served read-only (the head too, as ``--read-only`` serves it) except
``VOL@N;scratch``, whose writes never reach the store. The strongest matching rule wins.
Everything not allowed is refused, and the refused volumes are left out of the export list.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdsink.errors import UsageError
from nbdsink.server.nbdkit_c import PeerInfo

READ = "read"
WRITE = "write"
_LEVEL = {READ: 1, WRITE: 2}

_IDENTITY_WORDS = re.compile(r"^(cn|dn|o|ou|c|san|cert|certificate|psk|tls|user|name|identity)"
                             r"\s*[:=]", re.IGNORECASE)
CERTIFICATE_NOTE = (
    "nbdkit 1.32 does not tell plugins which certificate or TLS-PSK identity a client used "
    "(nbdkit_peer_tls_dn came in later versions): name the client's address (10.1.0.7, "
    "10.1.0.0/24) or, on a unix socket, uid:N or gid:N; see docs/access.md"
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessFileError(UsageError):
    """An access file that cannot be used as it is."""


@dataclass(frozen=True)
class ClientPattern:
    """One entry of a rule's ``clients``: ``any``, ``unix``, ``uid:N``, ``gid:N`` or an IP
    address or network."""

    text: str
    kind: str
    number: int = 0
    network: Network | None = None

    def matches(self, peer: PeerInfo | None) -> bool:
        if self.kind == "any":
            return True
        if peer is None:
            return False
        if self.kind == "unix":
            return peer.family == socket.AF_UNIX
        if self.kind == "uid":
            return peer.uid == self.number
        if self.kind == "gid":
            return peer.gid == self.number
        if peer.address is None:
            return False
        assert self.network is not None
        return ipaddress.ip_address(peer.address) in self.network


@dataclass(frozen=True)
class Rule:
    clients: tuple[ClientPattern, ...]
    volumes: tuple[str, ...]
    access: str

    def grants(self, peer: PeerInfo | None, volume: str) -> bool:
        return (any(c.matches(peer) for c in self.clients)
                and any(fnmatch.fnmatchcase(volume, v) for v in self.volumes))


@dataclass(frozen=True)
class AccessRules:
    """The rules of one access file."""

    path: str
    rules: tuple[Rule, ...]

    @classmethod
    def load(cls, path: str | Path) -> AccessRules:
        """Read and check an access file; AccessFileError says what is wrong, and where."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise AccessFileError(f"--access {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise AccessFileError(f"--access {path}: not valid TOML: {exc}") from None
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: dict[str, Any], path: str = "<access>") -> AccessRules:
        unknown = set(data) - {"allow"}
        if unknown:
            raise AccessFileError(f"--access {path}: unknown key {sorted(unknown)[0]!r}: "
                                  "the file is a list of [[allow]] rules")
        entries = data.get("allow", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise AccessFileError(f"--access {path}: 'allow' must be a list of [[allow]] tables")
        return cls(path, tuple(_rule(e, f"--access {path}: rule {i}")
                               for i, e in enumerate(entries, 1)))

    def grant(self, peer: PeerInfo | None, volume: str) -> str | None:
        """``write``, ``read``, or None (no access) for ``peer`` on ``volume``."""
        best: str | None = None
        for rule in self.rules:
            if _LEVEL[rule.access] > _LEVEL.get(best or "", 0) and rule.grants(peer, volume):
                best = rule.access
        return best


def describe(peer: PeerInfo | None) -> str:
    """The client as a log line names it."""
    if peer is None:
        return "an unidentified client"
    if peer.address is not None:
        return f"client {peer.address}"
    if peer.family == socket.AF_UNIX:
        ids = f"uid {peer.uid}, gid {peer.gid}" if peer.uid is not None else "ids unknown"
        return f"unix-socket client ({ids})"
    return f"client of address family {peer.family}"


def _rule(entry: dict[str, Any], where: str) -> Rule:
    unknown = set(entry) - {"clients", "volumes", "access"}
    if unknown:
        raise AccessFileError(f"{where}: unknown key {sorted(unknown)[0]!r} (a rule has "
                              "clients, volumes and access)")
    access = entry.get("access")
    if access not in _LEVEL:
        raise AccessFileError(f"{where}: access must be \"read\" or \"write\", not {access!r}")
    clients = _strings(entry, "clients", where)
    volumes = _strings(entry, "volumes", where)
    return Rule(tuple(_client(c, where) for c in clients), tuple(volumes), access)


def _strings(entry: dict[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        raise AccessFileError(f"{where}: {key} must be a non-empty list of strings")
    return value


def _client(text: str, where: str) -> ClientPattern:
    word = text.strip().lower()
    if word in ("any", "all"):
        return ClientPattern(text, "any")
    if word == "unix":
        return ClientPattern(text, "unix")
    kind, sep, number = word.partition(":")
    if sep and kind in ("uid", "gid"):
        if not number.isascii() or not number.isdigit():
            raise AccessFileError(f"{where}: {text!r}: expected {kind}:NUMBER")
        return ClientPattern(text, kind, int(number))
    try:
        return ClientPattern(text, "ip", network=ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        pass
    if _IDENTITY_WORDS.match(text.strip()) or "=" in text:
        raise AccessFileError(f"{where}: {text!r} looks like a certificate or TLS identity: "
                              + CERTIFICATE_NOTE)
    raise AccessFileError(f"{where}: {text!r} is not a client: expected an IP address or "
                          "network, uid:N, gid:N, unix or any (host names are not resolved)")
