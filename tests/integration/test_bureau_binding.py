"""A bureau channel bound to the bureaus it serves (`Channel.bureaus`): review and issuance
refuse its DecideReview and CollectCard for another bureau's application (`bureau_not_served`),
each learning the pickup bureau from its own state."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.issuance.adapters import issuance_ddl
from services.issuance.handlers import IssuanceHandlers
from services.issuance.settings import IssuanceSettings
from services.review import domain as review_domain
from services.review.adapters import ReviewTables, review_ddl
from services.review.handlers import ReviewHandlers
from services.review.settings import ReviewSettings
from shared.channels import Channel
from shared.commands import CommandContext
from shared.contracts.issuance import CollectCard
from shared.contracts.review import DecideReview, ReissueApplied, ReviewApproved
from shared.errors import BureauNotServedError
from shared.events import EventMeta, to_pending
from shared.eventstore import PostgresEventStore, migrate
from shared.identity import citizen_ref
from shared.service import Kit
from tests.builders import CitizenStreams
from tests.integration.auth.citizens import random_id_number
from tests.support import unique

pytestmark = pytest.mark.integration

FUTIAN = Channel(channel_id="bureau-futian", secret="s1", bureau=True, bureaus=("futian",))
NANSHAN = Channel(channel_id="bureau-nanshan", secret="s2", bureau=True, bureaus=("nanshan",))
CITYWIDE = Channel(channel_id="bureau-city", secret="s3", bureau=True)


def context(channel: Channel) -> CommandContext:
    now = datetime.now(UTC)
    return CommandContext(str(uuid.uuid4()), channel, now, now)


@pytest.fixture
async def schema(pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = unique("bb")
    yield name
    await pool.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


# --- review -------------------------------------------------------------------------------


async def pending_application(pool: asyncpg.Pool, schema: str, bureau: str) -> str:
    """A citizen's application awaiting review, to be picked up at `bureau`."""
    ref, application_id = uuid.uuid4().hex, str(uuid.uuid4())
    applied = ReissueApplied(application_id=application_id, loss_id="loss-1", old_card_no="C1",
                             address="enc:v1:a", phone="enc:v1:p", photo_ref="enc:v1:f",
                             pickup_bureau=bureau, channel="wechat-oa")
    meta = EventMeta(ref, datetime.now(UTC), str(uuid.uuid4()), str(uuid.uuid4()))
    async with pool.acquire() as conn, conn.transaction():
        await PostgresEventStore(conn, schema, f"{schema}.events").append(
            review_domain.stream_id(ref), 0, [to_pending(applied, meta, uuid.uuid4())])
        await ReviewTables(schema).record_application(conn, application_id, ref)
    return application_id


async def test_a_reviewer_at_another_bureau_can_neither_approve_nor_reject(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await migrate(pool, schema, review_ddl(schema))
    # Automatic approval off (the default): every decision here is a reviewer's.
    handlers = ReviewHandlers(Kit(ReviewSettings(review_auto_approve=False), schema,
                                  f"{schema}.events"))
    application_id = await pending_application(pool, schema, "futian")

    for decision in ("approve", "reject"):
        with pytest.raises(BureauNotServedError):
            async with pool.acquire() as conn, conn.transaction():
                await handlers.decide(conn, context(NANSHAN), DecideReview(
                    application_id=application_id, reviewer_id="r-9", decision=decision,
                    reason="not mine"))
    async with pool.acquire() as conn, conn.transaction():
        decided = await handlers.decide(conn, context(FUTIAN), DecideReview(
            application_id=application_id, reviewer_id="r-1", decision="approve"))
    assert decided["decision"] == "approve"
    # A channel with no list serves every bureau, as before.
    other = await pending_application(pool, schema, "nanshan")
    async with pool.acquire() as conn, conn.transaction():
        await handlers.decide(conn, context(CITYWIDE), DecideReview(
            application_id=other, reviewer_id="r-2", decision="approve"))
    types = [r["type"] for r in await pool.fetch(f"SELECT type FROM {schema}.events"
                                                 " ORDER BY position")]
    assert types.count("ReviewApproved") == 2 and "ReviewRejected" not in types


# --- issuance -----------------------------------------------------------------------------


async def test_a_card_waiting_at_one_bureau_cannot_be_collected_through_another(
    pool: asyncpg.Pool, schema: str,
) -> None:
    settings = IssuanceSettings()
    await migrate(pool, schema, issuance_ddl(schema))
    handlers = IssuanceHandlers(Kit(settings, schema, f"{schema}.events"))
    id_number = random_id_number()
    ref = citizen_ref(settings.citizen_ref_pepper.get_secret_value(), id_number)
    application_id = str(uuid.uuid4())
    # Issuance learns the pickup bureau from review.events: the approval makes the card ready.
    approval = CitizenStreams(ref).append(review_domain.stream_id(ref), ReviewApproved(
        application_id=application_id, reviewer_id="r-1", automatic=False,
        pickup_bureau="futian", old_card_no="C1"))
    async with pool.acquire() as conn, conn.transaction():
        await handlers.on_review_event(conn, approval)

    def collect(bureau: str) -> CollectCard:
        return CollectCard(application_id=application_id, bureau_id=bureau,
                           presented_id_number=id_number)

    # At its own counter (where the card is not) or naming the card's bureau (not its own).
    for bureau in ("nanshan", "futian"):
        with pytest.raises(BureauNotServedError):
            async with pool.acquire() as conn, conn.transaction():
                await handlers.collect_card(conn, context(NANSHAN), collect(bureau))
    async with pool.acquire() as conn, conn.transaction():
        collected = await handlers.collect_card(conn, context(FUTIAN), collect("futian"))
    assert collected["application_id"] == application_id
