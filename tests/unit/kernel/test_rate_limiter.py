"""The token bucket per key (`shared.ratelimit`), and the bound on the keys it keeps."""

from __future__ import annotations

from shared.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_gets_its_burst_then_waits_for_the_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.5, burst=2, clock=clock)
    assert [limiter.allow("a"), limiter.allow("a")] == [None, None]
    assert limiter.allow("a") == 2.0  # one token at 0.5 a second
    assert limiter.allow("b") is None  # a bucket of its own
    clock.now += 2.0
    assert limiter.allow("a") is None


def test_past_its_capacity_the_limiter_forgets_the_keys_seen_least_recently() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=0.001, burst=1, clock=clock, capacity=3)
    for key in ("a", "b", "c"):
        assert limiter.allow(key) is None
    assert limiter.allow("a") is not None  # "a" is now the most recently seen
    assert limiter.allow("d") is None  # "b" goes
    assert limiter.keys_held() == 3
    assert limiter.allow("c") is not None and limiter.allow("a") is not None  # kept
    assert limiter.allow("b") is None  # forgotten: a full bucket again


def test_an_unbounded_limiter_keeps_every_key() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock())
    for n in range(500):
        limiter.allow(str(n))
    assert limiter.keys_held() == 500
