"""Offset commits on a timer instead of one per batch.

An acknowledged batch (`shared.kafka.BatchEndsCommit`) used to send its `OffsetCommit` at
once, and the consumer waited for it before its next fetch: a request (and a write to
`__consumer_offsets`) for every fetch of every consumer, and about 8 ms on every hop of a
command at 200 commands/s. Here an acknowledged batch only notes where each of its
partitions ends; the notes are committed `interval` later, together with those of the
batches handled meanwhile, and at once for partitions being revoked and when the process
shuts down. A commit that fails is owed again; if a later one for the same partition
succeeded meanwhile, the retry may set the partition back to the earlier end, which only
redelivers records the consumers take idempotently. An owed commit is retried on its own
timer, not only with the next batch, and how long a consumer's commits have failed without a
success in between is kept for its health check (`shared.health.ConsumerWatch`): a consumer
that fetches and handles but can no longer commit (a group coordinator it lost track of)
would otherwise look healthy while its group's lag grows for ever.

What is committed is always the end of a batch that was handled for good (its transaction
committed), never a position the consumer merely fetched: a crash loses at most the last
`interval` of commits, and the records after the committed offsets are delivered again,
which every consumer here takes idempotently (processed rows, stored replies). A batch that
failed is not acknowledged (FastStream rewinds its partitions), so nothing past it is noted.

A consumer that holds every partition of its topics commits on a longer timer
(`alone_interval_s`). The short one is for the follower barriers of the service's other
instances (`shared.barrier`), which read the group's committed offsets for the partitions
they do not hold; a consumer alone in its group has no such reader, and its own barrier
reads what it applied in this process (`shared.progress`). Below saturation most of a
command's offset commits were those timers: at about 125 commands/s a 1 s timer wrote 0.57
records to `__consumer_offsets` per command against 1.9, and the broker used 15% less CPU per
command (README, Performance). A second instance joining takes partitions away in a
rebalance, which commits what is owed for them first (`FlushOnRevoke`), and the next timer
is the short one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

log = structlog.get_logger()


class DeferredCommits:
    """Per consumer, the offsets its handled batches end at, committed on a timer."""

    def __init__(self, interval_s: float = 0.1, timeout_s: float = 5.0, retry_s: float = 1.0,
                 clock: Callable[[], float] = time.time, *,
                 alone_interval_s: float | None = None) -> None:
        """`interval_s` 0 commits every batch at once, as FastStream does;
        `alone_interval_s` is the interval of a consumer holding every partition of its
        topics (None: `interval_s` as well). A commit is given up after `timeout_s`
        (aiokafka looks for the group's coordinator for as long as the broker is away, and a
        shutdown must not wait for it) and owed again, retried `retry_s` later if no batch
        comes first."""
        self.interval_s = interval_s
        self.alone_interval_s = alone_interval_s
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.clock = clock
        self._pending: dict[Any, dict[TopicPartition, int]] = {}
        self._timers: dict[Any, asyncio.Task[None]] = {}
        self._failing_since: dict[Any, float] = {}
        self._closing = False

    async def handled(self, consumer: Any, ends: Mapping[TopicPartition, int]) -> None:
        """Note that `consumer` has handled its partitions up to `ends` (each the offset after
        a handled batch's last record there)."""
        self._owe(consumer, ends)
        if consumer in self._timers:
            return  # its timer commits these with the rest
        interval_s = self.interval_for(consumer)
        if interval_s <= 0:
            await self.flush(consumer)
        else:
            self._schedule(consumer, interval_s)

    def interval_for(self, consumer: Any) -> float:
        """How long after a handled batch `consumer`'s offsets are committed (an interval of
        0 commits every batch at once, alone or not)."""
        if (self.interval_s > 0 and self.alone_interval_s is not None
                and holds_every_partition(consumer)):
            return self.alone_interval_s
        return self.interval_s

    def owed(self, consumer: Any) -> dict[TopicPartition, int]:
        """What `consumer` has handled and not committed yet."""
        return dict(self._pending.get(consumer, {}))

    def failing_since(self, consumer: Any) -> float | None:
        """When `consumer`'s commits began to fail, with none succeeding since; None while
        they succeed (or none was tried)."""
        return self._failing_since.get(consumer)

    async def flush(self, consumer: Any,
                    partitions: Collection[TopicPartition] | None = None) -> None:
        """Commit what `consumer` owes now (for `partitions` only, if given). Partitions it
        no longer holds are dropped: their next owner applies those records again. A
        commit that fails is owed again, for the next flush."""
        pending = self._pending.get(consumer, {})
        chosen = {tp: end for tp, end in pending.items()
                  if partitions is None or tp in partitions}
        for tp in chosen:
            del pending[tp]
        if not pending:
            self._pending.pop(consumer, None)
        assigned = consumer.assignment()
        offsets = {tp: end for tp, end in chosen.items() if tp in assigned}
        if not offsets:
            if consumer not in self._pending:  # nothing owed: nothing is failing either
                self._failing_since.pop(consumer, None)
            return
        try:
            await asyncio.wait_for(consumer.commit(offsets), self.timeout_s)
        except (KafkaError, IllegalStateError, TimeoutError) as exc:
            since = self._failing_since.setdefault(consumer, self.clock())
            log.info("consumer.commit_failed", error=type(exc).__name__,
                     partitions=len(offsets), timeout_s=self.timeout_s,
                     failing_s=round(self.clock() - since, 1))
            self._owe(consumer, offsets)
            if not self._closing:
                self._schedule(consumer, max(self.interval_s, self.retry_s))
        else:
            self._failing_since.pop(consumer, None)

    def _owe(self, consumer: Any, ends: Mapping[TopicPartition, int]) -> None:
        pending = self._pending.setdefault(consumer, {})
        for tp, end in ends.items():
            pending[tp] = max(pending.get(tp, 0), end)

    async def flush_all(self) -> None:
        """Commit what every consumer owes (the process is shutting down), all at once: a
        shutdown waits `timeout_s` at most, not that for each consumer."""
        self._closing = True
        for timer in list(self._timers.values()):
            timer.cancel()
        # An exception is a stopped consumer: its records are redelivered later.
        await asyncio.gather(*(self.flush(consumer) for consumer in list(self._pending)),
                             return_exceptions=True)

    def _schedule(self, consumer: Any, delay_s: float) -> None:
        if consumer not in self._timers:
            self._timers[consumer] = asyncio.create_task(self._later(consumer, delay_s))

    async def _later(self, consumer: Any, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._timers.pop(consumer, None)
        await self.flush(consumer)


def holds_every_partition(consumer: Any) -> bool:
    """Whether `consumer` (aiokafka's) is assigned every partition of every topic it
    subscribes to, as far as its metadata knows: then no other member of its group holds one."""
    assigned = consumer.assignment()
    topics = consumer.subscription()
    if not assigned or not topics:
        return False
    for topic in topics:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions or any(TopicPartition(topic, p) not in assigned for p in partitions):
            return False
    return True


class FlushOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Commits what a consumer owes for the partitions a rebalance takes from it, before
    they go (aiokafka calls this before the group rejoins)."""

    def __init__(self, commits: DeferredCommits, consumer: Any) -> None:
        self.commits = commits
        self.consumer = consumer  # () -> the running aiokafka consumer, or None

    async def on_partitions_revoked(self, revoked: Collection[TopicPartition]) -> None:
        consumer = self.consumer()
        if consumer is not None:
            await self.commits.flush(consumer, set(revoked))

    async def on_partitions_assigned(self, assigned: Collection[TopicPartition]) -> None:
        pass


# One per process (a service process runs one runtime; `ServiceRuntime` sets its interval).
COMMITS = DeferredCommits()
