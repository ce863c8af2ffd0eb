"""PostgreSQL side of the projection: the read-model tables, the writer and the queries.

The writer loads the rows `FOR UPDATE`, projects, and saves rows + timeline entries; the
`processed` rows are written by `EventConsumer` in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from pydantic import ValidationError

from services.status.projection import CardStatusRow, SubStates, project
from services.status.timeline import ListedEntry, TimelineEntry, listed_timeline, timeline_entry
from shared.checked import BOOKKEEPING_ARGUMENTS, Bookkeeping, CheckedRead, checked_apply_ddl
from shared.consumer import (
    BatchEventHandler,
    EventHandler,
    Rejected,
    describe_validation_error,
)
from shared.contracts import EVENT_TOPICS
from shared.envelope import EventEnvelope
from shared.service import follower_name

SERVICE = "status"

# The one name the four followers shared before each had its own (issue 10).
FORMER_FOLLOWER = "carddesk-status"


def status_follower(topic: str) -> str:
    """The name the follower of `topic` (the contract's name) keeps its processed rows
    under, as `shared.service.bootstrap` names it; the rebuild writes the same."""
    return follower_name(SERVICE, topic)


def status_ddl(schema: str) -> str:
    return f"""
    CREATE TABLE IF NOT EXISTS {schema}.card_status (
        citizen_ref        text PRIMARY KEY,
        card_no_masked     text,
        status             text        NOT NULL,
        e_card_status      text        NOT NULL,
        loss_kind          text,
        loss_expires_at    timestamptz,
        application_id     text,
        application_status text,
        pickup_bureau      text,
        updated_at         timestamptz NOT NULL,
        last_event_id      text        NOT NULL,
        sub_states         jsonb       NOT NULL
    );
    CREATE TABLE IF NOT EXISTS {schema}.card_timeline (
        citizen_ref text        NOT NULL,
        event_id    text        PRIMARY KEY,
        type        text        NOT NULL,
        occurred_at timestamptz NOT NULL,
        description text        NOT NULL,
        topic       text        NOT NULL,
        stream_id   text        NOT NULL,
        version     integer     NOT NULL
    );
    CREATE INDEX IF NOT EXISTS card_timeline_in_order
        ON {schema}.card_timeline (citizen_ref, occurred_at, stream_id, version);
    """ + _processed_renamed(schema) + checked_ddl(schema)


def _processed_renamed(schema: str) -> str:
    """Processed rows kept under the former shared name move to their follower's own (the
    timeline row of the event names its topic), so that nothing is applied twice after an
    upgrade; once moved, this finds nothing."""
    return "".join(
        f"""
    UPDATE {schema}.processed p SET consumer = '{status_follower(topic)}'
      FROM {schema}.card_timeline t
     WHERE p.consumer = '{FORMER_FOLLOWER}' AND t.event_id = p.message_id
       AND t.topic = '{topic}' AND NOT EXISTS (SELECT 1 FROM {schema}.processed q
           WHERE q.consumer = '{status_follower(topic)}' AND q.message_id = p.message_id);"""
        for topic in EVENT_TOPICS.values())


CARD_COLUMNS = ("citizen_ref", "card_no_masked", "status", "e_card_status", "loss_kind",
                "loss_expires_at", "application_id", "application_status", "pickup_bureau",
                "updated_at", "last_event_id")


class StatusWriter:
    """Applies events to `card_status` and `card_timeline`: inside the caller's transaction
    (the locked way), or read and written in two statements (`shared.checked`)."""

    table = "card_status"

    def __init__(self, schema: str) -> None:
        self.schema = schema

    def handler_for(self, topic: str) -> EventHandler:
        """The `EventConsumer` handler of one topic; `topic` is the contract's name for it."""

        async def handle(conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
            await self.apply_all(conn, [envelope], topic)

        return handle

    def batch_handler_for(self, topic: str) -> BatchEventHandler:
        """The same for a partition's batch: a few statements, however many events."""

        async def handle(conn: asyncpg.Connection, envelopes: Sequence[EventEnvelope]) -> None:
            await self.apply_all(conn, envelopes, topic)

        return handle

    async def apply_all(self, conn: asyncpg.Connection, envelopes: Sequence[EventEnvelope],
                        topic: str) -> None:
        """Load the citizens' rows, fold the events in order, save rows and timeline
        entries: two statements for the lot.

        The caller's transaction holds the citizens' locks (`citizen_namespace(schema)`):
        two topics may carry events of one citizen at once, and a row that does not exist
        yet cannot be locked `FOR UPDATE`. `EventConsumer` takes them before it calls this,
        for the four followers alike (one schema, one namespace); nothing else writes these
        tables live (the rebuild swaps whole tables under `LOCK TABLE`). So the rows are
        read without row locks, which would only add a write to each."""
        refs = sorted({e.citizen_ref for e in envelopes})
        rows = await load_rows(conn, self.schema, refs)
        entries = _fold(rows, [(topic, envelopes)])
        await save(conn, self.schema, [rows[ref] for ref in refs], entries)

    async def apply_checked(self, conn: asyncpg.Connection, namespace: str, read: CheckedRead,
                            batches: Sequence[tuple[str, Sequence[EventEnvelope]]],
                            bookkeeping: Bookkeeping) -> bool:
        """`shared.checked.CheckedWriter`: fold onto the rows read, then one call of
        `<schema>.apply_checked`."""
        rows = {ref: CardStatusRow.model_validate_json(body) for ref, body in read.rows.items()}
        entries = _fold(rows, batches)
        saved = [rows[ref] for ref in sorted({e.citizen_ref for _, es in batches for e in es})]
        arguments = (*bookkeeping.arguments(namespace), *save_arguments(saved, entries))
        placeholders = ", ".join(f"${i}" for i in range(1, len(arguments) + 1))
        return bool(await conn.fetchval(
            f"SELECT {self.schema}.apply_checked({placeholders})", *arguments))


def _fold(rows: dict[str, CardStatusRow],
          batches: Sequence[tuple[str, Sequence[EventEnvelope]]]) -> list[TimelineEntry]:
    """Each topic's events in order onto `rows` (in place); their timeline entries."""
    entries: list[TimelineEntry] = []
    try:
        for topic, envelopes in batches:
            for envelope in envelopes:
                ref = envelope.citizen_ref
                rows[ref] = project(rows.get(ref), envelope)
                entries.append(timeline_entry(envelope, topic))
    except ValidationError as exc:
        raise Rejected("invalid_event_data", describe_validation_error(exc)) from exc
    return entries


def _row_of(record: asyncpg.Record) -> CardStatusRow:
    values = dict(record)
    values["sub_states"] = SubStates.model_validate_json(values["sub_states"])
    return CardStatusRow.model_validate(values)


async def load_row(conn: asyncpg.Connection, schema: str,
                   citizen_ref: str) -> CardStatusRow | None:
    record = await conn.fetchrow(
        f"SELECT * FROM {schema}.card_status WHERE citizen_ref = $1", citizen_ref)
    return None if record is None else _row_of(record)


async def load_rows(conn: asyncpg.Connection, schema: str,
                    citizen_refs: Sequence[str]) -> dict[str, CardStatusRow]:
    records = await conn.fetch(
        f"SELECT * FROM {schema}.card_status WHERE citizen_ref = ANY($1::text[])", citizen_refs)
    return {record["citizen_ref"]: _row_of(record) for record in records}


def card_record(row: CardStatusRow) -> tuple[Any, ...]:
    """A row's values as stored, in `(*CARD_COLUMNS, "sub_states")` order (also for COPY)."""
    return (row.citizen_ref, row.card_no_masked, row.status.value, row.e_card_status.value,
            row.loss_kind, row.loss_expires_at, row.application_id, row.application_status,
            row.pickup_bureau, row.updated_at, row.last_event_id, row.sub_states.model_dump_json())


# The types of `(*CARD_COLUMNS, "sub_states")`; sub_states travels as text, stored as jsonb.
_CARD_TYPES = ("text", "text", "text", "text", "text", "timestamptz", "text", "text", "text",
               "timestamptz", "text", "text")


def save_sql(schema: str, first: int) -> str:
    """The statement `save` runs, over the arrays of `save_arguments` at `$first`..: also a
    statement of the checked function, which names its own parameters the same way."""
    columns = (*CARD_COLUMNS, "sub_states")
    arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_CARD_TYPES, start=first))
    selected = ", ".join(columns[:-1]) + ", sub_states::jsonb"
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
    t = first + len(columns)
    return (f"WITH saved AS (INSERT INTO {schema}.card_status ({', '.join(columns)})"
            f"  SELECT {selected} FROM unnest({arrays}) AS u({', '.join(columns)})"
            f"  ON CONFLICT (citizen_ref) DO UPDATE SET {updates})"
            f" INSERT INTO {schema}.card_timeline"
            " (citizen_ref, event_id, type, occurred_at, description, topic, stream_id, version)"
            f" SELECT * FROM unnest(${t}::text[], ${t + 1}::text[], ${t + 2}::text[],"
            f" ${t + 3}::timestamptz[], ${t + 4}::text[], ${t + 5}::text[], ${t + 6}::text[],"
            f" ${t + 7}::int[])"
            " ON CONFLICT (event_id) DO NOTHING")


