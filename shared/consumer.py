"""Idempotent consumption: dead letters, retries, and the event consumer every follower uses.

A consumer records what it processed in the same transaction as its effect; the Kafka offset
is committed by the subscriber only after `handle` returned, i.e. after that commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar

import asyncpg
import orjson
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from opentelemetry import trace
from opentelemetry.trace import Span
from pydantic import ValidationError

from shared import checked
from shared.chain import ChainBreak, ChainView, FollowedChains, judge
from shared.checked import Bookkeeping, CheckedFollow
from shared.envelope import EventEnvelope, canonical_bytes, hash_is_intact
from shared.eventstore import ConcurrencyError, holding_appends
from shared.idempotency import ProcessedMessages
from shared.locks import citizen_namespace, lock_citizens
from shared.logging import bind_message_context
from shared.metrics import CHECKED_WRITES, DEAD_LETTERS, EVENTS_APPLIED
from shared.settings import CardDeskSettings
from shared.tracing import start_span, trace_id_in

log = structlog.get_logger()

E = TypeVar("E")
M = TypeVar("M")  # what travels beside an event (its message, or nothing)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    # The server going away: crash or admin shutdown of a backend, recovery in progress.
    asyncpg.exceptions.OperatorInterventionError,
    ConcurrencyError,
    KafkaError,
    TimeoutError,
)


# Faults of the message's bytes, not of the infrastructure: the same on every attempt.
UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    RecursionError, UnicodeError, json.JSONDecodeError, ValidationError,
)


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """What a message may be before it is parsed at all (CARDDESK_MAX_MESSAGE_BYTES,
    CARDDESK_MAX_JSON_DEPTH): a larger or deeper one is dead-lettered unread."""

    max_bytes: int = 256 * 1024
    max_depth: int = 32

    @classmethod
    def from_settings(cls, settings: CardDeskSettings) -> MessageLimits:
        return cls(settings.max_message_bytes, settings.max_json_depth)


@dataclass(frozen=True, slots=True)
class Inbound:
    """A Kafka record as the consumers see it, independent of the client library."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes] = field(default_factory=dict)
    # The record's Kafka timestamp (ms since the epoch), where command latency starts.
    timestamp_ms: int | None = None

    @classmethod
    def from_record(cls, record: Any) -> Inbound:
        return cls(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            value=record.value or b"",
            headers={k: bytes(v or b"") for k, v in (record.headers or ())},
            timestamp_ms=getattr(record, "timestamp", None),
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


# A dead letter keeps at most this much of the value: the producer refuses records over
# 1 MiB, and a refused DLQ write would be retried for ever, stalling the partition.
DLQ_MAX_VALUE_BYTES = 512 * 1024


class DeadLetters:
    """Publishes unprocessable messages to `<topic>.dlq`, the reason and origin in headers,
    and the consumer group that gave up on it (`x-dlq-consumer`): a topic has several."""

    def __init__(self, producer: AIOKafkaProducer, consumer: str | None = None) -> None:
        self.producer = producer
        self.consumer = consumer

    async def send(self, msg: Inbound, code: str, reason: str) -> None:
        value, truncated = msg.value[:DLQ_MAX_VALUE_BYTES], len(msg.value) > DLQ_MAX_VALUE_BYTES
        headers = [
            *((k, v) for k, v in msg.headers.items() if not k.startswith("x-dlq-")),
            ("x-dlq-code", code.encode()),
            ("x-dlq-reason", reason[:1000].encode()),
            ("x-original-topic", msg.topic.encode()),
            ("x-original-partition", str(msg.partition).encode()),
            ("x-original-offset", str(msg.offset).encode()),
            *([("x-dlq-consumer", self.consumer.encode())] if self.consumer else []),
            *([("x-dlq-original-size", str(len(msg.value)).encode())] if truncated else []),
        ]
        await self.producer.send_and_wait(
            f"{msg.topic}.dlq", value=value, key=(msg.key or b"")[:1024] or None,
            headers=headers,
        )
        DEAD_LETTERS.labels(msg.topic, code).inc()
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
    message must not be lost); a message the code cannot read (`Rejected`, or a parsing or
    validation error that escaped as such) is dead-lettered at once, since a retry reads the
    same bytes; anything else is retried until it failed `max_attempts` times in a row, then
    DLQ'd. An infrastructure fault in between starts that count again: an outage's odd
    errors (a client in a broken state, say) are not the message's fault."""
    attempt = failures = 0
    while True:
        attempt += 1
        try:
            await process()
            return
        except Rejected as exc:
            await dead_letters.send(msg, exc.code, exc.reason)
            return
        except TRANSIENT_ERRORS as exc:
            failures = 0
            log.warning("message.retrying", error=type(exc).__name__, attempt=attempt)
        except UNREADABLE_ERRORS as exc:
            await dead_letters.send(msg, "unreadable", f"{type(exc).__name__}: {exc}"[:500])
            return
        except Exception as exc:
            failures += 1
            if failures >= max_attempts:
                log.exception("message.failed", attempt=attempt)
                await dead_letters.send(msg, "processing_failed", f"{type(exc).__name__}: {exc}")
                return
            log.warning("message.retrying", error=type(exc).__name__, attempt=attempt)
        await asyncio.sleep(min(max_delay, base_delay * 2 ** min(attempt, 8)))


