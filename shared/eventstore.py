"""Event stores: append with an expected version, read a stream, read everything in order.

The PostgreSQL store writes the events and their outbox rows in the caller's transaction,
so a state change and its publication commit together (DESIGN section 9).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg

from shared.chain import chain_ddl
from shared.envelope import GENESIS_HASH, EventEnvelope, PendingEvent
from shared.metrics import EVENTS_APPENDED
from shared.outbox import OutboxMessage, notify_channel, outbox_columns, outbox_insert
from shared.tracing import traceparent_header


class ConcurrencyError(Exception):
    """Another writer appended to the stream since it was read."""

    code = "concurrent_modification"

    def __init__(self, stream_id: str, expected: int, actual: int | None = None) -> None:
        super().__init__(f"stream {stream_id}: expected version {expected}, found {actual}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class HeldAppendsConflictError(ConcurrencyError):
    """A batch of held appends (`HeldAppends`) met another writer, or a base rolled
    back, when it was written. Its outbox rows were not written; events of other streams
    may have been, so the transaction must be rolled back."""

    def __init__(self) -> None:
        Exception.__init__(self, "held appends: a stream moved on before they were written")
        self.stream_id, self.expected, self.actual = "", 0, None


@dataclass(frozen=True, slots=True)
class AlsoWritten:
    """What a statement that appends writes besides the events: one more `INSERT` (`sql`
    gives it with its parameters numbered from the one it is passed) and outbox messages,
    queued after the events' so the relay sends them after the events."""

    sql: Callable[[int], str]
    arguments: tuple[Any, ...]
    messages: Sequence[OutboxMessage] = ()


@dataclass(slots=True)
class HeldAppends:
    """A command batch's appends to one schema, held until `flush` writes them in one
    statement, with their outbox rows, before the batch's replies.

    While they are held, the schema's store on `conn` reads each stream with them (head,
    heads, read_stream), so a later command of the batch decides on what an earlier one
    appended. Each stream's first held append names the base it continues; `flush` keeps
    nothing unless every base is still its stream's committed head (the same proof a single
    append gives), so a conflict is a `HeldAppendsConflictError` for the whole batch."""

    conn: asyncpg.Connection
    schema: str
    bases: dict[str, tuple[int, str]] = field(default_factory=dict)
    streams: dict[str, list[EventEnvelope]] = field(default_factory=dict)
    sealed: list[EventEnvelope] = field(default_factory=list)  # in the order appended
    messages: list[OutboxMessage] = field(default_factory=list)

    def holds(self, store: PostgresEventStore) -> bool:
        return store.conn is self.conn and store.schema == self.schema

    def head(self, stream_id: str) -> tuple[int, str] | None:
        held = self.streams.get(stream_id)
        return (held[-1].version, held[-1].hash) if held else None

    def hold(self, stream_id: str, base: tuple[int, str], sealed: Sequence[EventEnvelope],
             messages: Sequence[OutboxMessage]) -> None:
        self.bases.setdefault(stream_id, base)
        self.streams.setdefault(stream_id, []).extend(sealed)
        self.sealed.extend(sealed)
        self.messages.extend(messages)

    async def flush(self, also: AlsoWritten | None = None) -> None:
        """Write every held event and its outbox row in one statement, with `also` (written
        even when nothing is held); a `HeldAppendsConflictError` when a base is no longer its
        stream's head (the caller rolls back: events of other streams, and `also`, may have
        been written)."""
        if not self.sealed and also is None:
            return
        await insert_events(self.conn, self.schema, self.sealed, self.messages, self.bases,
                            conflict=HeldAppendsConflictError(), also=also)
        self.bases, self.streams, self.sealed, self.messages = {}, {}, [], []


_held_appends: ContextVar[HeldAppends | None] = ContextVar("held_appends", default=None)


@contextlib.contextmanager
def holding_appends(conn: asyncpg.Connection, schema: str) -> Iterator[HeldAppends]:
    """Hold the appends the code inside makes to `schema` on `conn` until the caller's
    `flush` (see `HeldAppends`)."""
    held = HeldAppends(conn, schema)
    token = _held_appends.set(held)
    try:
        yield held
    finally:
        _held_appends.reset(token)


class EventStore(Protocol):
    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[EventEnvelope]:
        ...

    async def head(self, stream_id: str) -> tuple[int, str]:
        """The stream's last version and hash (0 and the genesis hash when it is empty)."""
        ...

    async def heads(self, stream_ids: Collection[str]) -> dict[str, tuple[int, str]]:
        """`head` of each of `stream_ids`, at once."""
        ...

    async def append(
        self, stream_id: str, expected_version: int, events: Sequence[PendingEvent],
        *, last_hash: str | None = None,
    ) -> list[EventEnvelope]: ...

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[EventEnvelope]: ...


