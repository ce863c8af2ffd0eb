"""The loss schema's own tables besides the event store: what it learned from other services
(which card a citizen holds, the state of their reissue application) and the durable expiry
timers. Every write joins the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.loss.domain import ApplicationStatus
from shared.crypto import data_keys_ddl


def loss_ddl(schema: str) -> str:
    return data_keys_ddl(schema) + f"""
    CREATE TABLE IF NOT EXISTS {schema}.cards (
        citizen_ref text        PRIMARY KEY,
        card_no     text        NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS {schema}.applications (
        citizen_ref    text        PRIMARY KEY,
        application_id text        NOT NULL,
        status         text        NOT NULL
            CHECK (status IN ('none', 'pending', 'approved', 'rejected', 'completed')),
        updated_at     timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS {schema}.expiry_timers (
        citizen_ref    text        NOT NULL,
        loss_id        text        NOT NULL,
        due_at         timestamptz NOT NULL,
        correlation_id text        NOT NULL,
        causation_id   text        NOT NULL,
        PRIMARY KEY (citizen_ref, loss_id)
    );
    CREATE INDEX IF NOT EXISTS expiry_timers_due ON {schema}.expiry_timers (due_at);
    """


class Cards:
    """`cards`: the card each citizen holds, from issuance.events."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def card_of(self, conn: asyncpg.Connection, citizen_ref: str) -> str | None:
        card_no: str | None = await conn.fetchval(
            f"SELECT card_no FROM {self.schema}.cards WHERE citizen_ref = $1", citizen_ref
        )
        return card_no

    async def hold(self, conn: asyncpg.Connection, citizen_ref: str, card_no: str) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.cards (citizen_ref, card_no) VALUES ($1, $2)"
            " ON CONFLICT (citizen_ref) DO UPDATE"
            " SET card_no = EXCLUDED.card_no, updated_at = now()",
            citizen_ref,
            card_no,
        )


class Applications:
    """`applications`: the status of each citizen's latest reissue application.

    A new application replaces the row; a decision only touches the application it names, and
    a completed one (its card was reissued) never goes back, whatever order the two topics
    deliver in.
    """

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def status_of(self, conn: asyncpg.Connection, citizen_ref: str) -> ApplicationStatus:
        status: ApplicationStatus | None = await conn.fetchval(
            f"SELECT status FROM {self.schema}.applications WHERE citizen_ref = $1", citizen_ref
        )
        return status or "none"

    async def applied(
        self, conn: asyncpg.Connection, citizen_ref: str, application_id: str
    ) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.applications AS a (citizen_ref, application_id, status)"
            " VALUES ($1, $2, 'pending')"
            " ON CONFLICT (citizen_ref) DO UPDATE"
            " SET application_id = EXCLUDED.application_id, status = 'pending', updated_at = now()"
            " WHERE a.application_id <> EXCLUDED.application_id",
            citizen_ref,
            application_id,
        )

    async def set_status(
        self,
        conn: asyncpg.Connection,
        citizen_ref: str,
        application_id: str,
        status: ApplicationStatus,
    ) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.applications AS a (citizen_ref, application_id, status)"
            " VALUES ($1, $2, $3)"
            " ON CONFLICT (citizen_ref) DO UPDATE"
            " SET status = EXCLUDED.status, updated_at = now()"
            " WHERE a.application_id = EXCLUDED.application_id AND a.status <> 'completed'",
            citizen_ref,
            application_id,
            status,
        )


@dataclass(frozen=True, slots=True)
class DueTimer:
    citizen_ref: str
    loss_id: str
    due_at: datetime
    correlation_id: str
    causation_id: str


class ExpiryTimers:
    """`expiry_timers`: one row per temporary loss in force, deleted when it is over."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def arm(self, conn: asyncpg.Connection, timer: DueTimer) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.expiry_timers"
            " (citizen_ref, loss_id, due_at, correlation_id, causation_id)"
            " VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT (citizen_ref, loss_id) DO UPDATE SET due_at = EXCLUDED.due_at",
            timer.citizen_ref,
            timer.loss_id,
            timer.due_at,
            timer.correlation_id,
            timer.causation_id,
        )

    async def disarm_all(self, conn: asyncpg.Connection, citizen_ref: str) -> None:
        await conn.execute(
            f"DELETE FROM {self.schema}.expiry_timers WHERE citizen_ref = $1", citizen_ref
        )

    async def disarm(self, conn: asyncpg.Connection, citizen_ref: str, loss_id: str) -> None:
        await conn.execute(
            f"DELETE FROM {self.schema}.expiry_timers WHERE citizen_ref = $1 AND loss_id = $2",
            citizen_ref,
            loss_id,
        )

    async def claim_due(
        self, conn: asyncpg.Connection, now: datetime, limit: int
    ) -> list[DueTimer]:
        """Due timers, locked for this transaction; another replica skips them."""
        rows = await conn.fetch(
            f"SELECT citizen_ref, loss_id, due_at, correlation_id, causation_id"
            f" FROM {self.schema}.expiry_timers WHERE due_at <= $1"
            " ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            now,
            limit,
        )
        return [DueTimer(**dict(r)) for r in rows]
