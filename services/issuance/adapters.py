"""Issuance's own tables besides the event store: whose each approved application is, the
durable production timers, the card number sequence, and the per-citizen data keys. Every
write joins the caller's transaction."""

from __future__ import annotations

import asyncpg

from shared.crypto import data_keys_ddl
from shared.locks import lock_keys_sql
from shared.timers import DurableTimers, timers_ddl


def issuance_ddl(schema: str) -> str:
    return data_keys_ddl(schema) + timers_ddl(schema, "production_timers") + f"""
    CREATE SEQUENCE IF NOT EXISTS {schema}.card_no_seq;
    CREATE TABLE IF NOT EXISTS {schema}.applications (
        application_id text        PRIMARY KEY,
        citizen_ref    text        NOT NULL,
        approved_at    timestamptz NOT NULL DEFAULT now()
    );
    -- A command's application's holder found and locked in one round trip.
    CREATE OR REPLACE FUNCTION {schema}.locked_holder(lock_namespace text, application text)
    RETURNS text LANGUAGE plpgsql VOLATILE AS $fn$
    DECLARE
        holder text;
    BEGIN
        SELECT citizen_ref INTO holder FROM {schema}.applications
            WHERE application_id = application;
        IF holder IS NOT NULL THEN
            {lock_keys_sql("lock_namespace", "ARRAY[holder]", verb="PERFORM")};
        END IF;
        RETURN holder;
    END
    $fn$;
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
        """Remember whose application this is; returns the citizen_ref on record (one
        statement, unless a concurrent writer's row committed while it ran)."""
        ref = await conn.fetchval(
            f"WITH inserted AS (INSERT INTO {self.schema}.applications"
            " (application_id, citizen_ref) VALUES ($1, $2)"
            " ON CONFLICT (application_id) DO NOTHING RETURNING citizen_ref)"
            " SELECT citizen_ref FROM inserted UNION ALL"
            f" SELECT citizen_ref FROM {self.schema}.applications WHERE application_id = $1"
            " LIMIT 1",
            application_id, citizen_ref,
        )
        return str(ref if ref is not None else await self.holder_of(conn, application_id))

    async def locked_holder_of(self, conn: asyncpg.Connection, namespace: str,
                               application_id: str) -> str | None:
        """`holder_of`, with the holder's lock in `namespace` (`shared.locks`) taken, in
        one round trip (`locked_holder`). A holder never changes, so no read after the lock
        is needed."""
        ref = await conn.fetchval(f"SELECT {self.schema}.locked_holder($1, $2)",
                                  namespace, application_id)
        return None if ref is None else str(ref)

    async def holder_of(self, conn: asyncpg.Connection, application_id: str) -> str | None:
        ref = await conn.fetchval(
            f"SELECT citizen_ref FROM {self.schema}.applications WHERE application_id = $1",
            application_id,
        )
        return None if ref is None else str(ref)


def production_timers(schema: str) -> DurableTimers:
    """`production_timers`: a card in production falls due here (key: its application_id);
    arming an application again keeps its first due time."""
    return DurableTimers(schema, "production_timers", rearm="keep")
