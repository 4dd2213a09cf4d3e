"""The sender-server contract: what a sender learns from an nbdsink server, and how.

One module both sides import, so that a change to either is a change to this file (and to its
version). Everything here travels over plain NBD, so standard tools can read it too.

**Digests of a version** (contract version 1). The read-only export ``VOL@N;digests`` (also
``VOL@latest;digests``, ``VOL@<time>;digests`` and, for the pending head, ``VOL;digests``) is
:data:`DIGEST_SIZE` bytes per block of the volume, in block order: the blake3 of the block's
bytes as a reader of ``VOL@N`` sees them (for a last block shorter than the block size, of
just those bytes). An all-zero block has the digest of zeros. A block whose chunk is damaged
in the store reads as :data:`DAMAGED`, which never equals a real digest, so a sender that
compares sees it differ and sends the block again, which heals the store. The server checks
every chunk it reports (reading it): only the digests cross the network.
"""

from __future__ import annotations

CONTRACT_VERSION = 1
DIGESTS_VIEW = "digests"
"""The export-name flag that selects the digests of a version instead of its data."""
DIGEST_SIZE = 32
DAMAGED = b"\xff" * DIGEST_SIZE
REPLICATION_LABEL = "replication"
"""The label a sender puts on each commit (its replication's ID, sender/ownership.py); a
version's description ends with ``, replication ID`` when it has one, and a clone's first
version drops it."""


def digests_export(volume: str, selector: str | int | None = None) -> str:
    """The export name of the digests of ``volume`` at ``selector`` (a version number,
    ``latest``, an ISO time) or of its pending head (None)."""
    base = volume if selector is None else f"{volume}@{selector}"
    return f"{base};{DIGESTS_VIEW}"
