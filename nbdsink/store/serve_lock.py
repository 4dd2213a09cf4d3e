"""The lock that keeps a second server off a store that is being served.

Only a serving process writes heads (it batches pending writes in memory), so two servers on
one store would each believe they own the pending versions. CLI commands that only read or
create volumes do not take it: LMDB keeps them safe beside a server.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from nbdsink.store.errors import StoreLocked


def take_serve_lock(store: str | os.PathLike[str]) -> int:
    """Hold the store's serve lock; returns the descriptor (the lock lasts while it is open).

    Raises StoreLocked when another process holds it.
    """
    path = Path(store)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "serve.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(f"another nbdsink server is serving {path}") from None
    return fd
