"""The batch subscribers' long poll (shared/kafka.py): no sleep after an empty fetch, no spin."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from faststream.kafka.subscriber.usecase import BatchSubscriber

from shared.kafka import _long_poll_batch


class FakeConsumer:
    """`getmany` that waits `delay` seconds and then gives `result`."""

    def __init__(self, result: dict[str, list[str]], delay: float) -> None:
        self.result, self.delay, self.calls = result, delay, 0

    async def getmany(self, *, timeout_ms: int, max_records: int | None) -> Any:
        self.calls += 1
        await asyncio.sleep(self.delay)
        return self.result


def subscriber(wait_ms: int) -> Any:
    return SimpleNamespace(batch_timeout_ms=wait_ms, max_records=10)


def test_every_batch_subscriber_uses_the_long_poll() -> None:
    assert BatchSubscriber.get_msg is _long_poll_batch


async def test_records_are_returned_in_partition_order_at_once() -> None:
    consumer = FakeConsumer({"p0": ["a", "b"], "p1": ["c"]}, delay=0.0)
    started = time.monotonic()
    assert await _long_poll_batch(subscriber(1000), consumer) == ("a", "b", "c")
    assert time.monotonic() - started < 0.5


async def test_an_empty_long_poll_is_not_followed_by_a_sleep() -> None:
    consumer = FakeConsumer({}, delay=0.2)  # getmany waited its whole timeout
    started = time.monotonic()
    assert await _long_poll_batch(subscriber(200), consumer) == ()
    assert time.monotonic() - started < 0.35


async def test_an_early_empty_answer_waits_out_the_rest_so_it_never_spins() -> None:
    consumer = FakeConsumer({}, delay=0.0)  # nothing assigned: getmany returns at once
    started = time.monotonic()
    assert await _long_poll_batch(subscriber(200), consumer) == ()
    assert time.monotonic() - started >= 0.19