def load_json(value: bytes, limits: MessageLimits) -> Any:
    """JSON from an untrusted message, within `limits`. Raises `Rejected` and nothing else:
    too large, too deep, not UTF-8, not JSON."""
    if len(value) > limits.max_bytes:
        raise Rejected("message_too_large",
                       f"{len(value)} bytes; at most {limits.max_bytes} are read")
    try:
        body = json.loads(value)
    except RecursionError as exc:  # the parser's own limit, far above ours
        raise Rejected("too_deeply_nested", "JSON nested too deeply") from exc
    except UnicodeError as exc:
        raise Rejected("malformed_json", f"not JSON: not UTF-8 ({str(exc)[:200]})") from exc
    except ValueError as exc:
        raise Rejected("malformed_json", f"not JSON: {str(exc)[:200]}") from exc
    if _depth_exceeds(body, limits.max_depth):
        raise Rejected("too_deeply_nested", f"JSON nested deeper than {limits.max_depth}")
    return body


def _may_nest_deeper(value: bytes, max_depth: int) -> bool:
    """Whether the JSON text `value` has more opening brackets than `max_depth` (counted at
    C speed, those inside strings too): with no more, it cannot nest deeper, and the walk of
    `_depth_exceeds` is not needed."""
    return value.count(b"{") + value.count(b"[") > max_depth