def save_arguments(rows: Sequence[CardStatusRow],
                   entries: Sequence[TimelineEntry]) -> list[list[Any]]:
    """The arrays `save_sql` reads: the rows' columns, then the entries'."""
    records = [card_record(row) for row in rows]
    return [*([record[i] for record in records] for i in range(len(_CARD_TYPES))),
            [e.citizen_ref for e in entries], [e.event_id for e in entries],
            [e.type for e in entries], [e.occurred_at for e in entries],
            [e.description for e in entries], [e.topic for e in entries],
            [e.stream_id for e in entries], [e.version for e in entries]]


# The checked function's own parameters: `save_sql`'s arrays.
_SAVE_PARAMS = ", ".join(
    [f"card_{i} {t}[]" for i, t in enumerate(_CARD_TYPES, start=1)]
    + [f"entry_{i} {t}[]" for i, t in enumerate(
        ("text", "text", "text", "timestamptz", "text", "text", "text", "integer"), start=1)])


def checked_ddl(schema: str) -> str:
    """`<schema>.apply_checked`: a batch's bookkeeping, rows and timeline entries in one
    checked call (`shared.checked`)."""
    return checked_apply_ddl(f"{schema}.apply_checked", schema, "card_status", _SAVE_PARAMS,
                             save_sql(schema, BOOKKEEPING_ARGUMENTS + 1))


