"""Loss's followers of review.events and issuance.events over a partition's batch: the
citizens' facts read once and written once per table, with what each event means for them,
and a reissue closing the loss on the facts as the batch left them."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.loss import domain
from services.loss.adapters import loss_ddl
from services.loss.handlers import LossHandlers
from services.loss.settings import LossSettings
from shared.contracts.issuance import CardIssued, CardReissued
from shared.contracts.loss import LossReported
from shared.contracts.review import (
    ApplicationWithdrawn,
    ReissueApplied,
    ReviewApproved,
    ReviewRejected,
)
from shared.envelope import EventEnvelope
from shared.events import EventMeta, to_pending
from shared.eventstore import PostgresEventStore
from shared.service import Kit
from tests.builders import CitizenStreams
from tests.support import schema_pair, statements_sent

pytestmark = pytest.mark.integration


@pytest.fixture
async def schemas(pool: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    async with schema_pair(pool, loss_ddl, ("lb", "lo")) as names:
        yield names


def applied(application_id: str) -> ReissueApplied:
    return ReissueApplied(application_id=application_id, loss_id="l", old_card_no="c",
                          address="enc:v1:a", phone="enc:v1:p", photo_ref="enc:v1:f",
                          pickup_bureau="futian", channel="app")


def approved(application_id: str) -> ReviewApproved:
    return ReviewApproved(application_id=application_id, reviewer_id="r",
                          pickup_bureau="futian", old_card_no="c")


async def formal_loss(pool: asyncpg.Pool, schema: str, ref: str) -> None:
    """The citizen's formal loss of card `c-old`, in force."""
    reported = LossReported(loss_id="l", kind="formal", card_no="c-old", expires_at=None,
                            financial_freeze=True, channel="app")
    async with pool.acquire() as conn, conn.transaction():
        await PostgresEventStore(conn, schema, f"{schema}.events").append(
            domain.stream_id(ref), 0,
            [to_pending(reported, EventMeta(ref, datetime.now(UTC), "c", "c"), uuid.uuid4())])


def events() -> tuple[list[EventEnvelope], list[EventEnvelope], list[str]]:
    """Three citizens' review and issuance events, each topic's interleaved as a partition
    would carry them: one whose approved application is reissued, one who is rejected, one
    who withdraws (a decision naming another application changes nothing); their refs."""
    reissued, rejected, withdrawn = CitizenStreams(), CitizenStreams(), CitizenStreams()
    on_review = [
        reissued.emit("review.events", applied("a-1")),
        rejected.emit("review.events", applied("b-1")),
        withdrawn.emit("review.events", applied("c-1")),
        reissued.emit("review.events", approved("a-1")),
        rejected.emit("review.events", ReviewRejected(application_id="b-1", reviewer_id="r",
                                                      reason="blurred photo")),
        withdrawn.emit("review.events", ApplicationWithdrawn(application_id="c-1",
                                                             reason="loss cancelled")),
        withdrawn.emit("review.events", approved("c-0")),
    ]
    on_issuance = [
        rejected.emit("issuance.events", CardIssued(card_no="b-card")),
        reissued.emit("issuance.events", CardReissued(application_id="a-1",
                                                      new_card_no="a-new", old_card_no="c-old")),
        rejected.emit("issuance.events", CardIssued(card_no="b-card-2")),
    ]
    refs = [reissued.citizen_ref, rejected.citizen_ref, withdrawn.citizen_ref]
    return on_review, on_issuance, refs


async def tables(pool: asyncpg.Pool, schema: str, refs: list[str],
                 ) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[str]]:
    order = {ref: i for i, ref in enumerate(refs)}
    applications = await pool.fetch(
        f"SELECT citizen_ref, application_id, status FROM {schema}.applications")
    cards = await pool.fetch(f"SELECT citizen_ref, card_no FROM {schema}.cards")
    types = await pool.fetch(f"SELECT type FROM {schema}.events ORDER BY position")
    return (sorted(((order[r[0]], *r[1:]) for r in applications), key=repr),
            sorted(((order[r[0]], r[1]) for r in cards), key=repr),
            [row["type"] for row in types])


async def test_a_batch_reads_the_facts_once_and_leaves_what_the_events_one_by_one_leave(
    pool: asyncpg.Pool, schemas: tuple[str, str],
) -> None:
    on_review, on_issuance, refs = events()
    batch, alone = schemas
    for schema in schemas:
        await formal_loss(pool, schema, refs[0])
    settings = LossSettings()

    handlers = LossHandlers(Kit(settings, batch, f"{batch}.events"))
    async with pool.acquire() as conn:
        with statements_sent(conn) as sent:
            async with conn.transaction():
                await handlers.on_review_events(conn, on_review)
                await handlers.on_issuance_events(conn, on_issuance)
    one_by_one = LossHandlers(Kit(settings, alone, f"{alone}.events"))
    for envelope in on_review:
        async with pool.acquire() as conn, conn.transaction():
            await one_by_one.on_review_event(conn, envelope)
    for envelope in on_issuance:
        async with pool.acquire() as conn, conn.transaction():
            await one_by_one.on_issuance_event(conn, envelope)

    left = await tables(pool, batch, refs)
    assert left == await tables(pool, alone, refs)
    assert left == (
        [(0, "a-1", "completed"), (1, "b-1", "rejected"), (2, "c-1", "none")],
        [(0, "a-new"), (1, "b-card-2")],
        ["LossReported", "LossClosed"],  # the reissue closed the loss in force
    )
    # Per follower: its citizens' facts read once, each table written once at the end.
    reads = [q for q in sent if f"LEFT JOIN {batch}.cards" in q]
    card_writes = [q for q in sent if f"INSERT INTO {batch}.cards" in q]
    application_writes = [q for q in sent if f"INSERT INTO {batch}.applications" in q]
    assert (len(reads), len(card_writes), len(application_writes)) == (2, 1, 2), sent
