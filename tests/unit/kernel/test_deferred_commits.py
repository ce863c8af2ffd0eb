"""Offset commits on a timer (shared/commits.py): what is committed, when, and what is kept
when a commit fails."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import CommitFailedError, KafkaConnectionError

from shared.commits import DeferredCommits, FlushOnRevoke

TOPIC = "loss.commands"


class FakeConsumer:
    """An aiokafka consumer as far as commits go: its assignment and what it committed."""

    def __init__(self, partitions: int = 3, *, topic_partitions: int | None = 3) -> None:
        """Assigned the first `partitions` of `TOPIC`'s `topic_partitions` (None: its
        metadata is not known yet)."""
        self.assigned = {TopicPartition(TOPIC, p) for p in range(partitions)}
        self.topic_partitions = topic_partitions
        self.commits: list[dict[TopicPartition, int]] = []
        self.failures: list[Exception] = []
        self.committed = asyncio.Event()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def subscription(self) -> frozenset[str]:
        return frozenset({TOPIC})

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        assert topic == TOPIC
        return None if self.topic_partitions is None else set(range(self.topic_partitions))

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.commits.append(dict(offsets))
        self.committed.set()


def records(partition: int, *offsets: int) -> dict[TopicPartition, int]:
    """A handled batch's end on `partition`, whose last record was at `offsets[-1]`."""
    return {TopicPartition(TOPIC, partition): max(offsets) + 1}


def tp(partition: int) -> TopicPartition:
    return TopicPartition(TOPIC, partition)


async def test_batches_handled_within_the_interval_are_committed_once_at_their_ends() -> None:
    commits, consumer = DeferredCommits(interval_s=0.05), FakeConsumer()
    await commits.handled(consumer, records(0, 3, 4) | records(1, 7))
    await commits.handled(consumer, records(0, 5))
    assert consumer.commits == []  # nothing yet: the timer has not run
    await asyncio.sleep(0.2)
    assert consumer.commits == [{tp(0): 6, tp(1): 8}]
    assert commits.owed(consumer) == {}


async def test_an_interval_of_zero_commits_every_batch_at_once() -> None:
    commits, consumer = DeferredCommits(interval_s=0), FakeConsumer()
    await commits.handled(consumer, records(2, 0, 1))
    await commits.handled(consumer, records(2, 2))
    assert consumer.commits == [{tp(2): 2}, {tp(2): 3}]


async def test_a_consumer_alone_in_its_group_commits_on_the_alone_timer() -> None:
    commits = DeferredCommits(interval_s=10, alone_interval_s=0.05)
    alone, sharing = FakeConsumer(3), FakeConsumer(2)  # the second holds 2 of the 3
    await commits.handled(alone, records(0, 1))
    await commits.handled(sharing, records(1, 4))
    await asyncio.sleep(0.3)
    assert alone.commits == [{tp(0): 2}]
    assert sharing.commits == [] and commits.owed(sharing) == {tp(1): 5}
    await commits.flush_all()


def test_the_interval_follows_the_assignment() -> None:
    commits = DeferredCommits(interval_s=0.1, alone_interval_s=1.0)
    consumer = FakeConsumer(3)
    assert commits.interval_for(consumer) == 1.0
    consumer.assigned.discard(tp(2))  # another instance joined and took one
    assert commits.interval_for(consumer) == 0.1
    assert commits.interval_for(FakeConsumer(0)) == 0.1  # nothing assigned yet
    assert commits.interval_for(FakeConsumer(3, topic_partitions=None)) == 0.1
    assert commits.interval_for(FakeConsumer(3, topic_partitions=4)) == 0.1  # grew
    # Without a longer interval for it, a consumer alone commits on the one interval.
    assert DeferredCommits(interval_s=0.1).interval_for(FakeConsumer(3)) == 0.1
    # Committing every batch at once holds for a consumer alone too.
    assert DeferredCommits(interval_s=0, alone_interval_s=1.0).interval_for(FakeConsumer()) == 0


async def test_a_revocation_commits_the_revoked_partitions_at_once_and_only_them() -> None:
    commits, consumer = DeferredCommits(interval_s=10), FakeConsumer()
    await commits.handled(consumer, records(0, 1) | records(1, 4))
    await FlushOnRevoke(commits, lambda: consumer).on_partitions_revoked({tp(1)})
    assert consumer.commits == [{tp(1): 5}]
    assert commits.owed(consumer) == {tp(0): 2}


async def test_partitions_the_consumer_no_longer_holds_are_not_committed() -> None:
    commits, consumer = DeferredCommits(interval_s=10), FakeConsumer()
    await commits.handled(consumer, records(0, 1) | records(1, 4))
    consumer.assigned.discard(tp(1))  # taken by another instance: it applies them again
    await commits.flush(consumer)
    assert consumer.commits == [{tp(0): 2}]
    assert commits.owed(consumer) == {}


