"""The barrier waits on what this process's followers applied, and asks Kafka's group only
for what they have not shown."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from shared.barrier import FollowerBarrier
from shared.metrics import REGISTRY
from shared.progress import FollowerProgress
from shared.settings import CardDeskSettings
from tests.unit.kernel.kafka_fake import TOPIC, FakeKafka

P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


def scripted(ends: dict[TopicPartition, int], committed: dict[TopicPartition, int],
             progress: FollowerProgress, timeout_s: float = 1.0,
             group: str = "carddesk-review") -> tuple[FollowerBarrier, FakeKafka]:
    """A barrier on a Kafka with these end offsets and group commits; the fake records the
    partitions each committed-offsets lookup asked about (`fetched`)."""
    kafka = FakeKafka(partitions=len(ends), latency_s=0)
    kafka.ends, kafka.committed = dict(ends), dict(committed)
    barrier = FollowerBarrier(CardDeskSettings(), group, [TOPIC],
                              timeout_s=timeout_s, poll_s=0.05, progress=progress,
                              offsets=kafka, admin=kafka)
    return barrier, kafka


async def test_followers_of_this_process_that_applied_everything_need_no_lookup() -> None:
    progress = FollowerProgress()
    progress.applied("loss.events", 0, 5)
    progress.applied("loss.events", 1, 3)
    barrier, kafka = scripted({P0: 5, P1: 3}, {}, progress)
    assert await barrier.caught_up() is True
    assert kafka.fetched == []


async def test_only_the_partitions_this_process_has_not_seen_are_asked_of_the_group() -> None:
    progress = FollowerProgress()
    progress.applied("loss.events", 0, 5)
    barrier, kafka = scripted({P0: 5, P1: 3}, {P1: 3}, progress)  # P1: another instance's
    assert await barrier.caught_up() is True
    assert kafka.fetched == [{P1}]


async def test_a_waiting_batch_goes_on_the_moment_its_follower_applies() -> None:
    progress = FollowerProgress()
    progress.applied("loss.events", 0, 4)
    barrier, _ = scripted({P0: 5}, {P0: 4}, progress, timeout_s=5.0)
    waiting = asyncio.create_task(barrier.caught_up())
    await asyncio.sleep(0.2)
    assert not waiting.done()
    progress.applied("loss.events", 0, 5)
    assert await asyncio.wait_for(waiting, 1.0) is True


async def test_a_follower_that_never_catches_up_runs_the_wait_out() -> None:
    progress = FollowerProgress()
    barrier, kafka = scripted({P0: 5}, {P0: 2}, progress, timeout_s=0.3)
    assert await asyncio.wait_for(barrier.caught_up(), 5.0) is False
    assert len(kafka.fetched) >= 2  # the group is asked again while it waits


async def test_a_partition_this_process_consumes_is_waited_on_not_asked_about() -> None:
    progress = FollowerProgress()
    progress.consumer(lambda: {P0})
    progress.applied("loss.events", 0, 4)
    barrier, kafka = scripted({P0: 5}, {P0: 4}, progress, timeout_s=5.0)
    waiting = asyncio.create_task(barrier.caught_up())
    await asyncio.sleep(0.12)  # two poll intervals, within the recheck
    progress.applied("loss.events", 0, 5)
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert kafka.fetched == []


async def test_a_partition_of_its_own_without_a_figure_yet_is_asked_about_once() -> None:
    progress = FollowerProgress()
    progress.consumer(lambda: {P0, P1})
    progress.applied("loss.events", 0, 5)
    barrier, kafka = scripted({P0: 5, P1: 3}, {P1: 3}, progress)  # P1: applied before a restart
    assert await barrier.caught_up() is True
    assert kafka.fetched == [{P1}]
    assert await barrier.caught_up() is True
    assert kafka.fetched == [{P1}]


async def test_a_partition_that_moved_to_another_instance_is_asked_about_again() -> None:
    progress = FollowerProgress()
    assigned = {P0}
    progress.consumer(lambda: assigned)
    progress.applied("loss.events", 0, 4)
    barrier, kafka = scripted({P0: 5}, {P0: 4}, progress, timeout_s=5.0)
    waiting = asyncio.create_task(barrier.caught_up())
    await asyncio.sleep(0.1)
    assert kafka.fetched == []
    assigned = set()  # revoked: the other instance applies it and commits
    kafka.committed = {P0: 5}
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert kafka.fetched == [{P0}]


async def test_a_figure_left_from_an_earlier_assignment_is_rechecked_with_the_group() -> None:
    # The partition was this process's, went to another instance that applied further and
    # committed, and came back: the follower has nothing left to apply, so it never moves.
    progress = FollowerProgress()
    progress.consumer(lambda: {P0})
    progress.applied("loss.events", 0, 4)
    barrier, kafka = scripted({P0: 9}, {P0: 9}, progress, timeout_s=5.0)
    assert await asyncio.wait_for(barrier.caught_up(), 2.0) is True
    assert kafka.fetched == [{P0}]


def observed(group: str, status: str) -> tuple[float, float]:
    """How many waits `carddesk_barrier_wait_seconds` holds for `group` and `status`, and
    their sum of seconds."""
    labels = {"group": group, "status": status}
    count = REGISTRY.get_sample_value("carddesk_barrier_wait_seconds_count", labels) or 0.0
    total = REGISTRY.get_sample_value("carddesk_barrier_wait_seconds_sum", labels) or 0.0
    return count, total


async def test_each_wait_is_observed_with_its_status_and_length() -> None:
    progress = FollowerProgress()
    progress.applied("loss.events", 0, 4)
    barrier, _ = scripted({P0: 5}, {P0: 4}, progress, timeout_s=5.0,
                          group="carddesk-barrier-metric")
    waiting = asyncio.create_task(barrier.caught_up())
    await asyncio.sleep(0.2)
    progress.applied("loss.events", 0, 5)
    assert await asyncio.wait_for(waiting, 1.0) is True
    count, seconds = observed("carddesk-barrier-metric", "caught_up")
    assert count == 1 and 0.2 <= seconds < 1.2

    stalled, _ = scripted({P0: 5}, {P0: 2}, FollowerProgress(), timeout_s=0.2,
                          group="carddesk-barrier-metric")
    assert await asyncio.wait_for(stalled.caught_up(), 5.0) is False
    count, seconds = observed("carddesk-barrier-metric", "behind")
    assert count == 1 and seconds >= 0.2
