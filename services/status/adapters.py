"""PostgreSQL side of the projection: the read-model tables, the writer and the queries.

The writer loads the row `FOR UPDATE`, projects, and saves row + timeline entry; the
`processed` row is written by `EventConsumer` in the same transaction.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from pydantic import ValidationError

from services.status.projection import CardStatusRow, SubStates, project
from services.status.timeline import TimelineEntry, as_seen_after_erasure, timeline_entry
from shared.consumer import EventHandler, Rejected, describe_validation_error
from shared.envelope import EventEnvelope


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
    """


CARD_COLUMNS = ("citizen_ref", "card_no_masked", "status", "e_card_status", "loss_kind",
                "loss_expires_at", "application_id", "application_status", "pickup_bureau",
                "updated_at", "last_event_id")


class StatusWriter:
    """Applies one event to `card_status` and `card_timeline` inside the caller's transaction."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    def handler_for(self, topic: str) -> EventHandler:
        """The `EventConsumer` handler of one topic; `topic` is the contract's name for it."""

        async def handle(conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
            await self.apply(conn, envelope, topic)

        return handle

    async def apply(self, conn: asyncpg.Connection, envelope: EventEnvelope, topic: str) -> None:
        # Two topics may carry events of one citizen at once: serialise them on the citizen,
        # also when the row does not exist yet (FOR UPDATE alone cannot lock a missing row).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))",
                           f"{self.schema}.card_status", envelope.citizen_ref)
        row = await load_row(conn, self.schema, envelope.citizen_ref, for_update=True)
        try:
            new_row = project(row, envelope)
            entry = timeline_entry(envelope, topic)
        except ValidationError as exc:
            raise Rejected("invalid_event_data", describe_validation_error(exc)) from exc
        await save_row(conn, self.schema, new_row)
        await add_entry(conn, self.schema, entry)


async def load_row(conn: asyncpg.Connection, schema: str, citizen_ref: str, *,
                   for_update: bool = False) -> CardStatusRow | None:
    lock = " FOR UPDATE" if for_update else ""
    record = await conn.fetchrow(
        f"SELECT * FROM {schema}.card_status WHERE citizen_ref = $1{lock}", citizen_ref
    )
    if record is None:
        return None
    values = dict(record)
    values["sub_states"] = SubStates.model_validate_json(values["sub_states"])
    return CardStatusRow.model_validate(values)


def card_record(row: CardStatusRow) -> tuple[Any, ...]:
    """A row's values as stored, in `(*CARD_COLUMNS, "sub_states")` order (also for COPY)."""
    return (row.citizen_ref, row.card_no_masked, row.status.value, row.e_card_status.value,
            row.loss_kind, row.loss_expires_at, row.application_id, row.application_status,
            row.pickup_bureau, row.updated_at, row.last_event_id, row.sub_states.model_dump_json())


async def save_row(conn: asyncpg.Connection, schema: str, row: CardStatusRow) -> None:
    columns = (*CARD_COLUMNS, "sub_states")
    placeholders = ", ".join(f"${i}" for i in range(1, len(CARD_COLUMNS) + 1))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])
    await conn.execute(
        f"INSERT INTO {schema}.card_status ({', '.join(columns)})"
        f" VALUES ({placeholders}, ${len(columns)}::jsonb)"
        f" ON CONFLICT (citizen_ref) DO UPDATE SET {updates}",
        *card_record(row),
    )


async def add_entry(conn: asyncpg.Connection, schema: str, entry: TimelineEntry) -> None:
    await conn.execute(
        f"INSERT INTO {schema}.card_timeline"
        " (citizen_ref, event_id, type, occurred_at, description, topic, stream_id, version)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING",
        entry.citizen_ref, entry.event_id, entry.type, entry.occurred_at, entry.description,
        entry.topic, entry.stream_id, entry.version,
    )


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
        "SELECT row_number() OVER (ORDER BY occurred_at, stream_id, version) AS seq,"
        " event_id, type, occurred_at, description"
        f" FROM {schema}.card_timeline WHERE citizen_ref = $1"
        " ORDER BY occurred_at, stream_id, version",
        citizen_ref,
    )
    erased = await pool.fetchval(
        f"SELECT (sub_states->>'erased')::boolean FROM {schema}.card_status"
        " WHERE citizen_ref = $1",
        citizen_ref,
    )
    return [
        {
            "seq": r["seq"],
            "event_id": r["event_id"],
            "type": r["type"],
            "occurred_at": r["occurred_at"].isoformat(),
            "description": as_seen_after_erasure(r["type"], r["description"]) if erased
            else r["description"],
        }
        for r in records
    ]
