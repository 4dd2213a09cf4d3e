"""Errors the sender reports to a user; each says what failed and what to do about it."""

from __future__ import annotations

from nbdsink.errors import NbdsinkError


class SenderError(NbdsinkError):
    """Base of every sender error."""


class StateError(SenderError):
    """The state directory cannot be read, written or locked."""


class DeviceError(SenderError):
    """The source device cannot be opened or read (gone, shrunk, I/O error)."""


class DeviceChanged(DeviceError):
    """The path names another device than the one this replication was started with."""

    exit_code = 5


class VolumeInUse(SenderError):
    """Another replication committed the volume's newest version."""

    exit_code = 6


class VolumeMismatch(SenderError):
    """The remote volume does not fit the device or the state (size, block size)."""

    exit_code = 3


class FreezeError(SenderError):
    """A filesystem could not be frozen or thawed, or stayed frozen too long."""


class HookError(SenderError):
    """A pre- or post-freeze hook failed."""


class RemoteError(SenderError):
    """The backup server could not be reached or refused a request.

    The replicator treats it as transient: it reconnects with backoff.
    """
