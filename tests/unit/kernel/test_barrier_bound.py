"""The follower barrier never holds a command batch past its bound, whatever Kafka does."""

from __future__ import annotations

import asyncio
import time

from shared.barrier import FollowerBarrier
from shared.settings import CardDeskSettings
from tests.unit.kernel.kafka_fake import TOPIC, FakeKafka


async def test_a_committed_offsets_lookup_that_never_answers_is_cut_at_the_bound() -> None:
    kafka = FakeKafka()  # end offsets answer; the committed-offsets lookup never does
    kafka.gates["OffsetFetch"] = asyncio.Event()
    barrier = FollowerBarrier(CardDeskSettings(), "carddesk-review", [TOPIC], timeout_s=0.2,
                              offsets=kafka, admin=kafka)
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
