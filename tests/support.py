"""Helpers the integration and end-to-end tests share: events, topics, reading Kafka."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from asyncpg.connection import LoggedQuery

from cardctl.stack import ensure_topics
from services.status.main import SPEC as STATUS
from services.status.main import query_app
from services.status.settings import StatusSettings
from shared.consumer import Inbound
from shared.eventstore import migrate
from shared.kafka import client_options
from shared.outbox import make_producer
from shared.runtime import ServiceRuntime, stop_step
from shared.service import Service, bootstrap
from shared.settings import CardDeskSettings
from shared.topics import TopicSpec

# The dev channels file's first citizen and bureau channels, as the tests act as them.
CITIZEN_CHANNEL = "wechat-oa"
BUREAU_CHANNEL = "bureau-counter"


def session_settings(bootstrap: str) -> CardDeskSettings:
    """Settings for `bootstrap` with the test session's Kafka credentials: the stack
    fixture puts the administrator's into the environment."""
    return CardDeskSettings(kafka_bootstrap=bootstrap)


def kafka_options() -> dict[str, Any]:
    """Security options of every Kafka client a test makes (the administrator's)."""
    return client_options(CardDeskSettings())


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@asynccontextmanager
async def schema_pair(pool: asyncpg.Pool, ddl: Callable[[str], str],
                      prefixes: tuple[str, str]) -> AsyncIterator[tuple[str, str]]:
    """Two throwaway schemas with a service's tables, for one path against another."""
    names = unique(prefixes[0]), unique(prefixes[1])
    for name in names:
        await migrate(pool, name, ddl(name))
    try:
        yield names
    finally:
        for name in names:
            await pool.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@contextmanager
def statements_sent(conn: asyncpg.Connection) -> Iterator[list[str]]:
    """Every statement `conn` sends while the block runs, `BEGIN` and `COMMIT` too (asyncpg
    sends one statement per round trip)."""
    sent: list[str] = []

    def note(query: LoggedQuery) -> None:
        sent.append(query.query)

    conn.add_query_logger(note)
    try:
        yield sent
    finally:
        conn.remove_query_logger(note)


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int = 6) -> None:
    await ensure_topics(session_settings(bootstrap),
                        [TopicSpec(name=n, partitions=partitions) for n in names])


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[ConsumerRecord]], bool],
    timeout_s: float = 30.0,
) -> list[ConsumerRecord]:
    """Every record of `topic` from offset 0, read until `until(records)` holds."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, **kafka_options(),
                                       group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not until(records):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{topic}: condition not met with {len(records)} records")
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records


async def eventually(check: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Poll an async check until it returns truthy; fail with its last value."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: object = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()  # type: ignore[misc]
        if last:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout_s}s; last value {last!r}")


@asynccontextmanager
async def isolated_status_service(
    settings: CardDeskSettings, status_settings: StatusSettings, *, schema: str,
) -> AsyncIterator[tuple[Service[StatusSettings], httpx.AsyncClient, AIOKafkaProducer]]:
    """The status service in-process on its own `schema`, group and topics (`status_settings`
    prefixes them; created here and deleted afterwards), with an HTTP client on its query
    API and a producer for events."""
    topics = list(status_settings.consumed_topics().values())
    all_topics = [*topics, *(f"{t}.dlq" for t in topics)]
    await create_topics(settings.kafka_bootstrap, all_topics, partitions=settings.partitions)
    service = bootstrap(STATUS, status_settings, schema=schema,
                        group=f"carddesk-status-{schema}")
    app = query_app(service)
    producer = make_producer(settings)
    await producer.start()
    try:
        # The Starlette lifespan starts the runtime and the broker, as uvicorn would.
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            # Every request authenticates as the auditor; tests of the keys pass their own.
            async with httpx.AsyncClient(
                    transport=transport, base_url="http://status",
                    headers={"Authorization": f"Bearer {status_settings.caller_key()}"}) as http:
                yield service, http, producer
    finally:
        # Bounded, each step: a teardown that waits for ever hides the failure behind it.
        await stop_step("test producer", producer.stop())
        await stop_step("drop schema", drop_schema(settings, schema))
        await stop_step("delete topics", delete_topics(settings, all_topics))


async def drop_schema(settings: CardDeskSettings, schema: str) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def delete_topics(settings: CardDeskSettings, topics: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **kafka_options())
    await admin.start()
    try:
        await admin.delete_topics(list(topics))
    finally:
        await admin.close()


async def partitions_of(bootstrap: str, topics: Sequence[str]) -> list[TopicPartition]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_options())
    await admin.start()
    try:
        described = await admin.describe_topics(list(topics))
    finally:
        await admin.close()
    return [TopicPartition(d["topic"], p["partition"]) for d in described
            for p in d["partitions"]]


async def skip_history(bootstrap: str, group: str, topics: Sequence[str]) -> None:
    """Commit a fresh group's offsets at the ends of `topics`: a fresh group would read them
    from offset 0 and handle (and answer) other runs' messages, so the service under test
    sees only what its test sends."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await partitions_of(bootstrap, topics)
        consumer.assign(partitions)
        await consumer.commit(await consumer.end_offsets(partitions))
    finally:
        await consumer.stop()


class TopicTail:
    """Every record published on a topic from the moment `start` returns, collected in the
    background by a consumer of its own (no group, nothing committed)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.records: list[ConsumerRecord] = []
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(),
                                          group_id=None,
                                          enable_auto_commit=False)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        partitions = await partitions_of(self.bootstrap, [self.topic])
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the end offsets now, before anything is produced
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200)
            for records in batch.values():
                self.records.extend(records)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self._consumer.stop()


class RecordingProducer:
    """Stands in for the producer a refusal's reply goes through: what would have been sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def send_and_wait(self, topic: str, value: bytes, **_: object) -> None:
        self.sent.append((topic, value))


class OutboxRows:
    """A connection as the outbox relay uses it: `rows` to read, and whether it marked them
    sent."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows, self.marked = rows, False

    async def fetch(self, *_: Any) -> list[dict[str, Any]]:
        return self.rows

    async def execute(self, *_: Any) -> None:
        self.marked = True


class RecordingDeadLetters:
    """Stands in for the DLQ producer: what would have been dead-lettered, with the code."""

    def __init__(self) -> None:
        self.producer = RecordingProducer()
        self.sent: list[tuple[int, str]] = []

    async def send(self, msg: Inbound, code: str, reason: str) -> None:
        self.sent.append((msg.offset, code))


@asynccontextmanager
async def follower_paused(runtime: ServiceRuntime, topic: str) -> AsyncIterator[None]:
    """The service's subscriber of `topic` (with the other topics it consumes) stopped for
    the block, as a lagging or stopped follower would be; started again after it."""
    subscriber = next(s for s in runtime.broker.subscribers
                      if topic in getattr(s, "topic_names", ()))
    await subscriber.stop()
    try:
        yield
    finally:
        await subscriber.start()


async def until_consistent(send: Callable[[], Awaitable[dict[str, Any]]],
                           timeout_s: float = 60.0) -> dict[str, Any]:
    """Send (the same request) again while the reply is `not_yet_consistent`, as a channel
    does, until another reply comes or `timeout_s` runs out (then the last reply)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        reply = await send()
        if reply.get("code") != "not_yet_consistent" or (
                asyncio.get_running_loop().time() > deadline):
            return reply
        await asyncio.sleep(0.5)
