"""Idempotent consumption: dead letters, retries, and the event consumer every follower uses.

A consumer records what it processed in the same transaction as its effect; the Kafka offset
is committed by the subscriber only after `handle` returned, i.e. after that commit.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from shared.envelope import EventEnvelope, hash_is_intact
from shared.eventstore import ConcurrencyError
from shared.locks import citizen_namespace, lock_citizens
from shared.logging import bind_message_context

log = structlog.get_logger()

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.CannotConnectNowError,
    ConcurrencyError,
    KafkaError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class Inbound:
    """A Kafka record as the consumers see it, independent of the client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Any) -> Inbound:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value or b"",
            headers={k: bytes(v or b"") for k, v in (record.headers or ())},
        )

    def header(self, name: str) -> str | None:
        raw = self.headers.get(name)
        return raw.decode("utf-8", "replace") if raw is not None else None


class Rejected(Exception):  # noqa: N818 - a verdict on a message, not a program error
    """A message that can never be processed; it goes to the DLQ with this code and reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class DeadLetters:
    """Publishes unprocessable messages to `<topic>.dlq`, the reason and origin in headers."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer

    async def send(self, msg: Inbound, code: str, reason: str) -> None:
        headers = [
            *((k, v) for k, v in msg.headers.items() if not k.startswith("x-dlq-")),
            ("x-dlq-code", code.encode()),
            ("x-dlq-reason", reason[:1000].encode()),
            ("x-original-topic", msg.topic.encode()),
            ("x-original-partition", str(msg.partition).encode()),
            ("x-original-offset", str(msg.offset).encode()),
        ]
        await self.producer.send_and_wait(
            f"{msg.topic}.dlq", value=msg.value, key=msg.key, headers=headers
        )
        log.warning("message.dead_lettered", topic=msg.topic, partition=msg.partition,
                    offset=msg.offset, code=code, reason=reason[:200])


async def with_retries(
    msg: Inbound,
    process: Callable[[], Awaitable[None]],
    dead_letters: DeadLetters,
    *,
    max_attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
) -> None:
    """Run `process` until it succeeds. Infrastructure faults are retried without limit (the
    message must not be lost); anything else is retried `max_attempts` times, then DLQ'd."""
    attempt = 0
    while True:
        attempt += 1
        try:
            await process()
            return
        except Rejected as exc:
            await dead_letters.send(msg, exc.code, exc.reason)
            return
        except TRANSIENT_ERRORS as exc:
            log.warning("message.retrying", error=type(exc).__name__, attempt=attempt)
        except Exception as exc:
            if attempt >= max_attempts:
                log.exception("message.failed", attempt=attempt)
                await dead_letters.send(msg, "processing_failed", f"{type(exc).__name__}: {exc}")
                return
            log.warning("message.retrying", error=type(exc).__name__, attempt=attempt)
        await asyncio.sleep(min(max_delay, base_delay * 2 ** min(attempt, 8)))


