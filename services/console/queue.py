"""The review queue: a small projection of review.events in the console's own schema.

The status service's `card_status` has one row per citizen and no listing query, so the
queue of pending applications (oldest first, by bureau) is projected here, from the log, the
same way the status service projects: `project(row, event) -> row`, written with the
`processed` row of `EventConsumer` in one transaction, rebuilt by replaying from offset 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Annotated

import asyncpg
from pydantic import Field, TypeAdapter

from shared.consumer import BatchEventHandler, EventHandler, decode_followed
from shared.contracts.common import SubjectErased
from shared.contracts.review import (
    ApplicationWithdrawn,
    ReissueApplied,
    ReviewApproved,
    ReviewRejected,
)
from shared.contracts.upcasters import UPCASTERS
from shared.envelope import EventEnvelope
from shared.events import EventDecoder

QueueEvent = Annotated[
    ReissueApplied | ReviewApproved | ReviewRejected | ApplicationWithdrawn | SubjectErased,
    Field(discriminator="type"),
]
decode_event: EventDecoder[QueueEvent] = EventDecoder(TypeAdapter(QueueEvent), UPCASTERS)


@dataclass(frozen=True)
class Application:
    """One reissue application as the queue shows it (no personal data: ids, bureau, times)."""

    application_id: str
    citizen_ref: str
    pickup_bureau: str
    applied_at: datetime
    status: str  # pending | approved | rejected | withdrawn | erased
    resubmission_of: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None
    reason: str | None = None


def project(row: Application | None, envelope: EventEnvelope,
            event: QueueEvent) -> Application | None:
    """The application row after one event (None: the event concerns no row we know)."""
    at = envelope.occurred_at
    match event:
        case ReissueApplied():
            return Application(event.application_id, envelope.citizen_ref, event.pickup_bureau,
                               at, "pending", event.resubmission_of)
        case ReviewApproved() if row is not None:
            return replace(row, status="approved", decided_by=event.reviewer_id, decided_at=at)
        case ReviewRejected() if row is not None:
            return replace(row, status="rejected", decided_by=event.reviewer_id, decided_at=at,
                           reason=event.reason)
        case ApplicationWithdrawn() if row is not None:
            return replace(row, status="withdrawn", decided_at=at, reason=event.reason)
        case SubjectErased() if row is not None:
            return replace(row, status="erased", pickup_bureau="[erased]", decided_at=at)
        case _:
            return row


def queue_ddl(schema: str) -> str:
    return f"""
    CREATE TABLE IF NOT EXISTS {schema}.applications (
        application_id  text PRIMARY KEY,
        citizen_ref     text        NOT NULL,
        pickup_bureau   text        NOT NULL,
        applied_at      timestamptz NOT NULL,
        status          text        NOT NULL,
        resubmission_of text,
        decided_by      text,
        decided_at      timestamptz,
        reason          text
    );
    CREATE INDEX IF NOT EXISTS applications_pending
        ON {schema}.applications (applied_at) WHERE status = 'pending';
    CREATE INDEX IF NOT EXISTS applications_of ON {schema}.applications (citizen_ref);
    """


_COLUMNS = ("application_id", "citizen_ref", "pickup_bureau", "applied_at", "status",
            "resubmission_of", "decided_by", "decided_at", "reason")
_TYPES = ("text", "text", "text", "timestamptz", "text", "text", "text", "timestamptz", "text")


def _application(record: asyncpg.Record) -> Application:
    return Application(**{c: record[c] for c in _COLUMNS})


class QueueWriter:
    """Applies review events to `applications` inside the consumer's transaction: a batch in
    two statements (load the rows it touches `FOR UPDATE`, upsert the changed ones)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    def handler(self) -> EventHandler:
        async def handle(conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
            await self.apply_all(conn, [envelope])

        return handle

    def batch_handler(self) -> BatchEventHandler:
        async def handle(conn: asyncpg.Connection, envelopes: Sequence[EventEnvelope]) -> None:
            await self.apply_all(conn, envelopes)

        return handle

    async def apply(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
        await self.apply_all(conn, [envelope])

    async def apply_all(self, conn: asyncpg.Connection,
                        envelopes: Sequence[EventEnvelope]) -> None:
        """Fold the events in order over the rows they concern (an erasure: every row of its
        citizen, also those the batch made), then save the rows that changed."""
        events = [(envelope, decode_followed(decode_event, envelope)) for envelope in envelopes]
        erased = sorted({e.citizen_ref for e, event in events if isinstance(event, SubjectErased)})
        records = await conn.fetch(
            f"SELECT * FROM {self.schema}.applications WHERE application_id = ANY($1::text[])"
            " OR citizen_ref = ANY($2::text[]) ORDER BY application_id FOR UPDATE",
            sorted({event.application_id for _, event in events
                    if not isinstance(event, SubjectErased)}), erased)
        rows: dict[str, Application | None] = {
            r["application_id"]: _application(r) for r in records}
        changed: dict[str, Application] = {}
        for envelope, event in events:
            ids = ([i for i, row in rows.items()
                    if row is not None and row.citizen_ref == envelope.citizen_ref]
                   if isinstance(event, SubjectErased) else [event.application_id])
            for application_id in ids:
                row = project(rows.get(application_id), envelope, event)
                rows[application_id] = row
                if row is not None:
                    changed[application_id] = row
        await self._save(conn, list(changed.values()))

    async def _save(self, conn: asyncpg.Connection, rows: Sequence[Application]) -> None:
        if not rows:
            return
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS[1:])
        arrays = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, start=1))
        await conn.execute(
            f"INSERT INTO {self.schema}.applications ({', '.join(_COLUMNS)})"
            f" SELECT * FROM unnest({arrays})"
            f" ON CONFLICT (application_id) DO UPDATE SET {updates}",
            *([getattr(row, c) for row in rows] for c in _COLUMNS))



class QueueReader:
    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self.pool = pool
        self.schema = schema

    async def pending(self, bureau: str | None = None, limit: int = 200) -> list[Application]:
        """Pending applications, oldest first, optionally of one pickup bureau."""
        records = await self.pool.fetch(
            f"SELECT * FROM {self.schema}.applications WHERE status = 'pending'"
            " AND ($1::text IS NULL OR pickup_bureau = $1) ORDER BY applied_at, application_id"
            " LIMIT $2", bureau, limit)
        return [_application(r) for r in records]

    async def bureaus(self) -> list[str]:
        records = await self.pool.fetch(
            f"SELECT DISTINCT pickup_bureau FROM {self.schema}.applications"
            " WHERE status = 'pending' ORDER BY pickup_bureau")
        return [r["pickup_bureau"] for r in records]

    async def get(self, application_id: str) -> Application | None:
        record = await self.pool.fetchrow(
            f"SELECT * FROM {self.schema}.applications WHERE application_id = $1",
            application_id)
        return None if record is None else _application(record)

    async def of_citizen(self, citizen_ref: str) -> Sequence[Application]:
        records = await self.pool.fetch(
            f"SELECT * FROM {self.schema}.applications WHERE citizen_ref = $1"
            " ORDER BY applied_at", citizen_ref)
        return [_application(r) for r in records]
