"""Worker processes for ``nbdsink verify``: the walk of LMDB's pages and the re-hashing of
chunks are Python that holds the GIL between short calls into C, so threads cannot run them
side by side; forked processes can, one per CPU.

A fork copies only the calling thread: a lock another thread held stays held in the child.
So workers are forked only by a process running no other thread, and before it opens the
store with LMDB (an environment is used only by the process that opened it); each worker
opens what it reads itself.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import threading
from collections.abc import Callable
from typing import Any


def default_jobs() -> int:
    """How many workers: one per CPU this process may run on, at most 8 (beyond that the
    disk, not hashing, sets the pace)."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def can_fork() -> bool:
    """Whether this process may fork workers now (it runs no other thread)."""
    return threading.active_count() == 1


def fork_pool(jobs: int, initializer: Callable[..., None] | None = None,
              initargs: tuple[Any, ...] = ()) -> multiprocessing.pool.Pool:
    """A pool of ``jobs`` forked workers that leave Ctrl-C to their parent (it reaches the
    whole process group; the parent stops them itself)."""
    return multiprocessing.get_context("fork").Pool(
        jobs, initializer=_start, initargs=(initializer, initargs))


def _start(initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
