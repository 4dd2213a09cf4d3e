"""Exponential backoff with jitter, for reconnecting after network or server failures."""

from __future__ import annotations

import random


class Backoff:
    """``next()`` gives the delay before the next attempt: initial, x2 each time, capped.

    Jitter (+-20 %) keeps a fleet of senders from reconnecting in lockstep after the backup
    host restarts. ``reset()`` after a success.
    """

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, jitter: float = 0.2) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.maximum, self._next * 2)
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._next = self.initial
