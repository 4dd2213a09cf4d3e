"""Store errors. Each carries the errno an NBD client should see."""

from __future__ import annotations

import errno

from nbdsink.errors import NbdsinkError


class StoreError(NbdsinkError):
    """Base of every store error."""

    errno = errno.EIO


class StoreFormatError(StoreError):
    """The directory holds a store in a format this version cannot read, or no store."""


class StoreLocked(StoreError):
    """Another process serves this store already."""

    errno = errno.EBUSY


class StoreFull(StoreError):
    """No room: the disk is full, or the LMDB map cannot grow any further."""

    errno = errno.ENOSPC


class UnknownVolume(StoreError):
    errno = errno.ENOENT


class UnknownVersion(StoreError):
    errno = errno.ENOENT


class VolumeExists(StoreError):
    errno = errno.EEXIST
