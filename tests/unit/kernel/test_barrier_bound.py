"""The follower barrier never holds a command batch past its bound, whatever Kafka does."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from aiokafka import TopicPartition

from shared.barrier import FollowerBarrier
from shared.settings import CardDeskSettings
from tests.unit.kernel.kafka_fake import TOPIC, FakeKafka


class CoordinatorLost(FollowerBarrier):
    """End offsets answer; the committed-offsets lookup never does (a broker gone away)."""

    async def _ends(self) -> dict[TopicPartition, int]:
        return {TopicPartition("loss.events", 0): 5}

    async def _committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_committed_offsets_lookup_that_never_answers_is_cut_at_the_bound() -> None:
    barrier = CoordinatorLost(CardDeskSettings(), "carddesk-review", ["loss.events"],
                              timeout_s=0.2)
    started = time.monotonic()
    caught_up = await asyncio.wait_for(barrier.caught_up(), 5)
    assert caught_up is False
    assert time.monotonic() - started < 2


async def test_a_coordinator_lookup_that_never_answers_is_cut_and_tried_again_later() -> None:
    kafka = FakeKafka()
    kafka.gates["FindCoordinator"] = asyncio.Event()  # a broker gone away
    barrier = FollowerBarrier(CardDeskSettings(), "carddesk-review", [TOPIC], timeout_s=0.2,
                              offsets=kafka, admin=kafka)
    started = time.monotonic()
    assert await asyncio.wait_for(barrier.caught_up(), 5) is False
    assert time.monotonic() - started < 2
    del kafka.gates["FindCoordinator"]  # the broker is back
    assert await asyncio.wait_for(barrier.caught_up(), 5) is True
    await barrier.stop()
