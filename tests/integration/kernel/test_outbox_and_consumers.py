"""DESIGN section 9 against the real Kafka and PostgreSQL: the outbox, idempotent consumers,
the dead-letter path and per-citizen order."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.consumer import EventConsumer, Inbound, purge_bookkeeping
from shared.contracts.loss import LossCancelled
from shared.envelope import EventEnvelope, PendingEvent
from shared.events import EventMeta, to_pending
from shared.eventstore import PostgresEventStore, migrate
from shared.outbox import OutboxRelay, make_producer
from shared.runtime import ServiceRuntime
from shared.settings import CardDeskSettings
from tests.builders import Citizens, CitizenStreams, sealed
from tests.support import (
    RecordingDeadLetters,
    create_topics,
    eventually,
    kafka_options,
    partitions_of,
    read_topic,
    unique,
)

pytestmark = pytest.mark.integration

SEEN_DDL = """
CREATE TABLE IF NOT EXISTS {schema}.seen (
    seq bigserial PRIMARY KEY, citizen_ref text NOT NULL, version int NOT NULL, event_id text
);
"""


async def seen_probe(pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
                     ) -> tuple[EventConsumer, RecordingDeadLetters]:
    """A follower named "probe" that records each `LossCancelled` it applies in `seen`, and
    the dead letters it sends."""
    await pool.execute(SEEN_DDL.format(schema=schema))
    dead = RecordingDeadLetters()
    return EventConsumer(pool, schema, "probe", lambda c, e: record_seen(c, schema, e),
                         dead, known_types={"LossCancelled"},  # type: ignore[arg-type]
                         settings=settings), dead


async def record_seen(conn: asyncpg.Connection, schema: str, event: EventEnvelope) -> None:
    await conn.execute(
        f"INSERT INTO {schema}.seen (citizen_ref, version, event_id) VALUES ($1, $2, $3)",
        event.citizen_ref, event.version, str(event.event_id),
    )


def cancellations(ref: str, n: int) -> list[EventEnvelope]:
    """`n` chained `LossCancelled` events on citizen `ref`'s stream `s-<ref>`."""
    return CitizenStreams(ref).append_all(
        f"s-{ref}", [LossCancelled(loss_id=f"l{i}") for i in range(n)])


def inbound(topic: str, envelopes: Sequence[EventEnvelope], start: int = 0) -> list[Inbound]:
    """The records of `envelopes` on partition 0 of `topic` from offset `start`, each keyed
    by its citizen."""
    return [Inbound(topic, 0, offset, e.citizen_ref.encode(), e.to_bytes())
            for offset, e in enumerate(envelopes, start=start)]


@pytest.fixture
async def producer(settings: CardDeskSettings) -> AsyncIterator[AIOKafkaProducer]:
    producer = make_producer(settings)
    await producer.start()
    yield producer
    await producer.stop()


async def store_events(pool: asyncpg.Pool, schema: str, topic: str, citizen: str, n: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        store = PostgresEventStore(conn, schema, topic)
        version = len(await store.read_stream(f"s-{citizen}"))
        meta = EventMeta(citizen, datetime.now(UTC), "corr", "cause")
        await store.append(f"s-{citizen}", version, [
            to_pending(LossCancelled(loss_id="x"), meta, uuid.uuid4()) for _ in range(n)
        ])


class FlakyProducer:
    """A producer that dies once at a chosen point, as a killed relay would."""

    def __init__(self, inner: AIOKafkaProducer) -> None:
        self.inner = inner
        self.failed = False

    async def send(self, *args: object, **kwargs: object) -> object:
        if not self.failed:
            self.failed = True
            raise ConnectionError("relay killed before Kafka acknowledged")
        return await self.inner.send(*args, **kwargs)


async def test_a_relay_killed_before_kafka_acknowledged_publishes_after_restart(
    pool: asyncpg.Pool, schema: str, producer: AIOKafkaProducer, settings: CardDeskSettings,
) -> None:
    topic = f"{schema}.events"
    await create_topics(settings.kafka_bootstrap, [topic])
    await store_events(pool, schema, topic, "c1", 2)

    crashed = OutboxRelay(pool, FlakyProducer(producer), schema)
    async with pool.acquire() as conn:
        with pytest.raises(ConnectionError):
            await crashed.publish_pending(conn)
        assert await conn.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL") == 2

        restarted = OutboxRelay(pool, producer, schema)
        assert await restarted.publish_pending(conn) == 2
        assert await conn.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL") == 0
    records = await read_topic(settings.kafka_bootstrap, topic, until=lambda r: len(r) >= 2)
    assert [json.loads(r.value)["version"] for r in records] == [1, 2]


async def test_the_relay_purges_rows_sent_before_the_retention_and_nothing_else(
    pool: asyncpg.Pool, schema: str, producer: AIOKafkaProducer,
) -> None:
    for citizen, events in (("old", 3), ("recent", 1), ("stuck", 1)):
        await store_events(pool, schema, f"{schema}.events", citizen, events)
    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() - interval '2 days'"
                       " WHERE key = $1", b"old")
    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() WHERE key = $1", b"recent")
    await pool.execute(f"UPDATE {schema}.outbox SET created_at = now() - interval '2 days'"
                       " WHERE key = $1", b"stuck")  # old, but never sent: it must stay

    relay = OutboxRelay(pool, producer, schema, retention=timedelta(hours=24), purge_batch=2)
    async with pool.acquire() as conn:
        assert await relay.purge_sent(conn) == 3
        assert await relay.purge_sent(conn) == 0
    left = await pool.fetch(f"SELECT key FROM {schema}.outbox ORDER BY position")
    assert [r["key"] for r in left] == [b"recent", b"stuck"]


