"""Durable timers: one row per pending deadline in a service's own schema, so a restart loses
none, claimed by a scan that locks what it takes and skips what another replica holds. Every
call joins the caller's transaction."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

# What arming a key that is already armed does: "move_due" sets the new due_at (the rest of
# the row stays), "keep" leaves the first arming as it was.
Rearm = Literal["move_due", "keep"]

_ON_CONFLICT: dict[Rearm, str] = {
    "move_due": "DO UPDATE SET due_at = EXCLUDED.due_at",
    "keep": "DO NOTHING",
}


def timers_ddl(schema: str, table: str) -> str:
    """The one table shape every durable timer uses; `key` is what the timer is for."""
    return f"""
    CREATE TABLE IF NOT EXISTS {schema}.{table} (
        key            text        PRIMARY KEY,
        citizen_ref    text        NOT NULL,
        due_at         timestamptz NOT NULL,
        correlation_id text        NOT NULL,
        causation_id   text        NOT NULL,
        attempts       integer     NOT NULL DEFAULT 0
    );
    CREATE INDEX IF NOT EXISTS {table}_due ON {schema}.{table} (due_at);
    CREATE INDEX IF NOT EXISTS {table}_citizen ON {schema}.{table} (citizen_ref);
    """


@dataclass(frozen=True, slots=True)
class Timer:
    """A pending deadline: `key` names what falls due (a loss, an application); the ids are
    those of the event that armed it, so what the timer causes is traced back to it."""

    key: str
    citizen_ref: str
    due_at: datetime
    correlation_id: str
    causation_id: str
    attempts: int = 0  # how many times firing it failed and it was postponed


class DurableTimers:
    """The timers of one table `schema.table` (made by `timers_ddl`)."""

    def __init__(self, schema: str, table: str, *, rearm: Rearm) -> None:
        self.table = f"{schema}.{table}"
        self.rearm = rearm

    async def arm(self, conn: asyncpg.Connection, timer: Timer) -> None:
        """Arm `timer`; if its key is armed already, `rearm` says what happens."""
        await conn.execute(
            f"INSERT INTO {self.table}"
            " (key, citizen_ref, due_at, correlation_id, causation_id)"
            " VALUES ($1, $2, $3, $4, $5)"
            f" ON CONFLICT (key) {_ON_CONFLICT[self.rearm]}",
            timer.key, timer.citizen_ref, timer.due_at, timer.correlation_id,
            timer.causation_id,
        )

    async def disarm(self, conn: asyncpg.Connection, key: str) -> None:
        await conn.execute(f"DELETE FROM {self.table} WHERE key = $1", key)

    async def disarm_all(self, conn: asyncpg.Connection, citizen_ref: str) -> None:
        await conn.execute(f"DELETE FROM {self.table} WHERE citizen_ref = $1", citizen_ref)

    async def postpone(self, conn: asyncpg.Connection, key: str, due_at: datetime) -> None:
        """Firing `key` failed: keep it, due again at `due_at`, one attempt more."""
        await conn.execute(
            f"UPDATE {self.table} SET due_at = $2, attempts = attempts + 1 WHERE key = $1",
            key, due_at,
        )

    async def claim_due(
        self, conn: asyncpg.Connection, now: datetime, limit: int
    ) -> list[Timer]:
        """Up to `limit` timers due by `now`, earliest first, locked for the caller's
        transaction; a timer another transaction holds is skipped, not waited for."""
        rows = await conn.fetch(
            "SELECT key, citizen_ref, due_at, correlation_id, causation_id, attempts"
            f" FROM {self.table} WHERE due_at <= $1"
            " ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            now, limit,
        )
        return [Timer(**dict(r)) for r in rows]
