"""A token bucket per key: the status API's per caller, the console's sign-ins per client
address."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """A token bucket per key: `rate` requests a second on average, `burst` at once.

    Keys an unauthenticated caller chooses (a client address) must be bounded: with
    `capacity`, the keys seen least recently are forgotten past that many. A forgotten key
    starts again with a full bucket, so the bound costs an attacker with that many
    addresses nothing it could not have had from them anyway.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 capacity: int | None = None) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clock = clock
        self.capacity = capacity
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str) -> float | None:
        """None if the request may go ahead, else the seconds until it would."""
        now = self.clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        self._buckets.move_to_end(key)
        if self.capacity is not None:
            while len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.rate

    def keys_held(self) -> int:
        """How many keys have a bucket now (not `__len__`: an empty limiter is not false)."""
        return len(self._buckets)
