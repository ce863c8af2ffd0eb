"""The console's review queue written a batch at a time, on the real PostgreSQL: the same
rows as one event at a time, in two statements however many events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest

from services.console.queue import QueueWriter, queue_ddl
from shared.contracts import review
from shared.contracts.common import SubjectErased
from shared.envelope import EventEnvelope
from tests.builders import CitizenStreams
from tests.support import schema_pair, statements_sent

pytestmark = pytest.mark.integration


@pytest.fixture
async def schemas(pool: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    async with schema_pair(pool, queue_ddl, ("qa", "qb")) as names:
        yield names


def applied(streams: CitizenStreams, application_id: str) -> EventEnvelope:
    return streams.emit("review.events", review.ReissueApplied(
        application_id=application_id, loss_id="loss-1", old_card_no=None,
        address="enc:v1:x", phone="enc:v1:x", photo_ref="enc:v1:x",
        pickup_bureau="bureau-001", channel="wechat-oa"))


async def rows(pool: asyncpg.Pool, schema: str) -> list[tuple[object, ...]]:
    return [tuple(r) for r in await pool.fetch(
        f"SELECT * FROM {schema}.applications ORDER BY application_id")]


async def test_a_batch_leaves_the_queue_as_its_events_one_by_one_in_two_statements(
    pool: asyncpg.Pool, schemas: tuple[str, str],
) -> None:
    batched, alone = schemas
    one, two = (CitizenStreams(step=timedelta(seconds=1)) for _ in range(2))
    earlier = applied(one, "a-0")
    async with pool.acquire() as conn:
        for schema in schemas:  # a row from an earlier batch, which the erasure reaches too
            await QueueWriter(schema).apply(conn, earlier)
    events = [
        applied(one, "a-1"),
        applied(two, "b-1"),
        one.emit("review.events", review.ReviewApproved(
            application_id="a-1", reviewer_id="r-1", pickup_bureau="bureau-001",
            old_card_no=None)),
        two.emit("review.events", review.ApplicationWithdrawn(application_id="b-1",
                                                              reason="cancelled")),
        two.emit("review.events", review.ReviewRejected(application_id="unknown",
                                                        reviewer_id="r-1", reason="none")),
        one.emit("review.events", SubjectErased(reason="request")),
        applied(two, "b-2"),
    ]
    async with pool.acquire() as conn, conn.transaction():
        with statements_sent(conn) as sent:
            await QueueWriter(batched).apply_all(conn, events)
    async with pool.acquire() as conn:
        for envelope in events:
            await QueueWriter(alone).apply(conn, envelope)

    assert len(sent) == 2, sent  # load FOR UPDATE, upsert
    assert await rows(pool, batched) == await rows(pool, alone)
    statuses = {r[0]: r[4] for r in await rows(pool, batched)}
    assert statuses == {"a-0": "erased", "a-1": "erased", "b-1": "withdrawn", "b-2": "pending"}
