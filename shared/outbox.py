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
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer

from shared.kafka import client_options
from shared.metrics import EVENTS_PUBLISHED, REPLIES_PUBLISHED
from shared.purge import delete_in_batches
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
    authenticates with the process's Kafka credentials.

    No linger: the relay queues a round's rows before the sender runs, and what is queued
    while a request is in flight goes in the next one (one request per broker at a time).
    With a linger, each partition's batch waited out its own, so a round left in several
    requests and reached every consumer in smaller batches (README, "What the targets ask
    of a command")."""
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        **client_options(settings),
        enable_idempotence=True,
        acks="all",
        linger_ms=0,
        max_batch_size=256 * 1024,
    )


@dataclass(frozen=True, slots=True)
class Outgoing:
    """An outbox row on its way to Kafka."""

    position: int
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    event_type: str | None  # None for a reply

    @property
    def is_reply(self) -> bool:
        return self.event_type is None

    @classmethod
    def of(cls, row: Any) -> Outgoing:
        headers = [(k, v.encode("latin-1")) for k, v in json.loads(row["headers"])]
        event_type = next((v.decode("latin-1") for k, v in headers if k == "event-type"), None)
        return cls(row["position"], row["topic"], row["key"], row["value"], headers,
                   event_type)


@dataclass(frozen=True, slots=True)
class InFlight:
    """Replies sent and not yet acknowledged."""

    sent: list[Outgoing]
    futures: list[asyncio.Future[Any]]


def delete_sent_sql(schema: str, where: str = "TRUE") -> str:
    """A `delete_in_batches` statement over the outbox rows that meet `where` (a condition
    on the row alone), taken in position order: of the next `$2` of them, those sent over
    `$1` ago. The relay sends in position order, so the rows due are the first ones and a
    batch short of `$2` deleted is the last. When the first such row was sent within `$1`,
    no later one is older, and nothing but that row is read."""
    return (f"DELETE FROM {schema}.outbox AS o USING"
            f"  (SELECT position, sent_at FROM {schema}.outbox WHERE ({where})"
            f"   AND (SELECT f.sent_at IS NULL OR f.sent_at < now() - $1::interval"
            f"        FROM {schema}.outbox f WHERE ({where}) ORDER BY f.position LIMIT 1)"
            "   ORDER BY position LIMIT $2) AS head"
            "  WHERE o.position = head.position AND head.sent_at < now() - $1::interval")


# How long a stopping relay waits for its cancelled purge to end.
PURGE_STOP_TIMEOUT_S = 10.0


