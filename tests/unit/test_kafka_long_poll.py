"""The batch subscribers' long poll (shared/kafka.py): no sleep after an empty fetch, no spin."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import TopicAuthorizationFailedError
from faststream.kafka.subscriber.usecase import BatchSubscriber

from shared.kafka import _long_poll_batch, linger


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


class ScriptedConsumer:
    """`getmany` that gives (or raises) each of `answers` in turn, noting what it was asked."""

    def __init__(self, *answers: dict[str, list[str]] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[int, int | None]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int | None) -> Any:
        self.asked.append((timeout_ms, max_records))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def lingering(linger_ms: int, max_records: int = 10) -> Any:
    polled = SimpleNamespace(batch_timeout_ms=500, max_records=max_records)
    linger(polled, linger_ms)
    return polled


async def test_a_short_fetch_lingers_and_takes_what_came_meanwhile_each_partition_in_order(
) -> None:
    consumer = ScriptedConsumer({"p0": ["a"], "p1": ["c"]}, {"p0": ["b"], "p2": ["d"]})
    assert await _long_poll_batch(lingering(5), consumer) == ("a", "b", "c", "d")
    assert consumer.asked == [(500, 10), (0, 8)]  # the second only for what is left


async def test_without_a_linger_or_with_a_full_batch_one_fetch_is_the_batch() -> None:
    for polled in (lingering(0), lingering(5, max_records=2)):
        consumer = ScriptedConsumer({"p0": ["a", "b"]}, {"p0": ["never"]})
        assert await _long_poll_batch(polled, consumer) == ("a", "b")
        assert len(consumer.asked) == 1


async def test_an_error_of_the_lingering_fetch_keeps_the_records_in_hand_and_comes_next(
) -> None:
    # aiokafka returns one partition's records and raises another's fetch error on the next
    # call; the records taken have moved the position, so losing them would skip them.
    polled = lingering(5)
    error = TopicAuthorizationFailedError("loss.events")
    consumer = ScriptedConsumer({"p0": ["a", "b"]}, error, {"p0": ["c"]}, {})
    assert await _long_poll_batch(polled, consumer) == ("a", "b")
    with pytest.raises(TopicAuthorizationFailedError):
        await _long_poll_batch(polled, consumer)
    assert len(consumer.asked) == 2  # the error came before any further fetch
    assert await _long_poll_batch(polled, consumer) == ("c",)
