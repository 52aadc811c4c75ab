"""Per-key rate limits: a token bucket per key, in this process.

Written here rather than taken from a library because it needs exactly two things the usual
ones do not give together: refusing at once (not waiting) and knowing how long until the next
token, for ``Retry-After``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cachetools import LRUCache


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> float:
        """0 when a request may go; otherwise the seconds until it may."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One bucket per key. A bucket dropped from the LRU was idle, so it would have been full
    again anyway: the bound costs nothing but memory for keys nobody uses."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000):
        self._clock = clock
        self._buckets: LRUCache[str, TokenBucket] = LRUCache(maxsize=max_keys)

    def wait(self, key: str, rate: float, burst: float) -> float:
        """Take a token from ``key``'s bucket: 0, or the seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self._buckets[key] = TokenBucket(rate, burst, self._clock())
        return bucket.take(self._clock())