class OutboxRelay:
    """Publishes a schema's outbox in position order.

    An advisory lock makes one relay per schema active at a time, so per-key order holds
    even with several replicas. A crash between Kafka's acknowledgement and the `sent_at`
    update republishes the batch: consumers drop the duplicates by message id.

    Rows Kafka acknowledged are marked sent by the next round's read (one statement that
    marks them and reads what follows), or by the round the fallback poll runs once the
    relay has been idle that long: a round costs one statement, not a read and an update.
    Until marked they are left out of every read, as the replies in flight are.
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
        self._purging: asyncio.Task[None] | None = None
        self._in_flight: InFlight | None = None
        self._acknowledged: list[Outgoing] = []  # not yet marked sent
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()

    async def publish_pending(self, conn: asyncpg.Connection) -> int:
        """Publish one batch, its replies acknowledged too, and mark it sent; return how
        many messages were sent (see `_publish`)."""
        read = await self._publish(conn)
        await self._settle(conn)
        return read

    async def _publish(self, conn: asyncpg.Connection) -> int:
        """One round: mark sent what Kafka acknowledged since the last and read the next
        rows (one statement), send them; return how many rows it read. The replies that
        follow the round's first event are left in flight, sent but not yet acknowledged,
        and the next round (or `_settle`) waits for them: under load the next round's read
        runs while they travel, instead of after a wait for them.

        A reply is sent only once Kafka has acknowledged every event before it. A reply
        sent with them could be appended first (another partition, another topic), and a
        channel that acts on an accepted reply could then send its next command before the
        events behind the reply were in Kafka: that service's barrier, which waits for the
        followed events published before the command, would not wait for them, and the
        command would be decided on facts without them (a card not yet known, an
        application not yet pending). A transaction writes its events before its reply, so
        a round that ends between them has sent the events already."""
        in_flight = self._in_flight
        marking = self._acknowledged
        unmarked = [*marking, *(in_flight.sent if in_flight else ())]
        # Not `position > ` the last one read: a transaction that took its positions
        # earlier may commit later, and its rows must not wait for the replies in flight.
        # The rows acknowledged since the last read are marked sent by this statement (its
        # read sees them unsent, so they are left out by position).
        rows = await conn.fetch(
            f"WITH marked AS ({self._mark_sql('$3')})"
            f" SELECT position, topic, key, value, headers FROM {self.schema}.outbox"
            " WHERE sent_at IS NULL AND position <> ALL($2::bigint[])"
            " ORDER BY position LIMIT $1",
            self.batch_size, [o.position for o in unmarked], [o.position for o in marking],
        )
        self._acknowledged = []
        now: list[Outgoing] = []  # the events, and the replies before the first of them
        later: list[Outgoing] = []
        event_seen = False
        for r in rows:
            outgoing = Outgoing.of(r)
            (later if outgoing.is_reply and event_seen else now).append(outgoing)
            event_seen = event_seen or not outgoing.is_reply
        futures = [await self._send(o) for o in now]
        await asyncio.gather(*futures, self._acknowledge())  # and the replies in flight
        if later:
            self._in_flight = InFlight(later, [await self._send(o) for o in later])
        self._count(now)
        self._acknowledged.extend(now)  # marked by the next read
        return len(rows)

    async def _acknowledge(self) -> None:
        """Wait for the replies in flight and count them published; they are marked sent
        by the next read."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            await asyncio.gather(*in_flight.futures)
            self._count(in_flight.sent)
            self._acknowledged.extend(in_flight.sent)

    async def _settle(self, conn: asyncpg.Connection) -> None:
        """Wait for the replies in flight and mark every acknowledged row sent."""
        await self._acknowledge()
        await self._mark(conn)

    async def _send(self, outgoing: Outgoing) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await self.producer.send(
            outgoing.topic, value=outgoing.value, key=outgoing.key, headers=outgoing.headers)
        return future

    async def _mark(self, conn: asyncpg.Connection) -> None:
        """Mark sent the rows acknowledged and not yet marked (at shutdown: no next read)."""
        if not self._acknowledged:
            return
        await conn.execute(self._mark_sql("$1"), [o.position for o in self._acknowledged])
        self._acknowledged = []

    def _mark_sql(self, positions: str) -> str:
        """The update that marks sent the rows at the positions of parameter `positions`:
        a statement of its own at shutdown, else part of the next read."""
        return (f"UPDATE {self.schema}.outbox SET sent_at = now()"
                f" WHERE position = ANY({positions}::bigint[])")

    def _count(self, published: Sequence[Outgoing]) -> None:
        """Published events by type; every other row the relay sends is a reply."""
        by_type: dict[str, int] = {}
        replies = 0
        for outgoing in published:
            if outgoing.event_type is None:
                replies += 1
            else:
                by_type[outgoing.event_type] = by_type.get(outgoing.event_type, 0) + 1
        for event_type, count in by_type.items():
            EVENTS_PUBLISHED.labels(self.schema, event_type).inc(count)
        if replies:
            REPLIES_PUBLISHED.labels(self.schema).inc(replies)

    async def purge_sent(self, conn: asyncpg.Connection) -> int:
        """Delete rows sent longer ago than the retention, a bounded batch at a time from the
        oldest (`delete_sent_sql`); return how many went. With nothing due only the oldest
        row is read (a batch of the primary key took 90 ms a minute per service)."""
        purged = await delete_in_batches(conn, delete_sent_sql(self.schema), self.retention,
                                         self.purge_batch)
        if purged:
            log.info("outbox.purged", schema=self.schema, count=purged)
        return purged

    async def run(self) -> None:
        # A run that crashed left its replies in flight unmarked: read them again. What Kafka
        # acknowledged is marked by this run's first read.
        self._in_flight = None
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
                    sent = await self._publish(conn)
                    if sent:
                        log.debug("outbox.published", schema=self.schema, count=sent)
                    self._purge_when_due()
                    if sent < self.batch_size:
                        if not self._wake.is_set():  # nothing committed meanwhile
                            await self._acknowledge()
                        if self._in_flight is None:
                            await self._sleep()
                await self._settle(conn)
            finally:
                await self._stop_purging()
                await conn.remove_listener(notify_channel(self.schema), self._on_notify)
                await conn.execute("SELECT pg_advisory_unlock_all()")

    def _purge_when_due(self) -> None:
        """Start the retention purge when it is due and the last one has ended, on a
        connection of its own: a purge with rows due deletes them in statements of up to
        `purge_batch` rows (100-500 ms each on a busy machine), and the relay, which only
        the holder of the schema's lock runs, keeps publishing meanwhile. The rows it
        deletes were sent a retention ago; the relay reads and marks only unsent rows."""
        if self._purging is not None and not self._purging.done():
            return
        if time.monotonic() - self._purged_at < self.purge_interval:
            return
        self._purged_at = time.monotonic()
        self._purging = asyncio.create_task(self._purge_apart())

    async def _purge_apart(self) -> None:
        try:
            async with self.pool.acquire() as conn:
                await self.purge_sent(conn)
        except Exception as exc:  # the next one is due after `purge_interval`
            log.warning("outbox.purge_failed", schema=self.schema, error=type(exc).__name__)

    async def _stop_purging(self) -> None:
        """A purge still running when the relay stops is cancelled: its statement is rolled
        back and the rows wait for the next relay's. The wait for it is bounded, as asyncpg
        asks PostgreSQL to cancel the statement over a connection of its own."""
        purging, self._purging = self._purging, None
        if purging is not None and not purging.done():
            purging.cancel()
            await asyncio.wait({purging}, timeout=PURGE_STOP_TIMEOUT_S)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def _sleep(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.poll_interval)
        self._wake.clear()