def _depth_exceeds(body: Any, max_depth: int) -> bool:
    """Whether containers nest deeper than `max_depth` (walked without recursion)."""
    pending: list[tuple[Any, int]] = [(body, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return True
        pending.extend((child, depth + 1) for child in children
                       if isinstance(child, dict | list))
    return False


def parse_event(msg: Inbound, known_types: Collection[str] | None,
                limits: MessageLimits | None = None) -> EventEnvelope:
    """Validate an event from a topic: size, depth, JSON, envelope shape, intact hash, known
    type. Whatever is wrong with the bytes raises `Rejected`, never anything else, so a
    poison message is dead-lettered on its first reading.

    orjson reads first: what passes every check there is taken; anything else (including
    where its bytes could differ from `canonical_json`'s) is judged again over the exact
    canonical bytes, and the refusals are that path's own."""
    limits = limits or MessageLimits()
    return _parse_fast(msg.value, known_types, limits) or _parse_exact(msg, known_types, limits)


def _parse_fast(value: bytes, known_types: Collection[str] | None,
                limits: MessageLimits) -> EventEnvelope | None:
    """The event, if it passes every check of `_parse_exact` on orjson; else None."""
    if len(value) > limits.max_bytes:
        return None
    try:
        body = orjson.loads(value)
        if not isinstance(body, dict) or (
                _may_nest_deeper(value, limits.max_depth)
                and _depth_exceeds(body, limits.max_depth)):
            return None
        envelope = EventEnvelope.model_validate(body)
        rest = {k: v for k, v in body.items() if k != "hash"}
        digest = hashlib.sha256(envelope.prev_hash.encode("ascii") + canonical_bytes(rest))
    except (ValueError, TypeError, RecursionError):  # orjson's and pydantic's errors too
        return None
    if body["hash"] != digest.hexdigest():
        return None
    if known_types is not None and envelope.type not in known_types:
        return None
    return envelope


def _parse_exact(msg: Inbound, known_types: Collection[str] | None,
                 limits: MessageLimits) -> EventEnvelope:
    body = load_json(msg.value, limits)
    if not isinstance(body, dict):
        raise Rejected("malformed_event", "an event must be a JSON object")
    try:
        envelope = EventEnvelope.model_validate(body)
        intact = hash_is_intact(body)
    except ValidationError as exc:
        raise Rejected("malformed_event", describe_validation_error(exc)) from exc
    except (ValueError, TypeError, RecursionError) as exc:
        raise Rejected("malformed_event", f"{type(exc).__name__}: {str(exc)[:200]}") from exc
    if not intact:
        raise Rejected("bad_hash", f"hash mismatch in {envelope.stream_id} v{envelope.version}")
    if known_types is not None and envelope.type not in known_types:
        raise Rejected("unknown_event_type", f"unknown event type {envelope.type!r}")
    return envelope


def decode_followed(decode: Callable[[EventEnvelope], E], envelope: EventEnvelope) -> E:
    """A followed event as its typed model; data that does not fit it is `invalid_event_data`
    (dead-lettered, never retried)."""
    try:
        return decode(envelope)
    except ValidationError as exc:
        raise Rejected("invalid_event_data", describe_validation_error(exc)) from exc


def describe_validation_error(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
    )


EventHandler = Callable[[asyncpg.Connection, EventEnvelope], Awaitable[None]]
# Applies several events of one partition, in order, as `EventHandler` would one by one.
BatchEventHandler = Callable[[asyncpg.Connection, Sequence[EventEnvelope]], Awaitable[None]]


class Erasures(Protocol):
    """The citizens whose followed events change nothing here: erased in this service
    (`shared.application.Streams`)."""

    def stream_id(self, citizen_ref: str) -> str: ...

    async def erased_among(self, conn: asyncpg.Connection, citizen_refs: Collection[str],
                           heads: Mapping[str, tuple[int, str]] | None = None) -> set[str]:
        """Those of `citizen_refs` erased here; `heads`: their streams' heads, when the
        caller has just read them under the citizens' locks."""
        ...


def _bind_event(topic: str, envelope: EventEnvelope) -> None:
    bind_message_context(
        topic=topic,
        event_type=envelope.type,
        event_id=str(envelope.event_id),
        citizen_ref=envelope.citizen_ref,
        correlation_id=envelope.correlation_id,
        causation_id=envelope.causation_id,
    )


class BatchConsumer(Protocol):
    """What a subscription feeds (`ServiceRuntime.subscribe`): one record, or a topic's
    records of one fetch at once (of one or more partitions, each partition's in order);
    either returns once they are processed for good."""

    async def handle(self, msg: Inbound) -> None: ...

    async def handle_batch(self, messages: Sequence[Inbound]) -> None: ...


Parsed = tuple[Inbound, EventEnvelope]
# A batch's events applied for the first time, and those that break their chains.
Outcome = tuple[list[Parsed], list[tuple[Inbound, ChainBreak]]]


def _bind_batch(new: Sequence[Parsed]) -> None:
    """The log context of applying `new`: the event's, or the topic and how many."""
    if len(new) == 1:
        _bind_event(new[0][0].topic, new[0][1])
    elif new:
        bind_message_context(topic=new[0][0].topic, events=len(new))


def _new_among(parsed: Sequence[Parsed], taken: Sequence[EventEnvelope],
               fresh: Collection[str]) -> list[Parsed]:
    """The `taken` events of `parsed` whose ids are `fresh` (not processed before), each
    once (a redelivered copy later in the batch is skipped)."""
    chained = {id(envelope) for envelope in taken}
    seen: set[str] = set()
    new: list[Parsed] = []
    for msg, envelope in parsed:
        event_id = str(envelope.event_id)
        if id(envelope) in chained and event_id not in seen and event_id in fresh:
            seen.add(event_id)
            new.append((msg, envelope))
    return new


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
        settings: CardDeskSettings,
        known_types: Collection[str] | None = None,
        batch_handler: BatchEventHandler | None = None,
        on_applied: Callable[[Sequence[Parsed]], None] | None = None,
        log_applied: bool = False,
        erased: Erasures | None = None,
        checked: CheckedFollow | None = None,
    ) -> None:
        """`on_applied` hears of the events applied for the first time, after their commit;
        with `log_applied`, each commit is logged with the trace ids of its events. Events
        about citizens `erased` names are recorded as processed and change nothing (one
        lookup per transaction, under the citizens' lock: their streams' heads come with the
        locked chain view). With `checked` (and no `erased`), a batch is first tried in two
        statements (`shared.checked`), then the locked way."""
        self.erased = erased
        self.checked = checked if erased is None else None
        self.on_applied = on_applied
        self.log_applied = log_applied
        self.pool = pool
        self.limits = MessageLimits.from_settings(settings)
        self.max_attempts = settings.consumer_max_attempts
        self.batch_handler = batch_handler
        self.schema = schema
        self.name = name
        self.handler = handler
        self.dead_letters = dead_letters
        self.known_types = known_types
        self.processed = ProcessedMessages(schema, name)
        self.chains = FollowedChains(schema, follower_retention(settings))

    async def handle(self, msg: Inbound) -> None:
        """One record: the batch path, for a batch of one."""
        bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)
        await self.handle_batch([msg])

    async def handle_batch(self, messages: Sequence[Inbound]) -> None:
        """A fetch's records of one topic, each partition's in order (a citizen's events
        share a partition), in one transaction: lock the citizens, read the chains (one
        statement), judge them, record the taken chain rows and the processed rows (one
        statement), then the new events' effects (by `batch_handler` at once, if there is
        one). Events that break their chains are dead-lettered once it committed.
        If anything in it fails, the transaction is rolled back and each record goes through
        `handle_alone` (retries, DLQ) instead."""
        parsed = await self._readable(messages)
        if parsed:
            await self._handle_parsed(parsed)

    @staticmethod
    async def handle_together(batches: Sequence[tuple[EventConsumer, Sequence[Inbound]]],
                              ) -> None:
        """Several followers' records of one fetch (followers of one schema, each its own
        topic) in one transaction, as `handle_batch` handles one's: one lock statement and
        one chain read for all, then each follower's processed rows and effects. If anything
        in it fails, it is rolled back and each follower's records go through
        `handle_batch` instead."""
        readable: list[tuple[EventConsumer, list[Parsed]]] = []
        for consumer, messages in batches:
            parsed = await consumer._readable(messages)
            if parsed:
                readable.append((consumer, parsed))
        if len(readable) <= 1 or len({consumer.schema for consumer, _ in readable}) > 1:
            for consumer, parsed in readable:  # one schema, one lock namespace, or apart
                await consumer._handle_parsed(parsed)
            return
        first = readable[0][0]
        try:
            outcomes = await EventConsumer._apply_checked(readable)
            if outcomes is None:
                async with first.pool.acquire() as conn, conn.transaction():
                    view = await first._locked_view(
                        conn, [envelope for _, parsed in readable for _, envelope in parsed])
                    # The heads were read before any part's effects: the first part's.
                    outcomes = [await consumer._take_and_apply(conn, parsed, view,
                                                               own_heads=index == 0)
                                for index, (consumer, parsed) in enumerate(readable)]
        except Exception as exc:
            log.info("batch.replayed_by_topic", error=type(exc).__name__,
                     size=sum(len(parsed) for _, parsed in readable))
            for consumer, parsed in readable:
                await consumer._handle_parsed(parsed)
            return
        for (consumer, _), (new, breaks) in zip(readable, outcomes, strict=True):
            await consumer._settle(new, breaks)

    async def _handle_parsed(self, parsed: Sequence[Parsed]) -> None:
        try:
            new, breaks = await self._apply_batch(parsed)
        except Exception as exc:
            # Nothing was dead-lettered for this batch yet: `handle_alone` judges each again.
            log.info("batch.replayed_one_by_one", error=type(exc).__name__, size=len(parsed))
            for msg, _ in parsed:
                await self.handle_alone(msg)
            return
        await self._settle(new, breaks)

    async def _settle(self, new: Sequence[Parsed],
                      breaks: Sequence[tuple[Inbound, ChainBreak]]) -> None:
        """After the commit: dead-letter the breaks, count (and log) the applied events."""
        for msg, broken in breaks:
            bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)
            await self.dead_letters.send(msg, "broken_chain", str(broken))
        self._applied(new)

    async def handle_alone(self, msg: Inbound) -> None:
        """One record with retries: its chain row in a transaction of its own, so that an
        event whose effect fails for good still anchors the next; then its effect."""
        bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)

        async def process() -> None:
            envelope = parse_event(msg, self.known_types, self.limits)
            _bind_event(msg.topic, envelope)
            async with self.pool.acquire() as conn, conn.transaction():
                verdicts = await self.chains.take(conn, [envelope])
            if verdicts.breaks:
                raise Rejected("broken_chain", str(verdicts.breaks[0]))
            if verdicts.settled:
                log.debug("event.settled_skipped")
                return
            with trace.use_span(self._span(msg, envelope), end_on_exit=True):
                if await self.apply(envelope):
                    self._applied([(msg, envelope)])

        await with_retries(msg, process, self.dead_letters, max_attempts=self.max_attempts)

    async def _readable(self, messages: Sequence[Inbound]) -> list[Parsed]:
        """The messages that parse as events; the others are dead-lettered."""
        parsed: list[Parsed] = []
        for msg in messages:
            try:
                parsed.append((msg, parse_event(msg, self.known_types, self.limits)))
            except Rejected as exc:
                bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)
                await self.dead_letters.send(msg, exc.code, exc.reason)
        return parsed

    async def _apply_batch(self, parsed: Sequence[Parsed]) -> Outcome:
        """In one transaction (or one checked statement): the events not processed before
        that continue their chains, applied; those events, and the breaks (not dead-lettered
        yet)."""
        outcomes = await self._apply_checked([(self, parsed)])
        if outcomes is not None:
            return outcomes[0]
        async with self.pool.acquire() as conn, conn.transaction():
            view = await self._locked_view(conn, [envelope for _, envelope in parsed])
            return await self._take_and_apply(conn, parsed, view)

    @staticmethod
    async def _apply_checked(readable: Sequence[tuple[EventConsumer, Sequence[Parsed]]],
                             ) -> list[Outcome] | None:
        """The batches of followers that share one checked writer, in two statements: an
        unlocked read, then the writer's checked call (`shared.checked`). None when they do
        not share one, when an event seems to break its chain (only a locked read may say
        so), or when the check found that another writer got there first: the caller then
        goes the locked way."""
        first = readable[0][0]
        if first.checked is None or any(
                consumer.checked is None or consumer.checked.writer is not first.checked.writer
                for consumer, _ in readable):
            return None
        writer = first.checked.writer
        envelopes = [envelope for _, parsed in readable for _, envelope in parsed]
        async with first.pool.acquire() as conn:
            found = await checked.read(
                conn, writer, first.chains.settled_after, envelopes,
                [(consumer.name, str(envelope.event_id))
                 for consumer, parsed in readable for _, envelope in parsed])
            recorded = set(found.view.known)  # before judging adds the events taken
            outcomes: list[Outcome] = []
            batches: list[tuple[str, list[EventEnvelope]]] = []
            processed: list[tuple[str, str]] = []
            chained: list[EventEnvelope] = []
            for consumer, parsed in readable:
                assert consumer.checked is not None
                verdicts = judge([envelope for _, envelope in parsed], found.view)
                if verdicts.breaks:
                    return None
                if verdicts.settled:
                    log.debug("events.settled_skipped", count=len(verdicts.settled))
                fresh = {event_id for envelope in verdicts.taken
                         if (consumer.name, event_id := str(envelope.event_id))
                         not in found.processed}
                new = _new_among(parsed, verdicts.taken, fresh)
                outcomes.append((new, []))
                batches.append((consumer.checked.topic, [envelope for _, envelope in new]))
                processed.extend((consumer.name, str(envelope.event_id)) for _, envelope in new)
                chained.extend(envelope for envelope in verdicts.taken
                               if (envelope.stream_id, envelope.version) not in recorded)
            if not processed and not chained:  # redeliveries only: nothing to write
                return outcomes
            new_events = [item for new, _ in outcomes for item in new]
            _bind_batch(new_events)
            spans = [consumer._span(msg, envelope) for (consumer, _), (new, _) in
                     zip(readable, outcomes, strict=True) for msg, envelope in new]
            try:
                applied = await writer.apply_checked(
                    conn, citizen_namespace(first.schema), found, batches,
                    Bookkeeping.of(found, processed, chained))
            except asyncpg.exceptions.SerializationError:
                applied = False
            finally:
                for span in spans:
                    span.end()
        for consumer, _ in readable:
            CHECKED_WRITES.labels(consumer.name, "applied" if applied else "missed").inc()
        if not applied:
            log.info("batch.checked_write_missed", size=len(envelopes))
            return None
        return outcomes

    async def _locked_view(self, conn: asyncpg.Connection,
                           envelopes: Sequence[EventEnvelope]) -> ChainView:
        """The citizens' lock, then what `followed_chain` holds about `envelopes` (and the
        heads of the citizens' streams here, for the erasure check)."""
        own = ([self.erased.stream_id(ref) for ref in {e.citizen_ref for e in envelopes}]
               if self.erased is not None else [])
        return await self.chains.locked_view(conn, citizen_namespace(self.schema), envelopes,
                                             own)

    async def _take_and_apply(
        self, conn: asyncpg.Connection, parsed: Sequence[Parsed], view: ChainView,
        *, own_heads: bool = True,
    ) -> Outcome:
        """Under the lock: judge the chains, record the taken, apply the new (whatever
        their effects append to this schema's streams written in one statement). With
        `own_heads`, the erasure check takes the heads the view read."""
        verdicts = judge([envelope for _, envelope in parsed], view)
        broken = {id(b.envelope): b for b in verdicts.breaks}
        if verdicts.settled:
            log.debug("events.settled_skipped", count=len(verdicts.settled))
        fresh = await self.processed.new_of(
            conn, [str(envelope.event_id) for envelope in verdicts.taken], verdicts.taken,
        ) if verdicts.taken else set()
        new = _new_among(parsed, verdicts.taken, fresh)
        with holding_appends(conn, self.schema) as held:
            await self._effects(conn, new, view.own_heads if own_heads else None)
            await held.flush()
        return new, [(msg, broken[id(envelope)]) for msg, envelope in parsed
                     if id(envelope) in broken]

    async def _effects(self, conn: asyncpg.Connection, new: Sequence[Parsed],
                       heads: Mapping[str, tuple[int, str]] | None) -> None:
        """The effects of `new` events: by `batch_handler` at once, else one by one; none
        for events about citizens erased here (`heads`: their streams', if just read)."""
        new = await self._unless_erased(conn, new, heads)
        if not new:
            return
        if self.batch_handler is None:
            for msg, envelope in new:
                _bind_event(msg.topic, envelope)
                with trace.use_span(self._span(msg, envelope), end_on_exit=True):
                    await self.handler(conn, envelope)
            return
        _bind_batch(new)
        spans = [self._span(msg, envelope) for msg, envelope in new]
        try:
            await self.batch_handler(conn, [envelope for _, envelope in new])
        finally:
            for span in spans:
                span.end()

    def _span(self, msg: Inbound, envelope: EventEnvelope) -> Span:
        """The span of applying one event: a child of the trace its message carries."""
        return start_span(f"{envelope.type} apply", msg.headers, {
            "messaging.system": "kafka", "messaging.destination.name": msg.topic,
            "messaging.consumer.group.name": self.name, "carddesk.event.type": envelope.type})

    def _applied(self, applied: Sequence[Parsed]) -> None:
        """Count (and log) the events applied for the first time."""
        if not applied:
            return
        EVENTS_APPLIED.labels(self.name, applied[0][0].topic).inc(len(applied))
        if self.log_applied:  # one line per transaction, not per event: cheap under load
            log.info("events.applied", consumer=self.name, topic=applied[0][0].topic,
                     count=len(applied),
                     event_types=sorted({envelope.type for _, envelope in applied}),
                     trace_ids=list(dict.fromkeys(
                         t for t in (trace_id_in(msg.headers) for msg, _ in applied) if t)))
        if self.on_applied is not None:
            self.on_applied(applied)

    async def apply(self, envelope: EventEnvelope) -> bool:
        """Apply one event unless already applied; True when it had an effect."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await self.processed.first_time(conn, str(envelope.event_id)):
                log.debug("event.duplicate_skipped")
                return False
            await lock_citizens(conn, citizen_namespace(self.schema), [envelope.citizen_ref])
            if await self._unless_erased(conn, [(None, envelope)]):
                await self.handler(conn, envelope)
            return True

    async def _unless_erased(self, conn: asyncpg.Connection,
                             events: Sequence[tuple[M, EventEnvelope]],
                             heads: Mapping[str, tuple[int, str]] | None = None,
                             ) -> Sequence[tuple[M, EventEnvelope]]:
        """`events` but those about citizens erased here, which change nothing (logged, so an
        operator sees why)."""
        if self.erased is None or not events:
            return events
        erased = await self.erased.erased_among(
            conn, {envelope.citizen_ref for _, envelope in events}, heads)
        if not erased:
            return events
        kept: list[tuple[M, EventEnvelope]] = []
        for item in events:
            if item[1].citizen_ref in erased:
                log.info("follower.ignored_for_erased_subject", schema=self.schema,
                         event_type=item[1].type)
            else:
                kept.append(item)
        return kept


def follower_retention(settings: CardDeskSettings) -> timedelta:
    """How long followers keep their record of each event (`CARDDESK_FOLLOWER_RETENTION_HOURS`)."""
    return timedelta(hours=settings.follower_retention_hours)


async def purge_bookkeeping(pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
                            ) -> tuple[int, int]:
    """Forget what the followers of `schema` took longer ago than their retention: the
    `processed` rows and the `followed_chain` rows but each stream's last (a redelivery
    that old is settled by the chain alone, `shared.chain`); returns how many of each went."""
    retention = follower_retention(settings)
    processed = await ProcessedMessages.purge(pool, schema, retention)
    chained = await FollowedChains(schema, retention).purge(pool)
    if processed or chained:
        log.info("followers.bookkeeping_purged", schema=schema, processed=processed,
                 chain_rows=chained)
    return processed, chained


async def purge_bookkeeping_loop(pool: asyncpg.Pool, schema: str,
                                 settings: CardDeskSettings) -> None:
    """`purge_bookkeeping` every quarter of the retention (at most every hour), for ever."""
    interval = min(3600.0, follower_retention(settings).total_seconds() / 4)
    while True:
        await purge_bookkeeping(pool, schema, settings)
        await asyncio.sleep(interval)