async def save(conn: asyncpg.Connection, schema: str, rows: Sequence[CardStatusRow],
               entries: Sequence[TimelineEntry]) -> None:
    """Rows replace what is there, timeline entries are added once: one statement."""
    await conn.execute(save_sql(schema, 1), *save_arguments(rows, entries))


# --- queries ------------------------------------------------------------------------------


async def fetch_card(pool: asyncpg.Pool, schema: str, citizen_ref: str) -> dict[str, Any] | None:
    """The public `card_status` row, JSON-ready."""
    async with pool.acquire() as conn:
        row = await load_row(conn, schema, citizen_ref)
    return row.public() if row else None


async def fetch_timeline(pool: asyncpg.Pool, schema: str, citizen_ref: str) -> list[dict[str, Any]]:
    """Every entry of one citizen, numbered from 1, in `(occurred_at, stream_id, version)`
    order: events one command appended together share a time and keep their stream order."""
    records = await pool.fetch(
        "SELECT event_id, type, occurred_at, description"
        f" FROM {schema}.card_timeline WHERE citizen_ref = $1"
        " ORDER BY occurred_at, stream_id, version",
        citizen_ref,
    )
    erased = await pool.fetchval(
        f"SELECT (sub_states->>'erased')::boolean FROM {schema}.card_status"
        " WHERE citizen_ref = $1",
        citizen_ref,
    )
    return listed_timeline(
        (ListedEntry(r["event_id"], r["type"], r["occurred_at"], r["description"])
         for r in records),
        erased=bool(erased))
