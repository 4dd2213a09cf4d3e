"""Small persistent state for trackers: atomically replaced JSON files and an exclusive lock.

A state file is written to a temporary name, flushed to disk and renamed over the old one,
so a crash leaves either the old or the new state, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbdsink.tracker.base import TrackerError


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_json(path: Path) -> dict[str, Any]:
    """The state in ``path``; a :class:`TrackerError` if it is missing or unreadable."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TrackerError(f"tracker state {path} is missing") from None
    except (OSError, ValueError) as exc:
        raise TrackerError(f"tracker state {path} is unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise TrackerError(f"tracker state {path} is not a JSON object")
    return data


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed): one checkpoint at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