async def test_the_relay_reads_only_the_oldest_row_when_it_was_sent_within_the_retention(
    pool: asyncpg.Pool, schema: str, producer: AIOKafkaProducer,
) -> None:
    """Rows are sent in position order, so when the oldest was sent within the retention no
    row is due and the purge stops there (a later row sent before it, which the relay's
    order rules out, waits). An unsent oldest row does not stop the purge."""
    for citizen in ("first", "second", "third"):
        await store_events(pool, schema, f"{schema}.events", citizen, 1)
    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() WHERE key = $1", b"first")
    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() - interval '2 days'"
                       " WHERE key = $1", b"second")
    relay = OutboxRelay(pool, producer, schema, retention=timedelta(hours=24), purge_batch=10)
    async with pool.acquire() as conn:
        assert await relay.purge_sent(conn) == 0
        await pool.execute(f"UPDATE {schema}.outbox SET sent_at = NULL WHERE key = $1",
                           b"first")
        assert await relay.purge_sent(conn) == 1
    left = await pool.fetch(f"SELECT key FROM {schema}.outbox ORDER BY position")
    assert [r["key"] for r in left] == [b"first", b"third"]


async def test_the_relay_keeps_publishing_while_its_purge_waits(
    pool: asyncpg.Pool, schema: str, producer: AIOKafkaProducer, settings: CardDeskSettings,
) -> None:
    """The retention purge runs beside the relay: a purge held up (here by a lock on a row
    it deletes; on a busy machine, by statements of 100-500 ms) delays no publishing."""
    topic = f"{schema}.events"
    await create_topics(settings.kafka_bootstrap, [topic])
    await store_events(pool, schema, topic, "old", 1)
    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() - interval '2 days'")
    relay = OutboxRelay(pool, producer, schema, retention=timedelta(hours=24),
                        poll_interval=0.05, purge_interval=3600)

    async def purge_waits() -> bool:
        return bool(await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE $1", f"%DELETE FROM {schema}.outbox%"))

    async def all_sent() -> bool:
        return not await pool.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")

    async with pool.acquire() as holder, holder.transaction():
        await holder.execute(f"SELECT 1 FROM {schema}.outbox WHERE key = 'old' FOR UPDATE")
        running = asyncio.create_task(relay.run())
        try:
            await eventually(purge_waits, timeout_s=10)
            await store_events(pool, schema, topic, "new", 2)
            await eventually(all_sent, timeout_s=10)
            assert await purge_waits()  # published while the purge still waited
        finally:
            relay.stop()
            await asyncio.wait_for(running, 10)
    records = await read_topic(settings.kafka_bootstrap, topic, until=lambda r: len(r) >= 2)
    assert [r.key for r in records] == [b"new", b"new"]
    # The purge was cancelled with the relay: the old row waits for the next one.
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.outbox WHERE key = 'old'") == 1


async def test_a_relay_killed_after_the_ack_republishes_and_the_consumer_applies_once(
    pool: asyncpg.Pool, schema: str, producer: AIOKafkaProducer, settings: CardDeskSettings,
) -> None:
    topic = f"{schema}.events"
    await create_topics(settings.kafka_bootstrap, [topic, f"{topic}.dlq"])
    await pool.execute(SEEN_DDL.format(schema=schema))
    await store_events(pool, schema, topic, "c2", 1)

    async with pool.acquire() as conn:
        relay = OutboxRelay(pool, producer, schema)
        # Killed between Kafka's acknowledgement and the sent_at update: publish, roll back.
        killed = conn.transaction()
        await killed.start()
        await relay.publish_pending(conn)
        await killed.rollback()
        assert await relay.publish_pending(conn) == 1  # the restart publishes it again

    records = await read_topic(settings.kafka_bootstrap, topic, until=lambda r: len(r) >= 2)
    assert len(records) == 2 and records[0].value == records[1].value

    consumer = EventConsumer(pool, schema, "probe", lambda c, e: record_seen(c, schema, e),
                             None, settings=settings)  # type: ignore[arg-type]
    for record in records:
        await consumer.handle(Inbound.from_record(record))
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.seen") == 1


async def test_the_same_event_delivered_twice_changes_the_consumer_state_once(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    await pool.execute(SEEN_DDL.format(schema=schema))
    consumer = EventConsumer(pool, schema, "probe", lambda c, e: record_seen(c, schema, e),
                             None, settings=settings)  # type: ignore[arg-type]
    [event] = CitizenStreams("x").append_all("s-x", [LossCancelled(loss_id="l")])
    message = Inbound("probe.events", 0, 7, b"x", event.to_bytes())
    await consumer.handle(message)
    await consumer.handle(message)
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.seen") == 1


@pytest.fixture
async def probe_service(
    settings: CardDeskSettings, pool: asyncpg.Pool,
) -> AsyncIterator[ServiceRuntime]:
    """A service of its own (schema, topics, group) consuming `<name>.events` for real."""
    name = unique("probe")
    runtime = ServiceRuntime(name, settings, extra_ddl=SEEN_DDL.format(schema=name))
    topic = f"{name}.events"
    await create_topics(settings.kafka_bootstrap, [topic, f"{topic}.dlq"])
    consumers: dict[str, EventConsumer] = {}

    async def ready() -> None:
        consumers["c"] = EventConsumer(
            runtime.pool, name, "probe",
            lambda c, e: record_seen(c, name, e), runtime.dead_letters,
            known_types={"LossCancelled"}, settings=settings,
        )

    runtime.on_ready(ready)
    runtime.subscribe(topic, lambda: consumers["c"])
    await runtime.start()
    await runtime.broker.start()
    yield runtime
    await runtime.broker.stop()
    await runtime.stop()
    await pool.execute(f"DROP SCHEMA {name} CASCADE")


async def test_a_malformed_message_goes_to_the_dlq_with_its_reason_and_the_next_is_processed(
    probe_service: ServiceRuntime, producer: AIOKafkaProducer, settings: CardDeskSettings,
) -> None:
    name = probe_service.name
    topic = f"{name}.events"
    [good] = CitizenStreams("ok").append_all("s-ok", [LossCancelled(loss_id="l")])
    [forged] = CitizenStreams("f").append_all("s-f", [LossCancelled(loss_id="l")])
    tampered = forged.to_bytes().replace(b'"loss_id":"l"', b'"loss_id":"m"')
    [template] = CitizenStreams("u").append_all("s-u", [LossCancelled(loss_id="l")])
    unknown = EventEnvelope.seal(
        PendingEvent.model_validate(
            template.model_dump(exclude={"stream_id", "version", "prev_hash", "hash"})
            | {"type": "Nonsense"}),
        "s-u", 1, template.prev_hash)
    await producer.send_and_wait(topic, b'{"not": "an envelope"', key=b"ok")
    await producer.send_and_wait(topic, tampered, key=b"ok")
    await producer.send_and_wait(topic, unknown.to_bytes(), key=b"ok")
    await producer.send_and_wait(topic, good.to_bytes(), key=b"ok")

    async def good_one_applied() -> bool:
        rows = await probe_service.pool.fetch(f"SELECT citizen_ref FROM {name}.seen")
        return [r["citizen_ref"] for r in rows] == ["ok"]

    await eventually(good_one_applied)
    dead = await read_topic(settings.kafka_bootstrap, f"{topic}.dlq", until=lambda r: len(r) >= 3)
    codes = [dict(r.headers)["x-dlq-code"] for r in dead]
    assert codes == [b"malformed_json", b"bad_hash", b"unknown_event_type"]
    first = dict(dead[0].headers)
    assert first["x-original-topic"] == topic.encode()
    assert first["x-original-offset"].isdigit() and b"not JSON" in first["x-dlq-reason"]
    assert first["x-dlq-consumer"] == probe_service.group.encode()
    assert dead[0].value == b'{"not": "an envelope"'


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_handled_batch_writes_no_access_log_lines(
    probe_service: ServiceRuntime, producer: AIOKafkaProducer,
) -> None:
    """FastStream's "Received"/"Processed" per batch (two lines per fetch per consumer) are
    below its logger's level; what it logs at its own levels still reaches the log."""
    name = probe_service.name
    access = logging.getLogger("faststream.access.kafka")
    kept = Kept()
    access.addHandler(kept)
    try:
        [event] = CitizenStreams("quiet").append_all("s-quiet", [LossCancelled(loss_id="l")])
        await producer.send_and_wait(f"{name}.events", event.to_bytes(), key=b"quiet")

        async def applied() -> bool:
            count: int = await probe_service.pool.fetchval(f"SELECT count(*) FROM {name}.seen")
            return count == 1

        await eventually(applied)
        access.warning("still logged")
    finally:
        access.removeHandler(kept)
    messages = [record.getMessage() for record in kept.records]
    assert messages == ["still logged"]


async def test_per_citizen_order_holds_across_six_partitions_with_citizens_interleaved(
    probe_service: ServiceRuntime, settings: CardDeskSettings,
) -> None:
    name = probe_service.name
    citizens = [f"citizen-{i}" for i in range(40)]
    per_citizen = 8
    rng = random.Random(7)

    for _ in range(per_citizen):
        # Every citizen writes concurrently, in a different order each round.
        round_order = rng.sample(citizens, len(citizens))
        await asyncio.gather(*(
            store_events(probe_service.pool, name, f"{name}.events", c, 1) for c in round_order
        ))

    total = len(citizens) * per_citizen

    async def all_seen() -> bool:
        seen = await probe_service.pool.fetchval(f"SELECT count(*) FROM {name}.seen")
        return bool(seen == total)

    await eventually(all_seen, timeout_s=60)
    rows = await probe_service.pool.fetch(
        f"SELECT citizen_ref, version FROM {name}.seen ORDER BY seq")
    seen: dict[str, list[int]] = {}
    for row in rows:
        seen.setdefault(row["citizen_ref"], []).append(row["version"])
    assert seen == {c: list(range(1, per_citizen + 1)) for c in citizens}
    partitions = {
        r.partition
        for r in await read_topic(settings.kafka_bootstrap, f"{name}.events",
                                  until=lambda r: len(r) >= total)
    }
    assert len(partitions) == 6


async def test_a_batch_applies_each_new_event_once_and_parks_the_unreadable_ones(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    consumer, dead = await seen_probe(pool, schema, settings)
    events = cancellations("b", 3)
    values = [events[0].to_bytes(), events[1].to_bytes(), b"{broken", events[1].to_bytes(),
              events[2].to_bytes()]
    batch = [Inbound("probe.events", 0, offset, b"b", value) for offset, value in
             enumerate(values)]
    await consumer.handle_batch(batch[:2])  # the first two arrive, then the rest again
    await consumer.handle_batch(batch)
    rows = await pool.fetch(f"SELECT version FROM {schema}.seen ORDER BY seq")
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert dead.sent == [(2, "malformed_json")]


async def test_a_failing_effect_in_a_batch_undoes_the_batch_and_each_event_is_retried_alone(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    await pool.execute(SEEN_DDL.format(schema=schema))
    dead = RecordingDeadLetters()
    events = cancellations("f", 3)
    poisoned = events[1].event_id

    async def handler(conn: asyncpg.Connection, event: EventEnvelope) -> None:
        await record_seen(conn, schema, event)
        if event.event_id == poisoned:
            raise ValueError("this event's effect cannot be applied")

    consumer = EventConsumer(pool, schema, "probe", handler, dead,  # type: ignore[arg-type]
                             settings=settings.model_copy(update={"consumer_max_attempts": 2}))
    await consumer.handle_batch(inbound("probe.events", events))
    rows = await pool.fetch(f"SELECT version FROM {schema}.seen ORDER BY seq")
    assert [r["version"] for r in rows] == [1, 3]
    assert dead.sent == [(1, "processing_failed")]


async def test_an_event_that_does_not_continue_its_stream_is_dead_lettered_however_intact(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    consumer, dead = await seen_probe(pool, schema, settings)
    first, second, third = cancellations("c", 3)
    # Each forgery's own hash is right; its place in the chain is not.
    skips_ahead = sealed("s-c", "c", LossCancelled(loss_id="x"), version=3, prev_hash=first.hash)
    takes_a_version = sealed("s-c", "c", LossCancelled(loss_id="y"), version=2,
                             prev_hash=first.hash)
    restarts = sealed("s-c", "c", LossCancelled(loss_id="z"))
    values = [first, second, skips_ahead, takes_a_version, restarts, second, third]

    await consumer.handle_batch(inbound("probe.events", values[:3]))
    for msg in inbound("probe.events", values[3:], start=3):  # one by one, as after a failure
        await consumer.handle(msg)

    rows = await pool.fetch(f"SELECT version FROM {schema}.seen ORDER BY seq")
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert dead.sent == [(2, "broken_chain"), (3, "broken_chain"), (4, "broken_chain")]


async def test_a_break_in_the_middle_of_a_batch_is_dead_lettered_once_and_the_rest_applies(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    consumer, dead = await seen_probe(pool, schema, settings)
    first, second, third = cancellations("m", 3)
    forged = sealed("s-m", "m", LossCancelled(loss_id="x"), version=2)  # prev_hash: genesis

    await consumer.handle_batch(inbound("probe.events", [first, forged, second, third]))

    rows = await pool.fetch(f"SELECT event_id FROM {schema}.seen ORDER BY seq")
    assert [r["event_id"] for r in rows] == [str(e.event_id) for e in (first, second, third)]
    assert dead.sent == [(1, "broken_chain")]
    chain = await pool.fetch(f"SELECT version, hash FROM {schema}.followed_chain ORDER BY 1")
    assert [(r["version"], r["hash"]) for r in chain] == [
        (e.version, e.hash) for e in (first, second, third)]


async def test_a_batch_with_a_break_and_a_failing_effect_replays_alone_and_sends_each_once(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    """The break found in the rolled-back batch is not dead-lettered there: the replay one
    by one dead-letters it, once; the failed event's chain row still anchors the next."""
    await pool.execute(SEEN_DDL.format(schema=schema))
    dead = RecordingDeadLetters()
    first, second, third = cancellations("p", 3)
    forged = sealed("s-p", "p", LossCancelled(loss_id="x"), version=2)

    async def handler(conn: asyncpg.Connection, event: EventEnvelope) -> None:
        await record_seen(conn, schema, event)
        if event.event_id == second.event_id:
            raise ValueError("this event's effect cannot be applied")

    consumer = EventConsumer(pool, schema, "probe", handler, dead,  # type: ignore[arg-type]
                             settings=settings.model_copy(update={"consumer_max_attempts": 2}))
    batch = inbound("probe.events", [first, forged, second, third])
    await consumer.handle_batch(batch)

    rows = await pool.fetch(f"SELECT version FROM {schema}.seen ORDER BY seq")
    assert [r["version"] for r in rows] == [1, 3]
    assert dead.sent == [(1, "broken_chain"), (2, "processing_failed")]
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.processed") == 2
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.followed_chain") == 3

    await consumer.handle_batch([batch[0], batch[3]])  # redelivered: nothing changes
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.seen") == 2
    assert len(dead.sent) == 2


async def test_bookkeeping_older_than_the_retention_goes_and_its_redeliveries_change_nothing(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    """Each stream's last chain row stays; every other row taken before the retention goes.
    Redelivered afterwards (as after a reset of the group's offsets), in a batch or alone,
    the purged events apply nothing and are not dead-lettered; the streams go on."""
    consumer, dead = await seen_probe(pool, schema, settings)
    long_ago, lately = CitizenStreams("old"), CitizenStreams("new")
    old = long_ago.append_all("s-old", [LossCancelled(loss_id=f"l{i}") for i in range(3)])
    await consumer.handle_batch(inbound("probe.events", old))
    await pool.execute(f"UPDATE {schema}.processed SET processed_at = now() - interval '2 days'")
    await pool.execute(
        f"UPDATE {schema}.followed_chain SET recorded_at = now() - interval '2 days'")
    recent = lately.append_all("s-new", [LossCancelled(loss_id=f"l{i}") for i in range(2)])
    await consumer.handle_batch(inbound("probe.events", recent, start=3))

    assert await purge_bookkeeping(pool, schema, settings) == (3, 2)
    chain = await pool.fetch(
        f"SELECT stream_id, version FROM {schema}.followed_chain ORDER BY 1, 2")
    assert [(r["stream_id"], r["version"]) for r in chain] == [
        ("s-new", 1), ("s-new", 2), ("s-old", 3)]
    assert await purge_bookkeeping(pool, schema, settings) == (0, 0)

    everything = inbound("probe.events", old + recent)
    await consumer.handle_batch(everything)
    for msg in everything:
        await consumer.handle_alone(msg)
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.seen") == 5
    assert dead.sent == []

    following = long_ago.append("s-old", LossCancelled(loss_id="l3"))
    await consumer.handle_batch(inbound("probe.events", [following], start=5))
    rows = await pool.fetch(f"SELECT event_id FROM {schema}.seen ORDER BY seq")
    assert rows[-1]["event_id"] == str(following.event_id)
    assert len(rows) == 6


async def test_a_follower_batch_costs_four_statements_plus_its_effects(
    counted: tuple[asyncpg.Pool, list[str]], schema: str, settings: CardDeskSettings,
) -> None:
    pool, sent = counted
    await pool.execute(SEEN_DDL.format(schema=schema))

    async def effects(conn: asyncpg.Connection, events: Sequence[EventEnvelope]) -> None:
        await conn.execute(f"INSERT INTO {schema}.seen (citizen_ref, version, event_id)"
                           " SELECT * FROM unnest($1::text[], $2::int[], $3::text[])",
                           [e.citizen_ref for e in events], [e.version for e in events],
                           [str(e.event_id) for e in events])

    consumer = EventConsumer(pool, schema, "probe", lambda c, e: effects(c, [e]),
                             RecordingDeadLetters(),  # type: ignore[arg-type]
                             batch_handler=effects, settings=settings)
    streams = Citizens()

    def batch(*refs: str) -> list[Inbound]:
        return inbound("probe.events", [
            streams[ref].append(f"s-{ref}", LossCancelled(loss_id="l")) for ref in refs])

    await consumer.handle_batch(batch("warm", "warm"))  # asyncpg prepares each statement once
    for messages in (batch("a", "b", "a", "c", "b"), batch("d")):
        sent.clear()
        await consumer.handle_batch(messages)
        # BEGIN, the locks and the chains read (one function call), chain rows + processed
        # rows, the effects, COMMIT
        assert len(sent) == 5, sent
    sent.clear()
    await consumer.handle_batch(messages)  # redelivered: no effects to apply
    assert len(sent) == 4, sent
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.seen") == 8


class BatchRecorder:
    """A follower that records which records each call got, then applies them."""

    def __init__(self, inner: EventConsumer) -> None:
        self.inner = inner
        self.calls: list[list[tuple[int, int]]] = []  # (partition, offset) per record

    async def handle(self, msg: Inbound) -> None:
        self.calls.append([(msg.partition, msg.offset)])
        await self.inner.handle(msg)

    async def handle_batch(self, messages: Sequence[Inbound]) -> None:
        self.calls.append([(m.partition, m.offset) for m in messages])
        await self.inner.handle_batch(messages)


async def recording_runtime(name: str, topic: str, settings: CardDeskSettings,
                            ) -> tuple[ServiceRuntime, Callable[[], BatchRecorder]]:
    """A started service `name` consuming `topic` into `{name}.seen`, and its recorder."""
    runtime = ServiceRuntime(name, settings, extra_ddl=SEEN_DDL.format(schema=name))
    recorder: dict[str, BatchRecorder] = {}

    async def ready() -> None:
        consumer, _ = await seen_probe(runtime.pool, name, settings)
        recorder["r"] = BatchRecorder(consumer)

    runtime.on_ready(ready)
    runtime.subscribe(topic, lambda: recorder["r"])
    await runtime.start()
    await runtime.broker.start()
    return runtime, lambda: recorder["r"]


async def test_a_fetch_of_several_partitions_is_one_batch_each_partition_in_order(
    settings: CardDeskSettings, pool: asyncpg.Pool, producer: AIOKafkaProducer,
) -> None:
    """What is waiting when the consumer starts comes in one fetch: one `handle_batch` (one
    transaction) for all its partitions, each partition's records in offset order, and the
    progress the barrier reads holds every partition's end."""
    name = unique("fetch")
    topic = f"{name}.events"
    await create_topics(settings.kafka_bootstrap, [topic, f"{topic}.dlq"])
    citizens = [f"c{i}" for i in range(24)]
    streams = Citizens()
    for round_ in range(3):
        for citizen in citizens:
            event = streams[citizen].append(f"s-{citizen}", LossCancelled(loss_id=str(round_)))
            await producer.send(topic, event.to_bytes(), key=citizen.encode())
    await producer.flush()
    runtime, recorder = await recording_runtime(name, topic, settings)
    try:
        async def all_seen() -> bool:
            return bool(await pool.fetchval(f"SELECT count(*) FROM {name}.seen") == 72)

        await eventually(all_seen, timeout_s=60)
        calls = recorder().calls
        assert max(len({partition for partition, _ in call}) for call in calls) > 1
        for call in calls:
            for partition in {p for p, _ in call}:
                offsets = [offset for p, offset in call if p == partition]
                assert offsets == sorted(offsets)
        ends: dict[int, int] = {}
        for call in calls:
            for partition, offset in call:
                ends[partition] = max(ends.get(partition, 0), offset + 1)
        assert len(ends) == 6
        assert not runtime.progress.behind(
            {TopicPartition(topic, p): end for p, end in ends.items()})
        rows = await pool.fetch(f"SELECT citizen_ref, version FROM {name}.seen ORDER BY seq")
        versions: dict[str, list[int]] = {}
        for row in rows:
            versions.setdefault(row["citizen_ref"], []).append(row["version"])
        assert versions == {c: [1, 2, 3] for c in citizens}
    finally:
        await runtime.broker.stop()
        await runtime.stop()
        await pool.execute(f"DROP SCHEMA {name} CASCADE")


def follower_pair(pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
                  fail_on: object = None) -> tuple[EventConsumer, EventConsumer,
                                                   RecordingDeadLetters]:
    """Followers "a" and "b" of one schema (as status's of four topics), recording what
    they apply in `seen`; "b" fails on the event with id `fail_on`."""
    dead = RecordingDeadLetters()

    async def failing(conn: asyncpg.Connection, event: EventEnvelope) -> None:
        await record_seen(conn, schema, event)
        if event.event_id == fail_on:
            raise ValueError("this event's effect cannot be applied")

    quick = settings.model_copy(update={"consumer_max_attempts": 2})
    a = EventConsumer(pool, schema, "a", lambda c, e: record_seen(c, schema, e),
                      dead, settings=quick)  # type: ignore[arg-type]
    b = EventConsumer(pool, schema, "b", failing, dead, settings=quick)  # type: ignore[arg-type]
    return a, b, dead


async def test_followers_of_two_topics_in_one_fetch_share_one_transaction(
    counted: tuple[asyncpg.Pool, list[str]], schema: str, settings: CardDeskSettings,
) -> None:
    pool, sent = counted
    await pool.execute(SEEN_DDL.format(schema=schema))
    a, b, dead = follower_pair(pool, schema, settings)
    streams = Citizens()

    def events(ref: str, n: int) -> list[EventEnvelope]:
        return [streams[ref].append(f"s-{ref}", LossCancelled(loss_id="l")) for _ in range(n)]

    await EventConsumer.handle_together([(a, inbound("a.events", events("w", 1))),
                                         (b, inbound("b.events", events("v", 1)))])  # warm
    sent.clear()
    await EventConsumer.handle_together([(a, inbound("a.events", events("x", 2))),
                                         (b, inbound("b.events", events("y", 1)))])
    # BEGIN, the locks with the chains read, then per follower its chain and processed rows
    # and its effect (one per event here), COMMIT: 3 + 3 + 2 where apart it would be 5 + 4
    assert len(sent) == 8, sent
    assert sum("locked_chain_view" in q for q in sent) == 1
    rows = await pool.fetch(f"SELECT citizen_ref, version FROM {schema}.seen ORDER BY seq")
    assert [(r["citizen_ref"], r["version"]) for r in rows] == [
        ("w", 1), ("v", 1), ("x", 1), ("x", 2), ("y", 1)]
    assert dead.sent == []


async def test_a_failure_in_one_followers_part_replays_each_follower_on_its_own(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    await pool.execute(SEEN_DDL.format(schema=schema))
    for_a, for_b = cancellations("x", 2), cancellations("y", 3)
    a, b, dead = follower_pair(pool, schema, settings, fail_on=for_b[1].event_id)
    forged = sealed("s-x", "x", LossCancelled(loss_id="f"), version=2)  # prev_hash: genesis
    fetch = [(a, inbound("a.events", [for_a[0], forged, for_a[1]])),
             (b, inbound("b.events", for_b))]

    await EventConsumer.handle_together(fetch)

    rows = await pool.fetch(f"SELECT citizen_ref, version FROM {schema}.seen ORDER BY seq")
    assert [(r["citizen_ref"], r["version"]) for r in rows] == [
        ("x", 1), ("x", 2), ("y", 1), ("y", 3)]
    # The break once, by the replay of a's part; b's failing event once, after its retries.
    assert dead.sent == [(1, "broken_chain"), (1, "processing_failed")]
    await EventConsumer.handle_together([  # the applied ones redelivered: nothing changes
        (a, [fetch[0][1][0], fetch[0][1][2]]), (b, [fetch[1][1][0], fetch[1][1][2]])])
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.seen") == 4
    assert len(dead.sent) == 2


async def test_followers_of_two_schemas_in_one_fetch_are_applied_apart(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    """Two schemas are two lock namespaces: no shared transaction, and no failure either."""
    other = unique("kt")
    await migrate(pool, other)
    try:
        first, _ = await seen_probe(pool, schema, settings)
        second, _ = await seen_probe(pool, other, settings)
        streams = Citizens()
        await EventConsumer.handle_together([
            (first, inbound("a.events", [streams["x"].append("s-x", LossCancelled(loss_id="1"))])),
            (second, inbound("b.events", [streams["y"].append("s-y", LossCancelled(loss_id="2"))])),
        ])
        for name, ref in ((schema, "x"), (other, "y")):
            rows = await pool.fetch(f"SELECT citizen_ref FROM {name}.seen")
            assert [r["citizen_ref"] for r in rows] == [ref]
    finally:
        await pool.execute(f"DROP SCHEMA {other} CASCADE")


class GoneErased:
    """Erasures in which the citizen "gone" is erased; notes what each lookup was given."""

    def __init__(self) -> None:
        self.asked: list[tuple[set[str], dict[str, tuple[int, str]] | None]] = []

    def stream_id(self, citizen_ref: str) -> str:
        return f"own-{citizen_ref}"

    async def erased_among(self, conn: asyncpg.Connection, citizen_refs: Collection[str],
                           heads: Mapping[str, tuple[int, str]] | None = None) -> set[str]:
        self.asked.append((set(citizen_refs), None if heads is None else dict(heads)))
        return {"gone"} & set(citizen_refs)


async def test_events_about_a_citizen_erased_here_are_taken_and_change_nothing(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    await pool.execute(SEEN_DDL.format(schema=schema))
    erasures = GoneErased()
    consumer = EventConsumer(pool, schema, "probe", lambda c, e: record_seen(c, schema, e),
                             RecordingDeadLetters(), settings=settings,  # type: ignore[arg-type]
                             erased=erasures)
    streams = Citizens()
    events = [streams[ref].append(f"s-{ref}", LossCancelled(loss_id="l"))
              for ref in ("gone", "kept", "gone", "kept")]

    await consumer.handle_batch(inbound("probe.events", events))
    await consumer.handle_batch(inbound("probe.events", events))  # redelivered
    later = streams["gone"].append("s-gone", LossCancelled(loss_id="l"))
    assert await consumer.apply(later)  # one by one, as a failed batch is replayed

    rows = await pool.fetch(f"SELECT citizen_ref, version FROM {schema}.seen ORDER BY seq")
    assert [(r["citizen_ref"], r["version"]) for r in rows] == [("kept", 1), ("kept", 2)]
    # One lookup for the batch, none for the redelivery (nothing new), one for the replay;
    # the batch's with the heads the locked chain view read (none: no events here).
    assert erasures.asked == [({"gone", "kept"}, {}), ({"gone"}, None)]
    assert await pool.fetchval(
        f"SELECT count(*) FROM {schema}.processed WHERE consumer = 'probe'") == 5


async def group_committed(settings: CardDeskSettings, group: str,
                          partitions: Sequence[TopicPartition]) -> dict[int, int]:
    """The group's committed offset of each partition (-1: none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **kafka_options())
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group, partitions=list(partitions))
    finally:
        await admin.close()
    return {tp.partition: (meta.offset if meta else -1) for tp, meta in offsets.items()}


async def test_offsets_are_committed_on_a_timer_and_a_restart_before_it_applies_nothing_twice(
    settings: CardDeskSettings, pool: asyncpg.Pool, producer: AIOKafkaProducer,
) -> None:
    """Handled batches' ends reach the group within the commit interval; a process stopped
    before its timer ran leaves them uncommitted, and the next one gets those records again
    and applies none of them a second time."""
    name = unique("commits")
    topic = f"{name}.events"
    await create_topics(settings.kafka_bootstrap, [topic, f"{topic}.dlq"])
    slow = settings.model_copy(update={"consumer_commit_interval_ms": 60_000,
                                       "consumer_commit_interval_alone_ms": 60_000})
    streams = Citizens()
    for citizen in (f"c{i}" for i in range(12)):
        event = streams[citizen].append(f"s-{citizen}", LossCancelled(loss_id="1"))
        await producer.send(topic, event.to_bytes(), key=citizen.encode())
    await producer.flush()
    partitions = await partitions_of(settings.kafka_bootstrap, [topic])

    async def applied_by(runtime_settings: CardDeskSettings) -> BatchRecorder:
        runtime, recorder = await recording_runtime(name, topic, runtime_settings)
        try:
            async def all_seen() -> bool:
                return bool(await pool.fetchval(f"SELECT count(*) FROM {name}.seen") == 12)

            await eventually(all_seen, timeout_s=60)
            if runtime_settings.consumer_commit_interval_alone_ms <= 1000:
                async def committed() -> bool:  # each partition's end: 12 in all
                    got = await group_committed(settings, runtime.group, partitions)
                    return sum(max(o, 0) for o in got.values()) == 12

                await eventually(committed, timeout_s=10)
            return recorder()
        finally:
            await runtime.broker.stop()
            await runtime.stop()

    try:
        first = await applied_by(slow)  # stopped long before its timer
        assert sum(len(call) for call in first.calls) == 12
        assert set((await group_committed(settings, f"carddesk-{name}",
                                          partitions)).values()) == {-1}
        second = await applied_by(settings)  # the default interval
        assert sum(len(call) for call in second.calls) == 12  # every record again
        assert await pool.fetchval(f"SELECT count(*) FROM {name}.seen") == 12  # once each
    finally:
        await pool.execute(f"DROP SCHEMA {name} CASCADE")
