"""Decisions on facts at least as new as the command: before a command batch runs, the
service's followers must have applied every event published to the topics they follow up to
that moment. A follower that is paused, lagging or cut off makes the wait run out, and the
commands are refused as `not_yet_consistent` (retryable) instead of decided on a stale copy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.kafka import client_options
from shared.progress import FollowerProgress
from shared.settings import CardDeskSettings

log = structlog.get_logger()


class FollowerBarrier:
    """Compares the end offsets of the followed topics with what the service's consumer group
    has committed, which it does only after the effects were committed in PostgreSQL."""

    def __init__(self, settings: CardDeskSettings, group: str, topics: Sequence[str], *,
                 timeout_s: float, poll_s: float = 0.02, recheck_s: float = 0.2,
                 progress: FollowerProgress | None = None) -> None:
        """`progress` is what this process's own followers have applied: the barrier waits
        on it, and asks Kafka (every `poll_s`) only for what it does not show, and about
        every partition still behind after `recheck_s`."""
        self.progress = progress or FollowerProgress()
        self.recheck_s = recheck_s
        self.settings = settings
        self.group = group
        self.topics = tuple(topics)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._offsets: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._partitions: list[TopicPartition] = []

    async def start(self) -> None:
        options = client_options(self.settings)
        self._offsets = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                         group_id=None, **options)
        await self._offsets.start()
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                          **options)
        await self._admin.start()

    async def stop(self) -> None:
        if self._offsets is not None:
            await self._offsets.stop()
        if self._admin is not None:
            await self._admin.close()

    async def caught_up(self) -> bool:
        """Wait (at most `timeout_s`) until the followers have committed past every event
        published before this call; False when the wait runs out or Kafka cannot tell."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            targets = await asyncio.wait_for(self._ends(), self.timeout_s)
            asked_at, rechecked_at = float("-inf"), loop.time()
            while behind := self.progress.behind(targets):
                now = loop.time()
                # Partitions this process's followers will not report (another instance's,
                # paused, or nothing applied since start) are asked of the group at once.
                ask = self.progress.unseen(behind) if now - asked_at >= self.poll_s else set()
                if now - rechecked_at >= self.recheck_s:
                    # A figure of its own may be left from an earlier assignment of the
                    # partition that another instance has since taken further: ask about all.
                    ask, rechecked_at = set(behind), now
                if ask:
                    # Bounded too: while the broker is away the admin client may look for the
                    # group's coordinator for ever, and a batch held here would keep its
                    # consumer from rejoining the group once the broker is back.
                    left = max(deadline - now, self.poll_s)
                    self.progress.known(await asyncio.wait_for(self._committed(ask), left))
                    asked_at = loop.time()
                    continue
                if now >= deadline:
                    log.warning("barrier.followers_behind", group=self.group,
                                behind={f"{tp.topic}/{tp.partition}": lag
                                        for tp, lag in behind.items()})
                    return False
                await self.progress.moved(min(self.poll_s, deadline - now))
            return True
        except Exception as exc:  # cannot tell: then the copy is not known to be current
            log.warning("barrier.unknown", group=self.group, error=type(exc).__name__)
            return False

    async def _ends(self) -> dict[TopicPartition, int]:
        assert self._offsets is not None and self._admin is not None, "not started"
        if not self._partitions:
            described = await self._admin.describe_topics(list(self.topics))
            self._partitions = [TopicPartition(topic["topic"], p["partition"])
                                for topic in described for p in topic["partitions"]]
            if len(self._partitions) == 0:
                raise LookupError(f"no partitions known for {self.topics}")
        ends: dict[TopicPartition, int] = await self._offsets.end_offsets(self._partitions)
        return {tp: end for tp, end in ends.items() if end > 0}

    async def _committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets of `partitions` (those it has committed)."""
        assert self._admin is not None, "the barrier has not started"
        committed = await self._admin.list_consumer_group_offsets(
            self.group, partitions=list(partitions))
        return {tp: done.offset for tp, done in committed.items()
                if done is not None and done.offset >= 0}