def parse_event(msg: Inbound, known_types: Collection[str] | None) -> EventEnvelope:
    """Validate an event from a topic: JSON, envelope shape, intact hash, known type."""
    try:
        body = json.loads(msg.value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected("malformed_json", f"not JSON: {exc}") from exc
    except RecursionError as exc:  # deep nesting: json's own limit, not a passing fault
        raise Rejected("malformed_json", "not JSON: nested too deeply") from exc
    if not isinstance(body, dict):
        raise Rejected("malformed_event", "an event must be a JSON object")
    try:
        envelope = EventEnvelope.model_validate(body)
    except ValidationError as exc:
        raise Rejected("malformed_event", describe_validation_error(exc)) from exc
    if not hash_is_intact(body):
        raise Rejected("bad_hash", f"hash mismatch in {envelope.stream_id} v{envelope.version}")
    if known_types is not None and envelope.type not in known_types:
        raise Rejected("unknown_event_type", f"unknown event type {envelope.type!r}")
    return envelope


def describe_validation_error(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
    )


EventHandler = Callable[[asyncpg.Connection, EventEnvelope], Awaitable[None]]
# Applies several events of one partition, in order, as `EventHandler` would one by one.
BatchEventHandler = Callable[[asyncpg.Connection, Sequence[EventEnvelope]], Awaitable[None]]


def _bind_event(topic: str, envelope: EventEnvelope) -> None:
    bind_message_context(
        topic=topic,
        event_type=envelope.type,
        event_id=str(envelope.event_id),
        citizen_ref=envelope.citizen_ref,
        correlation_id=envelope.correlation_id,
        causation_id=envelope.causation_id,
    )


class EventConsumer:
    """Applies each event once: the `processed` row and the effect share one transaction,
    which holds the citizens' locks (`shared.locks`) so no command of the service decides
    on them half-way through."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        name: str,
        handler: EventHandler,
        dead_letters: DeadLetters,
        *,
        known_types: Collection[str] | None = None,
        max_attempts: int = 5,
        batch_handler: BatchEventHandler | None = None,
    ) -> None:
        self.pool = pool
        self.batch_handler = batch_handler
        self.schema = schema
        self.name = name
        self.handler = handler
        self.dead_letters = dead_letters
        self.known_types = known_types
        self.max_attempts = max_attempts

    async def handle(self, msg: Inbound) -> None:
        bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)

        async def process() -> None:
            envelope = parse_event(msg, self.known_types)
            _bind_event(msg.topic, envelope)
            await self.apply(envelope)

        await with_retries(msg, process, self.dead_letters, max_attempts=self.max_attempts)

    async def handle_batch(self, messages: Sequence[Inbound]) -> None:
        """One partition's records, in order, in one transaction: the processed rows in one
        statement, then the new events' effects (by `batch_handler` at once, if there is
        one). If anything in it fails, the transaction is rolled back and each record goes
        through `handle` alone (retries, DLQ) instead."""
        valid: list[tuple[Inbound, EventEnvelope]] = []
        for msg in messages:
            try:
                valid.append((msg, parse_event(msg, self.known_types)))
            except Rejected as exc:
                bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)
                await self.dead_letters.send(msg, exc.code, exc.reason)
        if not valid:
            return
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                fresh = set(await conn.fetchval(
                    f"WITH new AS (INSERT INTO {self.schema}.processed (consumer, message_id)"
                    " SELECT $1, id FROM unnest($2::text[]) AS id"
                    " ON CONFLICT DO NOTHING RETURNING message_id)"
                    " SELECT coalesce(array_agg(message_id), '{}') FROM new",
                    self.name,
                    [str(envelope.event_id) for _, envelope in valid],
                ))
                new: list[tuple[Inbound, EventEnvelope]] = []
                await lock_citizens(conn, citizen_namespace(self.schema),
                                    [envelope.citizen_ref for _, envelope in valid])
                for msg, envelope in valid:
                    event_id = str(envelope.event_id)
                    if event_id in fresh:
                        fresh.discard(event_id)  # a redelivered copy later in it is skipped
                        new.append((msg, envelope))
                if self.batch_handler is not None:
                    if new:
                        bind_message_context(topic=new[0][0].topic, events=len(new))
                        await self.batch_handler(conn, [envelope for _, envelope in new])
                    return
                for msg, envelope in new:
                    _bind_event(msg.topic, envelope)
                    await self.handler(conn, envelope)
        except Exception as exc:
            log.info("batch.replayed_one_by_one", error=type(exc).__name__, size=len(valid))
            for msg, _ in valid:
                await self.handle(msg)

    async def apply(self, envelope: EventEnvelope) -> bool:
        """Apply one event unless already applied; True when it had an effect."""
        async with self.pool.acquire() as conn, conn.transaction():
            first_time = await conn.fetchval(
                f"INSERT INTO {self.schema}.processed (consumer, message_id) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                self.name,
                str(envelope.event_id),
            )
            if not first_time:
                log.debug("event.duplicate_skipped")
                return False
            await lock_citizens(conn, citizen_namespace(self.schema), [envelope.citizen_ref])
            await self.handler(conn, envelope)
            return True
