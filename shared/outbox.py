"""Transactional outbox: messages are queued in the writer's transaction and a relay
publishes them to Kafka in order, marking them sent only after Kafka acknowledged them.
Sent rows are purged once they are older than the retention; unsent rows never are."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from shared.kafka import client_options
from shared.metrics import EVENTS_PUBLISHED, REPLIES_PUBLISHED
from shared.settings import CardDeskSettings

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def notify_channel(schema: str) -> str:
    return f"{schema}_outbox"


def outbox_columns(
    messages: Sequence[OutboxMessage],
) -> tuple[list[str], list[bytes | None], list[bytes], list[str]]:
    """The outbox rows as column arrays, for one `unnest` insert."""
    return (
        [m.topic for m in messages],
        [m.key for m in messages],
        [m.value for m in messages],
        [json.dumps([[k, v.decode("latin-1")] for k, v in m.headers]) for m in messages],
    )


def outbox_insert(schema: str, first: int) -> str:
    """`INSERT … SELECT` of the rows `outbox_columns` gives, passed as parameters
    `$first`…`$first+3`; statements that queue messages embed it (a WHERE may follow)."""
    return (f"INSERT INTO {schema}.outbox (topic, key, value, headers)"
            f" SELECT * FROM unnest(${first}::text[], ${first + 1}::bytea[],"
            f" ${first + 2}::bytea[], ${first + 3}::jsonb[])")


def make_producer(settings: CardDeskSettings) -> AIOKafkaProducer:
    """Idempotent, fully acknowledged, ordered per partition even when retried; it
    authenticates with the process's Kafka credentials."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        **client_options(settings),
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
    )


class OutboxRelay:
    """Publishes a schema's outbox in position order.

    An advisory lock makes one relay per schema active at a time, so per-key order holds
    even with several replicas. A crash between Kafka's acknowledgement and the `sent_at`
    update republishes the batch: consumers drop the duplicates by message id.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        producer: AIOKafkaProducer,
        schema: str,
        *,
        batch_size: int = 500,
        poll_interval: float = 0.1,
        retention: timedelta = timedelta(hours=24),
        purge_interval: float = 60.0,
        purge_batch: int = 10_000,
    ) -> None:
        self.pool = pool
        self.producer = producer
        self.schema = schema
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.retention = retention
        self.purge_interval = purge_interval
        self.purge_batch = purge_batch
        self._purged_at = float("-inf")
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    async def publish_pending(self, conn: asyncpg.Connection) -> int:
        """Publish one batch; return how many messages were sent.

        The batch's events are acknowledged by Kafka before any of its replies is sent. A
        reply sent with them could be appended first (another partition, another topic),
        and a channel that acts on an accepted reply could then send its next command
        before the events behind the reply were in Kafka: that service's barrier, which
        waits for the followed events published before the command, would not wait for
        them, and the command would be decided on facts without them (a card not yet known,
        an application not yet pending). A transaction writes its events before its reply,
        so a batch that ends between them has sent the events already."""
        rows = await conn.fetch(
            f"SELECT position, topic, key, value, headers FROM {self.schema}.outbox"
            " WHERE sent_at IS NULL ORDER BY position LIMIT $1",
            self.batch_size,
        )
        if not rows:
            return 0
        events: list[tuple[asyncpg.Record, list[tuple[str, bytes]]]] = []
        replies: list[tuple[asyncpg.Record, list[tuple[str, bytes]]]] = []
        event_types: list[str] = []
        for r in rows:
            headers = [(k, v.encode("latin-1")) for k, v in json.loads(r["headers"])]
            types = [v.decode("latin-1") for k, v in headers if k == "event-type"]
            event_types.extend(types)
            (events if types else replies).append((r, headers))
        for part in (events, replies):
            await asyncio.gather(*[
                await self.producer.send(r["topic"], value=r["value"], key=r["key"],
                                         headers=headers)
                for r, headers in part])
        await conn.execute(
            f"UPDATE {self.schema}.outbox SET sent_at = now() WHERE position = ANY($1::bigint[])",
            [r["position"] for r in rows],
        )
        self._count(len(rows), event_types)
        return len(rows)

    def _count(self, sent: int, event_types: list[str]) -> None:
        """Published events by type; every other row the relay sends is a reply."""
        by_type: dict[str, int] = {}
        for event_type in event_types:
            by_type[event_type] = by_type.get(event_type, 0) + 1
        for event_type, count in by_type.items():
            EVENTS_PUBLISHED.labels(self.schema, event_type).inc(count)
        if sent > len(event_types):
            REPLIES_PUBLISHED.labels(self.schema).inc(sent - len(event_types))

    async def purge_sent(self, conn: asyncpg.Connection) -> int:
        """Delete rows sent longer ago than the retention, a bounded batch at a time from the
        oldest; return how many went. The relay publishes in position order, so the rows to
        purge are a prefix: a batch that meets a younger (or unsent) row is the last, and a
        purge with nothing to do reads one batch of the primary key, not the table."""
        self._purged_at = time.monotonic()
        purged = 0
        while True:
            deleted: int = await conn.fetchval(
                f"WITH head AS (SELECT position, sent_at FROM {self.schema}.outbox"
                "  ORDER BY position LIMIT $2),"
                f" gone AS (DELETE FROM {self.schema}.outbox AS o USING head"
                "  WHERE o.position = head.position AND head.sent_at < now() - $1::interval"
                "  RETURNING 1)"
                " SELECT count(*) FROM gone",
                self.retention, self.purge_batch)
            purged += deleted
            if deleted < self.purge_batch:
                break
        if purged:
            log.info("outbox.purged", schema=self.schema, count=purged)
        return purged

    async def run(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.add_listener(notify_channel(self.schema), self._on_notify)
            try:
                while not self._stopping.is_set():
                    locked = await conn.fetchval(
                        "SELECT pg_try_advisory_lock(hashtext($1))", notify_channel(self.schema)
                    )
                    if locked:
                        break
                    await self._sleep()
                while not self._stopping.is_set():
                    sent = await self.publish_pending(conn)
                    if sent:
                        log.debug("outbox.published", schema=self.schema, count=sent)
                    if time.monotonic() - self._purged_at >= self.purge_interval:
                        await self.purge_sent(conn)
                    if sent < self.batch_size:
                        await self._sleep()
            finally:
                await conn.remove_listener(notify_channel(self.schema), self._on_notify)
                await conn.execute("SELECT pg_advisory_unlock_all()")

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _sleep(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        self._wake.clear()