@pytest.mark.parametrize("error", [CommitFailedError("rebalanced"), KafkaConnectionError()])
async def test_a_commit_that_fails_is_owed_again_and_never_moves_backwards(
    error: Exception,
) -> None:
    commits, consumer = DeferredCommits(interval_s=10), FakeConsumer()
    await commits.handled(consumer, records(0, 1, 2))
    consumer.failures.append(error)
    await commits.flush(consumer)
    assert consumer.commits == [] and commits.owed(consumer) == {tp(0): 3}
    await commits.handled(consumer, records(0, 3))
    await commits.flush(consumer)
    assert consumer.commits == [{tp(0): 4}]


async def test_shutting_down_commits_what_every_consumer_owes() -> None:
    commits = DeferredCommits(interval_s=10)
    first, second = FakeConsumer(), FakeConsumer()
    await commits.handled(first, records(0, 1))
    await commits.handled(second, records(2, 9))
    await commits.flush_all()
    assert (first.commits, second.commits) == ([{tp(0): 2}], [{tp(2): 10}])


async def test_a_commit_the_broker_never_answers_is_given_up_and_owed_again() -> None:
    class Unanswered(FakeConsumer):
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            await asyncio.Event().wait()  # no coordinator: aiokafka keeps looking

    commits, consumer = DeferredCommits(interval_s=10, timeout_s=0.05), Unanswered()
    await commits.handled(consumer, records(1, 4))
    await asyncio.wait_for(commits.flush_all(), 1.0)  # a shutdown is not held up
    assert commits.owed(consumer) == {tp(1): 5}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_an_owed_commit_is_retried_on_its_own_timer_without_another_batch() -> None:
    commits = DeferredCommits(interval_s=0.01, retry_s=0.05)
    consumer = FakeConsumer()
    consumer.failures.append(KafkaConnectionError())
    await commits.handled(consumer, records(0, 6))  # and no batch after it
    # A bound for a loaded machine, not a speed figure.
    try:
        await asyncio.wait_for(consumer.committed.wait(), 5.0)
    except TimeoutError:
        pytest.fail(f"no commit within 5 s: failures left {consumer.failures}, "
                    f"owed {commits.owed(consumer)}")
    assert consumer.failures == []  # the first try failed
    assert consumer.commits == [{tp(0): 7}] and commits.owed(consumer) == {}


async def test_commits_failing_are_timed_from_the_first_failure_until_one_succeeds() -> None:
    clock = Clock()
    commits, consumer = DeferredCommits(interval_s=10, clock=clock), FakeConsumer()
    await commits.handled(consumer, records(0, 1))
    assert commits.failing_since(consumer) is None
    consumer.failures.extend([CommitFailedError("rebalanced"), KafkaConnectionError()])
    await commits.flush(consumer)
    clock.now += 7
    await commits.flush(consumer)
    assert commits.failing_since(consumer) == 1_000.0  # the second failure does not restart it
    await commits.flush(consumer)
    assert consumer.commits == [{tp(0): 2}] and commits.failing_since(consumer) is None
    await commits.flush_all()


async def test_nothing_owed_any_more_is_nothing_failing() -> None:
    commits, consumer = DeferredCommits(interval_s=10), FakeConsumer()
    await commits.handled(consumer, records(1, 4))
    consumer.failures.append(KafkaConnectionError())
    await commits.flush(consumer)
    assert commits.failing_since(consumer) is not None
    consumer.assigned.discard(tp(1))  # revoked: its next owner applies the records again
    await commits.flush(consumer)
    assert commits.owed(consumer) == {} and commits.failing_since(consumer) is None
    await commits.flush_all()


async def test_a_shutdown_commits_every_consumer_at_once_not_each_in_turn() -> None:
    """Each unanswered commit is bounded; in turn, five would hold a shutdown five bounds."""
    waiting: list[FakeConsumer] = []
    most_at_once = 0

    class Unanswered(FakeConsumer):
        async def commit(self, offsets: dict[TopicPartition, int]) -> None:
            nonlocal most_at_once
            waiting.append(self)
            most_at_once = max(most_at_once, len(waiting))
            try:
                await asyncio.Event().wait()
            finally:
                waiting.remove(self)

    commits = DeferredCommits(interval_s=10, timeout_s=0.05)
    consumers = [Unanswered() for _ in range(5)]
    for consumer in consumers:
        await commits.handled(consumer, records(0, 1))
    try:
        await asyncio.wait_for(commits.flush_all(), 2.0)
    except TimeoutError:
        pytest.fail(f"shutdown held past 2 s: {len(waiting)} commits still waiting, "
                    f"at most {most_at_once} at once")
    assert most_at_once == len(consumers)
    assert all(commits.owed(consumer) == {tp(0): 2} for consumer in consumers)
