"""Issuance's own tables besides the event store: applications, production timers, the
card number sequence, and the per-citizen data keys."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared.crypto import data_keys_ddl


def ddl(schema: str) -> str:
    return data_keys_ddl(schema) + f"""
    CREATE SEQUENCE IF NOT EXISTS {schema}.card_no_seq;
    CREATE TABLE IF NOT EXISTS {schema}.applications (
        application_id text        PRIMARY KEY,
        citizen_ref    text        NOT NULL,
        approved_at    timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS {schema}.production_timers (
        application_id text        PRIMARY KEY,
        citizen_ref    text        NOT NULL,
        due_at         timestamptz NOT NULL,
        correlation_id text        NOT NULL,
        causation_id   text        NOT NULL,
        attempts       integer     NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS production_timers_due ON {schema}.production_timers (due_at);
    """


async def next_card_number(conn: asyncpg.Connection, schema: str) -> int:
    return int(await conn.fetchval(f"SELECT nextval('{schema}.card_no_seq')"))


async def record_application(
    conn: asyncpg.Connection, schema: str, application_id: str, citizen_ref: str
) -> str:
    """Remember whose application this is; returns the citizen_ref on record."""
    await conn.execute(
        f"INSERT INTO {schema}.applications (application_id, citizen_ref) VALUES ($1, $2)"
        " ON CONFLICT (application_id) DO NOTHING",
        application_id,
        citizen_ref,
    )
    return str(await conn.fetchval(
        f"SELECT citizen_ref FROM {schema}.applications WHERE application_id = $1",
        application_id,
    ))


async def holder_of(conn: asyncpg.Connection, schema: str, application_id: str) -> str | None:
    ref = await conn.fetchval(
        f"SELECT citizen_ref FROM {schema}.applications WHERE application_id = $1",
        application_id,
    )
    return None if ref is None else str(ref)


@dataclass(frozen=True, slots=True)
class ProductionTimer:
    application_id: str
    citizen_ref: str
    due_at: datetime
    correlation_id: str
    causation_id: str


async def schedule_production(
    conn: asyncpg.Connection, schema: str, timer: ProductionTimer
) -> None:
    await conn.execute(
        f"INSERT INTO {schema}.production_timers"
        " (application_id, citizen_ref, due_at, correlation_id, causation_id)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (application_id) DO NOTHING",
        timer.application_id,
        timer.citizen_ref,
        timer.due_at,
        timer.correlation_id,
        timer.causation_id,
    )


async def claim_due_timer(
    conn: asyncpg.Connection, schema: str, now: datetime
) -> ProductionTimer | None:
    """Lock the earliest due timer that no other replica holds (in the caller's transaction)."""
    row = await conn.fetchrow(
        f"SELECT application_id, citizen_ref, due_at, correlation_id, causation_id"
        f" FROM {schema}.production_timers WHERE due_at <= $1"
        " ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        now,
    )
    return None if row is None else ProductionTimer(**dict(row))


async def delete_timer(conn: asyncpg.Connection, schema: str, application_id: str) -> None:
    await conn.execute(
        f"DELETE FROM {schema}.production_timers WHERE application_id = $1", application_id
    )


async def postpone_timer(
    conn: asyncpg.Connection, schema: str, application_id: str, due_at: datetime
) -> None:
    await conn.execute(
        f"UPDATE {schema}.production_timers SET due_at = $2, attempts = attempts + 1"
        " WHERE application_id = $1",
        application_id,
        due_at,
    )
