"""The backup side as the sender sees it: a volume's writable head over the trio NBD client.

Writes go to the head (export ``VOL``). A commit opens a second, short connection to the
head with the version's attributes in the export name
(``VOL;consistency=frozen;frozen_at=...``) and FLUSHes it: pending head writes are shared by
every connection to the volume, so that FLUSH commits everything this sender wrote, and the
version records those attributes. The new version's number is then read from the
description of ``VOL@latest`` (``version N of VOL, ...``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

import blake3
import trio

from nbdsink import nbd
from nbdsink.contract import DIGEST_SIZE, REPLICATION_LABEL, digests_export
from nbdsink.nbd import Connection, NBDOptionError, TLSConfig
from nbdsink.sender.errors import VolumeMismatch
from nbdsink.sender.plan import Extent

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"^version (\d+)\b")
_BLOCK_SIZE_RE = re.compile(r"\bblock size (\d+)\b")
DIGEST_READ = 4 << 20


def with_export(uri: str, export: str) -> str:
    """The same server URI naming another export (percent-encoded: ``;``, ``@`` are safe)."""
    parts = urlsplit(uri)
    return urlunsplit(parts._replace(path="/" + quote(export, safe="")))


def volume_of(uri: str) -> str:
    """The volume a replication URI names; it must name a head, not a version."""
    export = nbd.parse_uri(uri).export
    if not export or "@" in export or ";" in export:
        raise VolumeMismatch(
            f"{uri!r} must name a volume's head (nbd://HOST/VOLUME), not {export!r}"
        )
    return export


def head_name(volume: str, consistency: str, labels: Mapping[str, str]) -> str:
    attrs = {"consistency": consistency, **labels}
    for key, value in attrs.items():
        if any(c in key + value for c in ";=@") or not key:
            raise ValueError(f"attribute {key}={value} cannot go in an export name")
    return volume + "".join(f";{k}={v}" for k, v in attrs.items())


def version_from_description(description: str | None) -> int | None:
    m = _VERSION_RE.match(description or "")
    return int(m.group(1)) if m else None


def block_size_from_description(description: str | None) -> int | None:
    """The volume's block size as an nbdsink head describes itself (``..., block size N)``).

    The head's preferred block size is larger than the block size (fewer, larger requests
    are faster), so the description is where the block size itself is found.
    """
    m = _BLOCK_SIZE_RE.search(description or "")
    return int(m.group(1)) if m else None


class NbdRemote:
    """A connected head; implements :class:`nbdsink.sender.cycle.Remote`."""

    def __init__(self, uri: str, conn: Connection, tls: TLSConfig | None,
                 head_digests: Connection | None = None) -> None:
        self.timeout = conn.timeout
        self.uri = uri
        self.volume = volume_of(uri)
        self.conn = conn
        self.tls = tls
        self.size = conn.size
        # Another NBD server: its preferred block size is the best guess.
        self.block_size = block_size_from_description(conn.description) or conn.block_size[1]
        self._head_digests = head_digests if self._is_digests_view(head_digests) else None
        self.replication: str | None = None
        """The replication's ID, put on every commit as a label (sender/ownership.py)."""

    def _is_digests_view(self, conn: Connection | None) -> bool:
        blocks = -(-self.size // self.block_size)
        return conn is not None and conn.size == blocks * DIGEST_SIZE

    @contextlib.asynccontextmanager
    async def version_view(self, version: int) -> AsyncIterator[Connection | None]:
        """A connection to the digests view of ``version`` (None if the server has none)."""
        try:
            async with nbd.connect(with_export(self.uri, digests_export(self.volume, version)),
                                   self.tls, timeout=self.timeout) as view:
                yield view if self._is_digests_view(view) else None
        except NBDOptionError:
            yield None

    async def read_digests(self, view: Connection, offset: int, length: int) -> bytes:
        """Digests of the chunks of ``[offset, offset+length)`` from a digests view."""
        first = offset // self.block_size
        count = -(-(offset + length) // self.block_size) - first
        out = bytearray()
        step = max(1, (1 << 20) // DIGEST_SIZE)  # 1 MiB of digests per request
        for c in range(first, first + count, step):
            n = min(step, first + count - c)
            out += bytes(await view.pread(n * DIGEST_SIZE, c * DIGEST_SIZE))
        return bytes(out)

    async def version_digests(self, version: int | None, offset: int, length: int) -> bytes | None:
        """Digests of the chunks of ``[offset, offset+length)`` in ``version`` (None: the
        pending head), from the server's digests view; None if it offers none."""
        if version is None:
            if self._head_digests is None:
                return None
            return await self.read_digests(self._head_digests, offset, length)
        async with self.version_view(version) as view:
            return None if view is None else await self.read_digests(view, offset, length)

    async def chunk_digests(self, offset: int, length: int) -> bytes | None:
        return await self.version_digests(None, offset, length)

    def check(self, *, size: int, chunk_size: int | None) -> None:
        """The volume must have the device's size and the state's chunk size."""
        if self.conn.read_only:
            raise VolumeMismatch(f"{self.uri}: the server offers the volume read-only")
        if self.size != size:
            raise VolumeMismatch(
                f"remote volume {self.volume!r} is {self.size} bytes but the device is {size} "
                f"bytes; create a volume of the device's size "
                f"(nbdsink volume create {self.volume} --size {size})"
            )
        if chunk_size is not None and self.block_size != chunk_size:
            raise VolumeMismatch(
                f"remote volume {self.volume!r} has block size {self.block_size} but this "
                f"sender replicates in chunks of {chunk_size} (a different volume, or a state "
                f"directory from another replication?)"
            )

    # -- the Remote interface -----------------------------------------------------------

    async def pwrite(self, data: bytes, offset: int) -> None:
        await self.conn.pwrite(data, offset)

    async def zero(self, length: int, offset: int) -> None:
        await self.conn.zero(length, offset)

    async def pread(self, length: int, offset: int) -> bytes:
        return bytes(await self.conn.pread(length, offset))

    async def zero_extents(self) -> list[Extent]:
        if not self.conn.can_block_status:
            return []
        out: list[Extent] = []
        for off, length, _hole, is_zero in await self.conn.block_status(self.size, 0):
            if is_zero:
                out.append((off, length))
        return out

    async def commit(self, consistency: str, labels: Mapping[str, str]) -> int | None:
        """FLUSH with these attributes; the version it made, or None when it made none
        (nothing had changed: the newest version stays what it was)."""
        before = await self.latest_version()
        if self.replication is not None:
            labels = {**labels, REPLICATION_LABEL: self.replication}
        name = head_name(self.volume, consistency, labels)
        async with nbd.connect(with_export(self.uri, name), self.tls,
                               timeout=self.timeout) as committer:
            await committer.flush()
        after = await self.latest_version()
        return None if after == before else after

    async def latest_version(self) -> int | None:
        """The newest committed version (None when the volume has none yet)."""
        return version_from_description(await self.latest_description())

    async def latest_description(self) -> str | None:
        """How the server describes the newest version (None when there is none yet)."""
        try:
            async with nbd.connect(
                with_export(self.uri, f"{self.volume}@latest"), self.tls, timeout=self.timeout
            ) as latest:
                return latest.description
        except NBDOptionError:
            return None

    async def digests(self, chunk_size: int) -> bytes:
        """blake3 of every chunk of the head (what a FLUSH would commit), in chunk order.

        From the server's digests view when it has one; otherwise the data are read (zero
        ranges, from block status, are hashed locally, without reading them).
        """
        if chunk_size == self.block_size:
            found = await self.version_digests(None, 0, self.size)
            if found is not None:
                return found
        zero_digest = blake3.blake3(bytes(chunk_size)).digest()
        zeros = await self.zero_extents()
        out = bytearray()
        nchunks = -(-self.size // chunk_size)
        is_zero = bytearray(nchunks)
        for off, length in zeros:
            first = -(-off // chunk_size)
            last = (off + length) // chunk_size  # exclusive: whole chunks only
            if off + length == self.size:
                last = nchunks
            is_zero[first:last] = b"\1" * max(0, last - first)
        step = max(1, DIGEST_READ // chunk_size)
        for first in range(0, nchunks, step):
            count = min(step, nchunks - first)
            offset = first * chunk_size
            length = min(count * chunk_size, self.size - offset)
            if all(is_zero[first : first + count]):
                for c in range(first, first + count):
                    end = min((c + 1) * chunk_size, self.size)
                    n = end - c * chunk_size
                    out += zero_digest if n == chunk_size else blake3.blake3(bytes(n)).digest()
                continue
            data = await self.pread(length, offset)
            for pos in range(0, length, chunk_size):
                out += blake3.blake3(data[pos : pos + chunk_size]).digest()
        return bytes(out)


@contextlib.asynccontextmanager
async def open_remote(
    uri: str, tls: TLSConfig | None = None, *, window: int = 16, device_size: int | None = None,
    timeout: float | None = None,
) -> AsyncIterator[NbdRemote]:
    """Connect to the head the URI names; a volume that does not exist is a clear error."""
    volume = volume_of(uri)
    async with contextlib.AsyncExitStack() as stack:
        try:
            conn = await stack.enter_async_context(
                nbd.connect(uri, tls, window=window, timeout=timeout))
        except NBDOptionError as exc:
            raise VolumeMismatch(
                f"the server refused volume {volume!r}: {exc.message or exc} "
                f"(create it on the backup host: nbdsink volume create {volume} --size "
                f"{device_size if device_size is not None else 'SIZE'})"
            ) from exc
        # The head's digests view (an nbdsink server has one): compare mode uses it.
        head_digests: Connection | None = None
        with contextlib.suppress(NBDOptionError):
            head_digests = await stack.enter_async_context(
                nbd.connect(with_export(uri, digests_export(volume)), tls, timeout=timeout))
        yield NbdRemote(uri, conn, tls, head_digests)


async def wait_ready(uri: str, timeout: float) -> None:
    """Poll until the server answers (used by tests and the demo)."""
    with trio.fail_after(timeout):
        while True:
            try:
                await nbd.list_exports(with_export(uri, ""))
                return
            except nbd.NBDError:
                await trio.sleep(0.1)
