"""The versioned, content-addressed block store (LMDB).

:class:`nbdsink.store.store.Store` is the only thing that touches LMDB. It knows volumes,
versions, the block map and chunks; it knows nothing of NBD or export names.
"""

from nbdsink.store.errors import (
    StoreError,
    StoreFormatError,
    StoreFull,
    StoreLocked,
    UnknownVersion,
    UnknownVolume,
    VolumeExists,
)
from nbdsink.store.store import Store, VersionInfo, VolumeInfo

__all__ = [
    "Store",
    "StoreError",
    "StoreFormatError",
    "StoreFull",
    "StoreLocked",
    "UnknownVersion",
    "UnknownVolume",
    "VersionInfo",
    "VolumeExists",
    "VolumeInfo",
]
