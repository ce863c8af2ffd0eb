"""Review's follower of loss.events over a partition's batch: the citizens' loss cases read
and written once, and the same cases and withdrawals as the events applied one by one."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.review import domain
from services.review.adapters import ReviewTables, review_ddl
from services.review.handlers import ReviewHandlers
from services.review.settings import ReviewSettings
from shared.contracts.loss import LossCancelled, LossClosed, LossReported
from shared.contracts.review import ReissueApplied
from shared.envelope import EventEnvelope
from shared.events import EventMeta, to_pending
from shared.eventstore import PostgresEventStore
from shared.service import Kit
from tests.builders import CitizenStreams
from tests.support import schema_pair, statements_sent

pytestmark = pytest.mark.integration


@pytest.fixture
async def schemas(pool: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    async with schema_pair(pool, review_ddl, ("rb", "ro")) as names:
        yield names


async def applied_for(pool: asyncpg.Pool, schema: str, ref: str, loss_id: str) -> None:
    """The citizen's application for the loss `loss_id`, awaiting review."""
    application_id = str(uuid.uuid4())
    applied = ReissueApplied(application_id=application_id, loss_id=loss_id, old_card_no="c1",
                             address="enc:v1:a", phone="enc:v1:p", photo_ref="enc:v1:f",
                             pickup_bureau="futian", channel="wechat-oa")
    meta = EventMeta(ref, datetime.now(UTC), "c", "c")
    async with pool.acquire() as conn, conn.transaction():
        await PostgresEventStore(conn, schema, f"{schema}.events").append(
            domain.stream_id(ref), 0, [to_pending(applied, meta, uuid.uuid4())])
        await ReviewTables(schema).record_application(conn, application_id, ref)


def loss_events() -> tuple[list[EventEnvelope], str]:
    """Three citizens' loss events, interleaved as a partition would carry them: one whose
    formal loss is cancelled (its application withdrawn), one whose loss is closed, one
    whose loss stays in force; the first citizen's ref."""
    cancelled, closed, kept = CitizenStreams(), CitizenStreams(), CitizenStreams()
    events = [
        cancelled.emit("loss.events", LossReported(
            loss_id="l-1", kind="formal", card_no="c1", expires_at=None,
            financial_freeze=True, channel="app")),
        closed.emit("loss.events", LossReported(
            loss_id="l-2", kind="formal", card_no="c2", expires_at=None,
            financial_freeze=True, channel="app")),
        kept.emit("loss.events", LossReported(
            loss_id="l-3", kind="formal", card_no="c3", expires_at=None,
            financial_freeze=True, channel="app")),
        cancelled.emit("loss.events", LossCancelled(loss_id="l-1", financial_freeze=True)),
        closed.emit("loss.events", LossClosed(loss_id="l-2", new_card_no="c9")),
    ]
    return events, cancelled.citizen_ref


async def cases_and_events(pool: asyncpg.Pool,
                           schema: str) -> tuple[list[tuple[object, ...]], list[str]]:
    cases = await pool.fetch(f"SELECT citizen_ref, loss_id, kind, card_no, in_force"
                             f" FROM {schema}.losses ORDER BY citizen_ref")
    types = await pool.fetch(f"SELECT type FROM {schema}.events ORDER BY position")
    return [tuple(row) for row in cases], [row["type"] for row in types]


async def test_a_batch_leaves_the_cases_and_withdrawals_the_events_one_by_one_leave(
    pool: asyncpg.Pool, schemas: tuple[str, str],
) -> None:
    events, withdrawn = loss_events()
    batch, alone = schemas
    for schema in schemas:
        await applied_for(pool, schema, withdrawn, "l-1")
    settings = ReviewSettings(review_auto_approve=False)

    async with pool.acquire() as conn:
        with statements_sent(conn) as sent:
            async with conn.transaction():
                await ReviewHandlers(Kit(settings, batch, f"{batch}.events")).on_loss_events(
                    conn, events)
    handlers = ReviewHandlers(Kit(settings, alone, f"{alone}.events"))
    for envelope in events:
        async with pool.acquire() as conn, conn.transaction():
            await handlers.on_loss_event(conn, envelope)

    cases, types = await cases_and_events(pool, batch)
    assert (cases, types) == await cases_and_events(pool, alone)
    assert types == ["ReissueApplied", "ApplicationWithdrawn"]
    assert sorted((loss_id, in_force) for _, loss_id, _, _, in_force in cases) == [
        ("l-1", False), ("l-2", False), ("l-3", True)]
    # The cases are read once and written once: the withdrawal decides on the case in hand.
    reads = [q for q in sent if f"FROM {batch}.losses WHERE citizen_ref = ANY" in q]
    writes = [q for q in sent if f"INSERT INTO {batch}.losses" in q]
    assert (len(reads), len(writes)) == (1, 1), sent
