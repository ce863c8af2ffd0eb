"""Issuance's own tables besides the event store: whose each approved application is, the
durable production timers, the card number sequence, and the per-citizen data keys. Every
write joins the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence

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

    async def take(self, conn: asyncpg.Connection, count: int) -> list[int]:
        """`count` numbers in one statement (like any drawn and not used, a number of a
        batch rolled back is never used: the numbers only have to be unique)."""
        rows = await conn.fetch(
            f"SELECT nextval('{self.schema}.card_no_seq') AS n FROM generate_series(1, $1)",
            count)
        return [int(row["n"]) for row in rows]


class Applications:
    """`applications`: whose each approved application is, from review.events."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def record(self, conn: asyncpg.Connection,
                     applications: Sequence[tuple[str, str]]) -> dict[str, str | None]:
        """Remember whose each application (id, citizen_ref) is; returns the citizen_ref on
        record for each (one statement, unless a concurrent writer's row committed while it
        ran: that one is read again)."""
        ids = [application_id for application_id, _ in applications]
        rows = await conn.fetch(
            f"WITH inserted AS (INSERT INTO {self.schema}.applications"
            " (application_id, citizen_ref) SELECT * FROM unnest($1::text[], $2::text[])"
            " ON CONFLICT (application_id) DO NOTHING RETURNING application_id, citizen_ref)"
            " SELECT application_id, citizen_ref FROM inserted UNION ALL"
            " SELECT application_id, citizen_ref"
            f" FROM {self.schema}.applications WHERE application_id = ANY($1::text[])",
            ids, [citizen_ref for _, citizen_ref in applications],
        )
        holders: dict[str, str | None] = {
            row["application_id"]: str(row["citizen_ref"]) for row in rows}
        for application_id in set(ids) - holders.keys():
            holders[application_id] = await self.holder_of(conn, application_id)
        return holders

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
