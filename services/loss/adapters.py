"""The loss schema's own tables besides the event store: what it learned from other services
(which card a citizen holds, the state of their reissue application) and the durable expiry
timers. Every write joins the caller's transaction."""

from __future__ import annotations

import asyncpg

from services.loss.domain import ApplicationStatus
from shared.crypto import data_keys_ddl
from shared.timers import DurableTimers, timers_ddl


def loss_ddl(schema: str) -> str:
    return data_keys_ddl(schema) + timers_ddl(schema, "expiry_timers") + f"""
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
    """


async def facts_of(conn: asyncpg.Connection, schema: str,
                   citizen_ref: str) -> tuple[str | None, ApplicationStatus]:
    """What a loss decision knows from the other services, in one round trip: the card the
    citizen holds (None before issuance told of one) and their application's status."""
    row = await conn.fetchrow(
        f"SELECT (SELECT card_no FROM {schema}.cards WHERE citizen_ref = $1) AS card_no,"
        f" (SELECT status FROM {schema}.applications WHERE citizen_ref = $1) AS status",
        citizen_ref)
    assert row is not None, "a SELECT without FROM returns one row"
    status: ApplicationStatus = row["status"] or "none"
    return row["card_no"], status


class Cards:
    """`cards`: the card each citizen holds, from issuance.events."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

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


def expiry_timers(schema: str) -> DurableTimers:
    """`expiry_timers`: one per temporary loss in force (key: its loss_id), deleted when it is
    over; re-arming a loss moves its expiry."""
    return DurableTimers(schema, "expiry_timers", rearm="move_due")
