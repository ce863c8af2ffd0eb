"""Decisions on facts at least as new as the command: before a command batch runs, the
service's followers must have applied every event published to the topics they follow up to
that moment. A follower that is paused, lagging or cut off makes the wait run out, and the
commands are refused as `not_yet_consistent` (retryable) instead of decided on a stale copy.

Kafka's work is per request, and a service checks the barrier once per command batch of each
partition, concurrently: the checks share their end-offsets reads (`SharedRead`: one
`ListOffsets` in flight at a time, serving every check that asked before it started), and the
group's coordinator is looked up once, not before every `OffsetFetch`, and again only after
it failed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, Literal, Protocol, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.kafka import client_options
from shared.metrics import BARRIER_WAIT
from shared.progress import FollowerProgress
from shared.settings import CardDeskSettings

log = structlog.get_logger()

T = TypeVar("T")

# How a wait ended: the `status` label of `carddesk_barrier_wait_seconds`.
WaitStatus = Literal["caught_up", "behind", "unknown"]


class EndOffsets(Protocol):
    """What the barrier asks of a consumer: the end offsets (`ListOffsets`)."""

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        ...


class GroupAdmin(Protocol):
    """What the barrier asks of the admin client (aiokafka's `AIOKafkaAdminClient`)."""

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]: ...

    async def find_coordinator(self, group_id: str) -> int: ...

    async def list_consumer_group_offsets(
        self, group_id: str, group_coordinator_id: int | None = None,
        partitions: list[TopicPartition] | None = None) -> Mapping[TopicPartition, Any]: ...


class CoordinatorMovedError(Exception):
    """The group's coordinator did not answer for the group (moved, loading, restarted)."""


class SharedRead(Generic[T]):
    """Concurrent callers of `get` share one read: one runs at a time, and a caller gets the
    result of a read that STARTED after it asked, never of an older one (that one may have
    been answered before what the caller must see). Callers who ask while a read runs share
    the next. Each read is cut at `bound_s`, so none is left hanging once its callers gave
    up; a caller's own timeout leaves the read running for the others."""

    def __init__(self, read: Callable[[], Awaitable[T]], *, bound_s: float) -> None:
        self._read = read
        self._bound_s = bound_s
        self._running: asyncio.Task[T] | None = None
        self._next: asyncio.Task[T] | None = None

    async def get(self) -> T:
        if self._running is None:
            self._running = self._spawn(self._bounded())
            task = self._running
        else:
            if self._next is None:
                self._next = self._spawn(self._after(self._running))
            task = self._next
        return await asyncio.shield(task)

    def cancel(self) -> None:
        for task in (self._running, self._next):
            if task is not None:
                task.cancel()

    def _spawn(self, read: Awaitable[T]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(read)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[T]) -> None:
        if task is self._running:
            self._running, self._next = self._next, None
        if not task.cancelled():
            task.exception()  # its callers may all have given up: retrieved here, not lost

    async def _after(self, previous: asyncio.Task[T]) -> T:
        await asyncio.wait({previous})
        return await self._bounded()

    async def _bounded(self) -> T:
        return await asyncio.wait_for(self._read(), self._bound_s)


class FollowerBarrier:
    """Compares the end offsets of the followed topics with what the service's consumer group
    has committed, which it does only after the effects were committed in PostgreSQL."""

    def __init__(self, settings: CardDeskSettings, group: str, topics: Sequence[str], *,
                 timeout_s: float, poll_s: float = 0.02, recheck_s: float = 0.2,
                 progress: FollowerProgress | None = None, offsets: EndOffsets | None = None,
                 admin: GroupAdmin | None = None) -> None:
        """`progress` is what this process's own followers have applied: the barrier waits
        on it, and asks Kafka (every `poll_s`) only for what it does not show, and about
        every partition still behind after `recheck_s`. `offsets` and `admin` stand in for
        the Kafka clients `start` would create."""
        self.progress = progress or FollowerProgress()
        self.recheck_s = recheck_s
        self.settings = settings
        self.group = group
        self.topics = tuple(topics)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self._offsets = offsets
        self._admin = admin
        self._owned: list[AIOKafkaConsumer | AIOKafkaAdminClient] = []
        self._partitions: list[TopicPartition] = []
        self._coordinator: int | None = None
        self._shared_ends = SharedRead(self._read_ends, bound_s=timeout_s)

    async def start(self) -> None:
        options = client_options(self.settings)
        if self._offsets is None:
            offsets = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                       group_id=None, **options)
            await offsets.start()
            self._offsets = offsets
            self._owned.append(offsets)
        if self._admin is None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                        **options)
            await admin.start()
            self._admin = admin
            self._owned.append(admin)

    async def stop(self) -> None:
        self._shared_ends.cancel()
        for client in self._owned:
            if isinstance(client, AIOKafkaConsumer):
                await client.stop()
            else:
                await client.close()

    async def caught_up(self) -> bool:
        """Wait (at most `timeout_s`) until the followers have committed past every event
        published before this call; False when the wait runs out or Kafka cannot tell. The
        wait is observed in `carddesk_barrier_wait_seconds`, by its status."""
        started = time.monotonic()
        status = await self._wait()
        BARRIER_WAIT.labels(self.group, status).observe(time.monotonic() - started)
        return status == "caught_up"

    async def _wait(self) -> WaitStatus:
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
                    return "behind"
                await self.progress.moved(min(self.poll_s, deadline - now))
            return "caught_up"
        except Exception as exc:  # cannot tell: then the copy is not known to be current
            log.warning("barrier.unknown", group=self.group, error=type(exc).__name__)
            return "unknown"

    async def _ends(self) -> dict[TopicPartition, int]:
        """The end offsets of the followed partitions, from a read that started after this
        call (shared with the checks that asked at the same time)."""
        ends = await self._shared_ends.get()
        return {tp: end for tp, end in ends.items() if end > 0}

    async def _read_ends(self) -> dict[TopicPartition, int]:
        assert self._offsets is not None and self._admin is not None, "not started"
        if not self._partitions:
            described = await self._admin.describe_topics(list(self.topics))
            partitions = [TopicPartition(topic["topic"], p["partition"])
                          for topic in described for p in topic["partitions"]]
            if not partitions:
                raise LookupError(f"no partitions known for {self.topics}")
            self._partitions = partitions
        return await self._offsets.end_offsets(self._partitions)

    async def _committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offsets of `partitions` (those it has committed); a
        coordinator known from before that fails is looked up afresh and asked once more."""
        asked = list(partitions)
        cached = self._coordinator is not None
        try:
            return await self._committed_at_coordinator(asked)
        except Exception:
            if not cached:
                raise
            return await self._committed_at_coordinator(asked)

    async def _committed_at_coordinator(
            self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        assert self._admin is not None, "the barrier has not started"
        try:
            if self._coordinator is None:
                self._coordinator = await self._admin.find_coordinator(self.group)
            committed = await self._admin.list_consumer_group_offsets(
                self.group, group_coordinator_id=self._coordinator, partitions=partitions)
            # A coordinator's error for the whole group (not the coordinator, loading) comes
            # back from aiokafka as an answer without the partitions asked for.
            if any(tp not in committed for tp in partitions):
                raise CoordinatorMovedError(self.group)
        except BaseException:
            self._coordinator = None
            raise
        return {tp: done.offset for tp, done in committed.items()
                if done is not None and done.offset >= 0}
