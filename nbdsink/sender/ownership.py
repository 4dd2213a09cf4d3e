"""One volume, one replication: which replication committed a volume's newest version.

Two senders replicating different devices into the same volume (two hosts given the same
volume name, say) would not fail: each FLUSH commits what both wrote, and each sender sends
only what *its* tracker saw on top of a head that holds the other device. Every version
after that is a mix of two devices, with no error anywhere.

So every commit is labelled ``replication=ID``, where ID names the replication: this host
(``/etc/machine-id``) and this device (its identity, see identity.py, else its path). The
server shows the label in the version's description, and a session refuses to start when
the newest version was committed by another replication. The ID stays the same when the
state directory is lost (the sender then compares and carries on); it changes with the
host or the device, which ``--take-over`` (or ``--device-replaced``) accepts on purpose.
A clone's first version carries no replication: whoever replicates into the clone owns it.
"""

from __future__ import annotations

import os
import re
import socket

import blake3

from nbdsink.contract import REPLICATION_LABEL

_COMMITTED_BY = re.compile(rf", {REPLICATION_LABEL} ([0-9a-f]+)")


def replication_id(device: str, identity: str | None) -> str:
    """The ID of replicating ``device`` (whose identity is ``identity``) from this host."""
    host = _machine_id()
    what = identity if identity is not None else f"path {os.path.realpath(device)}"
    return blake3.blake3(f"{host}\0{what}".encode()).hexdigest()[:16]


def committed_by(description: str | None) -> str | None:
    """The replication that committed a version, from the version's description (None: not
    known, as for a version written by another tool, or a server that does not say)."""
    m = _COMMITTED_BY.search(description or "")
    return m.group(1) if m else None


def _machine_id() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text:
            return text
    return f"host {socket.gethostname()}"