def seal_all(
    stream_id: str, expected_version: int, last_hash: str, events: Sequence[PendingEvent]
) -> list[EventEnvelope]:
    sealed: list[EventEnvelope] = []
    prev = last_hash
    for offset, pending in enumerate(events, start=1):
        envelope = EventEnvelope.seal(pending, stream_id, expected_version + offset, prev)
        sealed.append(envelope)
        prev = envelope.hash
    return sealed


class InMemoryEventStore:
    """The same contract as the PostgreSQL store, for deciders' and handlers' unit tests."""

    def __init__(self) -> None:
        self._streams: dict[str, list[EventEnvelope]] = {}
        self._log: list[EventEnvelope] = []

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[EventEnvelope]:
        return list(self._streams.get(stream_id, [])[after_version:])

    async def head(self, stream_id: str) -> tuple[int, str]:
        stream = self._streams.get(stream_id)
        return (len(stream), stream[-1].hash) if stream else (0, GENESIS_HASH)

    async def heads(self, stream_ids: Collection[str]) -> dict[str, tuple[int, str]]:
        return {stream_id: await self.head(stream_id) for stream_id in stream_ids}

    async def append(
        self, stream_id: str, expected_version: int, events: Sequence[PendingEvent],
        *, last_hash: str | None = None,
    ) -> list[EventEnvelope]:
        stream = self._streams.setdefault(stream_id, [])
        actual_hash = stream[-1].hash if stream else GENESIS_HASH
        if len(stream) != expected_version or last_hash not in (None, actual_hash):
            raise ConcurrencyError(stream_id, expected_version, len(stream))
        sealed = seal_all(stream_id, expected_version, actual_hash, events)
        stream.extend(sealed)
        self._log.extend(sealed)
        return sealed

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[EventEnvelope]:
        return self._log[after_position : after_position + limit]


def schema_ddl(schema: str) -> str:
    """The tables every service schema has: events, outbox, processed messages, stored replies."""
    return f"""
    CREATE SCHEMA IF NOT EXISTS {schema};
    CREATE TABLE IF NOT EXISTS {schema}.events (
        position     bigserial PRIMARY KEY,
        stream_id    text        NOT NULL,
        version      integer     NOT NULL CHECK (version > 0),
        event_id     uuid        NOT NULL UNIQUE,
        type         text        NOT NULL,
        citizen_ref  text        NOT NULL,
        occurred_at  timestamptz NOT NULL,
        hash         text        NOT NULL,
        body         text        NOT NULL,
        UNIQUE (stream_id, version)
    );
    CREATE TABLE IF NOT EXISTS {schema}.outbox (
        position   bigserial PRIMARY KEY,
        topic      text        NOT NULL,
        key        bytea,
        value      bytea       NOT NULL,
        headers    jsonb       NOT NULL DEFAULT '[]',
        created_at timestamptz NOT NULL DEFAULT now(),
        sent_at    timestamptz
    );
    CREATE INDEX IF NOT EXISTS outbox_unsent ON {schema}.outbox (position) WHERE sent_at IS NULL;
    -- No statement filters on the payloads, and the others need little: ANALYZE samples
    -- 300 rows per point of the largest target, and at the default (100) autovacuum's
    -- analyze of a busy outbox read 30,000 rows' payloads, 1.05-1.45 s each time;
    -- with these, 53-59 ms (README, Performance).
    ALTER TABLE {schema}.outbox ALTER COLUMN key SET STATISTICS 0,
        ALTER COLUMN value SET STATISTICS 0, ALTER COLUMN headers SET STATISTICS 0,
        ALTER COLUMN position SET STATISTICS 10, ALTER COLUMN topic SET STATISTICS 10,
        ALTER COLUMN created_at SET STATISTICS 10, ALTER COLUMN sent_at SET STATISTICS 10;
    -- Sent replies carry captcha codes and session tokens: purged soon, not after a day.
    CREATE INDEX IF NOT EXISTS outbox_replies ON {schema}.outbox (position)
        WHERE topic LIKE 'channel.replies.%';
    CREATE TABLE IF NOT EXISTS {schema}.processed (
        consumer     text        NOT NULL,
        message_id   text        NOT NULL,
        processed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, message_id)
    );
    {chain_ddl(schema)}
    -- Replies keyed by request id alone, before channels had their own: superseded.
    DROP TABLE IF EXISTS {schema}.replies;
    -- The reply each (channel, request_id) got, sealed; purged after the freshness window.
    CREATE TABLE IF NOT EXISTS {schema}.stored_replies (
        channel    text        NOT NULL,
        request_id text        NOT NULL,
        reply      bytea       NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (channel, request_id)
    );
    CREATE INDEX IF NOT EXISTS stored_replies_age ON {schema}.stored_replies (created_at);
    """


