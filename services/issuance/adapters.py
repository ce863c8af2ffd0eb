"""Issuance's own tables besides the event store: whose each approved application is, the
durable production timers, the card number sequence, and the per-citizen data keys. Every
write joins the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared.crypto import data_keys_ddl


def issuance_ddl(schema: str) -> str:
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


class CardNumbers:
    """`card_no_seq`: the sequence new card numbers are made from."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def next(self, conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval(f"SELECT nextval('{self.schema}.card_no_seq')"))


class Applications:
    """`applications`: whose each approved application is, from review.events."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def record(self, conn: asyncpg.Connection, application_id: str,
                     citizen_ref: str) -> str:
        """Remember whose application this is; returns the citizen_ref on record."""
        await conn.execute(
            f"INSERT INTO {self.schema}.applications (application_id, citizen_ref)"
            " VALUES ($1, $2) ON CONFLICT (application_id) DO NOTHING",
            application_id, citizen_ref,
        )
        return str(await self.holder_of(conn, application_id))

    async def holder_of(self, conn: asyncpg.Connection, application_id: str) -> str | None:
        ref = await conn.fetchval(
            f"SELECT citizen_ref FROM {self.schema}.applications WHERE application_id = $1",
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


class ProductionTimers:
    """`production_timers`: a card in production falls due here, so a restart loses none."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def arm(self, conn: asyncpg.Connection, timer: ProductionTimer) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.production_timers"
            " (application_id, citizen_ref, due_at, correlation_id, causation_id)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (application_id) DO NOTHING",
            timer.application_id, timer.citizen_ref, timer.due_at, timer.correlation_id,
            timer.causation_id,
        )

    async def claim_due(self, conn: asyncpg.Connection, now: datetime) -> ProductionTimer | None:
        """Lock the earliest due timer that no other replica holds (in the caller's
        transaction)."""
        row = await conn.fetchrow(
            f"SELECT application_id, citizen_ref, due_at, correlation_id, causation_id"
            f" FROM {self.schema}.production_timers WHERE due_at <= $1"
            " ORDER BY due_at LIMIT 1 FOR UPDATE SKIP LOCKED",
            now,
        )
        return None if row is None else ProductionTimer(**dict(row))

    async def disarm(self, conn: asyncpg.Connection, application_id: str) -> None:
        await conn.execute(
            f"DELETE FROM {self.schema}.production_timers WHERE application_id = $1",
            application_id,
        )

    async def postpone(self, conn: asyncpg.Connection, application_id: str,
                       due_at: datetime) -> None:
        await conn.execute(
            f"UPDATE {self.schema}.production_timers SET due_at = $2, attempts = attempts + 1"
            " WHERE application_id = $1",
            application_id, due_at,
        )
