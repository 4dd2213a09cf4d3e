"""A token bucket limiting the bytes per second the sender puts on the wire."""

from __future__ import annotations

import trio


class RateLimiter:
    """``await limiter.acquire(n)`` before sending ``n`` bytes.

    The bucket holds at most ``burst`` bytes (default: a quarter second of traffic, and at
    least one request), so an idle period does not turn into a burst at full line speed.
    A rate of 0 means unlimited. Concurrent tasks are served in arrival order: a lock
    makes each wait for its turn, so one large request cannot be starved by small ones.
    """

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate // 4, 1)
        self._tokens = float(self.burst)
        self._stamp: float | None = None
        self._lock = trio.Lock()

    async def acquire(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            self._refill()
            # A request larger than the bucket may drive it negative; the debt is paid by
            # waiting, which keeps the long-run average at ``rate`` for any request size.
            self._tokens -= nbytes
            if self._tokens < 0:
                await trio.sleep(-self._tokens / self.rate)
                self._refill()

    def _refill(self) -> None:
        now = trio.current_time()
        if self._stamp is not None:
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