async def migrate(pool: asyncpg.Pool, schema: str, extra_ddl: str = "") -> None:
    # One service's replicas may start together; the lock keeps DDL from racing.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
        await conn.execute(schema_ddl(schema) + extra_ddl)


class PostgresEventStore:
    """A service's store bound to one connection; `(stream_id, version)` unique gives
    optimistic concurrency. Appends join the caller's transaction and queue the outbox."""

    def __init__(self, conn: asyncpg.Connection, schema: str, events_topic: str) -> None:
        self.conn = conn
        self.schema = schema
        self.events_topic = events_topic

    @property
    def _held(self) -> HeldAppends | None:
        held = _held_appends.get()
        return held if held is not None and held.holds(self) else None

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[EventEnvelope]:
        rows = await self.conn.fetch(
            f"SELECT body FROM {self.schema}.events WHERE stream_id = $1 AND version > $2"
            " ORDER BY version",
            stream_id,
            after_version,
        )
        events = [EventEnvelope.model_validate_json(r["body"]) for r in rows]
        held = self._held
        if held is not None:
            events += [e for e in held.streams.get(stream_id, ()) if e.version > after_version]
        return events

    async def read_streams(self, stream_ids: Collection[str]) -> dict[str, list[EventEnvelope]]:
        """Every event of each of `stream_ids`, in one statement (a stream without events
        is not in the answer)."""
        rows = await self.conn.fetch(
            f"SELECT stream_id, body FROM {self.schema}.events"
            " WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, version",
            sorted(set(stream_ids)),
        )
        streams: dict[str, list[EventEnvelope]] = {}
        for row in rows:
            streams.setdefault(row["stream_id"], []).append(
                EventEnvelope.model_validate_json(row["body"]))
        held = self._held
        if held is not None:
            for stream_id in stream_ids:
                streams.setdefault(stream_id, []).extend(held.streams.get(stream_id, ()))
        return {stream_id: events for stream_id, events in streams.items() if events}

    async def head(self, stream_id: str) -> tuple[int, str]:
        held = self._held
        if held is not None and (head := held.head(stream_id)) is not None:
            return head
        row = await self.conn.fetchrow(
            f"SELECT version, hash FROM {self.schema}.events"
            " WHERE stream_id = $1 ORDER BY version DESC LIMIT 1",
            stream_id,
        )
        return (row["version"], row["hash"]) if row else (0, GENESIS_HASH)

    async def heads(self, stream_ids: Collection[str]) -> dict[str, tuple[int, str]]:
        """Each stream's last version and hash, in one statement (0 and the genesis hash for
        an empty one)."""
        rows = await self.conn.fetch(
            "SELECT s.stream_id, h.version, h.hash FROM unnest($1::text[]) AS s(stream_id)"
            " CROSS JOIN LATERAL (SELECT version, hash FROM"
            f" {self.schema}.events e WHERE e.stream_id = s.stream_id"
            " ORDER BY version DESC LIMIT 1) AS h",
            sorted(set(stream_ids)),
        )
        found = {row["stream_id"]: (row["version"], row["hash"]) for row in rows}
        held = self._held
        if held is not None:
            found.update({s: h for s in stream_ids if (h := held.head(s)) is not None})
        return {stream_id: found.get(stream_id, (0, GENESIS_HASH)) for stream_id in stream_ids}

    async def append(
        self, stream_id: str, expected_version: int, events: Sequence[PendingEvent],
        *, last_hash: str | None = None,
    ) -> list[EventEnvelope]:
        """Append at `expected_version`. A caller that knows the stream's head passes its
        last hash, and the append is then one round trip: the events and their outbox rows
        in a single statement, which inserts nothing if another writer got there first or
        if no committed event `expected_version` with that hash exists (so a head known from
        a write that was rolled back can never leave a gap or a broken chain). Inside
        `holding_appends` the events are held for the batch's one statement instead."""
        if not events:
            return []
        held = self._held
        if held is not None and (head := held.head(stream_id)) is not None:
            if head != (expected_version, last_hash or head[1]):
                raise ConcurrencyError(stream_id, expected_version, head[0])
            last_hash = head[1]
        elif last_hash is None:
            actual, last_hash = await self.head(stream_id)
            if actual != expected_version:
                raise ConcurrencyError(stream_id, expected_version, actual)
        base = (expected_version, last_hash or GENESIS_HASH)
        sealed = seal_all(stream_id, *base, events)
        messages = [event_message(self.events_topic, e) for e in sealed]
        if held is not None:
            held.hold(stream_id, base, sealed, messages)
        else:
            await insert_events(self.conn, self.schema, sealed, messages, {stream_id: base},
                                conflict=ConcurrencyError(stream_id, expected_version))
        return sealed

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[EventEnvelope]:
        rows = await self.conn.fetch(
            f"SELECT body FROM {self.schema}.events WHERE position > $1 ORDER BY position LIMIT $2",
            after_position,
            limit,
        )
        return [EventEnvelope.model_validate_json(r["body"]) for r in rows]


async def insert_events(conn: asyncpg.Connection, schema: str, sealed: Sequence[EventEnvelope],
                        messages: Sequence[OutboxMessage], bases: dict[str, tuple[int, str]],
                        *, conflict: ConcurrencyError, also: AlsoWritten | None = None) -> None:
    """Insert `sealed` (each stream's events continuing its base in `bases`) and their
    outbox rows, and `also`, in one statement; raise `conflict` when it inserted none,
    because a base is not its stream's committed head (another writer got there first, or
    the base was rolled back). Versions are gapless, so a lost race conflicts on a stream's
    first event; the rows of other streams (and `also`'s) it may have inserted are the
    caller's to roll back."""
    if also is not None:
        messages = [*messages, *also.messages]
    appended = await conn.fetchval(
        _append_sql(schema, None if also is None else also.sql(16)),
        [e.stream_id for e in sealed], [e.version for e in sealed],
        [e.event_id for e in sealed], [e.type for e in sealed],
        [e.citizen_ref for e in sealed], [e.occurred_at for e in sealed],
        [e.hash for e in sealed], [e.to_bytes().decode() for e in sealed],
        *outbox_columns(messages),
        list(bases), [version for version, _ in bases.values()],
        [last_hash for _, last_hash in bases.values()],
        *(() if also is None else also.arguments),
    )
    if appended != len(sealed):
        if appended and len(bases) == 1:
            raise RuntimeError(f"stream {sealed[0].stream_id}: partial append of {appended}")
        raise conflict
    for event in sealed:
        EVENTS_APPENDED.labels(schema, event.type).inc()


def _append_sql(s: str, also: str | None = None) -> str:
    """The events (parameters 1-8) inserted only if every base (13-15: stream, version,
    hash; version 0 is the empty stream) is committed, and their outbox rows (9-12) only if
    every event was inserted, with `also` (its parameters from 16); the relay is woken on
    commit. (Writes in one statement's WITH run in no set order, so all outbox rows are one
    `INSERT`: their positions follow the order of its arrays.)"""
    also_cte = "" if also is None else f", also AS ({also})"
    return f"""
    WITH appended AS (
        INSERT INTO {s}.events
            (stream_id, version, event_id, type, citizen_ref, occurred_at, hash, body)
        SELECT * FROM unnest($1::text[], $2::int[], $3::uuid[], $4::text[], $5::text[],
                             $6::timestamptz[], $7::text[], $8::text[])
        WHERE NOT EXISTS (
            SELECT FROM unnest($13::text[], $14::int[], $15::text[]) AS b(stream_id, version, hash)
            WHERE b.version > 0 AND NOT EXISTS (SELECT FROM {s}.events e
                WHERE e.stream_id = b.stream_id AND e.version = b.version AND e.hash = b.hash))
        ON CONFLICT (stream_id, version) DO NOTHING
        RETURNING version
    ), queued AS (
        {outbox_insert(s, 9)}
        WHERE (SELECT count(*) FROM appended) = cardinality($2::int[])
        RETURNING 1
    ){also_cte}
    SELECT (SELECT count(*) FROM appended) FROM pg_notify('{notify_channel(s)}', '')
    """


def event_message(topic: str, event: EventEnvelope) -> OutboxMessage:
    """An event as a Kafka message: keyed by citizen_ref so one citizen stays in one partition;
    it carries the trace of what caused it (the current span), if any."""
    traced = traceparent_header()
    return OutboxMessage(
        topic=topic,
        key=event.citizen_ref.encode(),
        value=event.to_bytes(),
        headers=(("event-type", event.type.encode()), ("event-id", str(event.event_id).encode()),
                 *((traced,) if traced is not None else ())),
    )
