"""Issuance's follower of review.events over a partition's batch: the approvals' applications
recorded in one statement and their card numbers drawn in one more, with the cards the
approvals one by one give; an application already another citizen's refuses the batch."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.issuance.adapters import issuance_ddl
from services.issuance.handlers import IssuanceHandlers
from services.issuance.settings import IssuanceSettings
from shared.consumer import Rejected
from shared.contracts.review import ReissueApplied, ReviewApproved
from shared.envelope import EventEnvelope
from shared.service import Kit
from tests.builders import CitizenStreams
from tests.support import schema_pair, statements_sent

pytestmark = pytest.mark.integration

SETTINGS = IssuanceSettings(issuance_production_seconds=0)


@pytest.fixture
async def schemas(pool: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    async with schema_pair(pool, issuance_ddl, ("ib", "io")) as names:
        yield names


def approved(application_id: str) -> ReviewApproved:
    return ReviewApproved(application_id=application_id, reviewer_id="r",
                          pickup_bureau="futian", old_card_no=f"old-{application_id}")


def applied(application_id: str) -> ReissueApplied:
    return ReissueApplied(application_id=application_id, loss_id="l", old_card_no="c",
                          address="enc:v1:a", phone="enc:v1:p", photo_ref="enc:v1:f",
                          pickup_bureau="futian", channel="app")


def approvals(count: int) -> list[EventEnvelope]:
    """`count` citizens' applications and approvals, interleaved as a partition carries them."""
    citizens = [CitizenStreams() for _ in range(count)]
    return ([c.emit("review.events", applied(f"a-{i}")) for i, c in enumerate(citizens)]
            + [c.emit("review.events", approved(f"a-{i}")) for i, c in enumerate(citizens)])


async def cards(pool: asyncpg.Pool, schema: str,
                envelopes: list[EventEnvelope]) -> list[tuple[int, str, str | None]]:
    """Each citizen's events (by first appearance) in order, with their old card number."""
    order = {ref: i for i, ref in enumerate(dict.fromkeys(e.citizen_ref for e in envelopes))}
    rows = await pool.fetch(f"SELECT citizen_ref, type, body::jsonb -> 'data' ->> 'old_card_no'"
                            f" AS old FROM {schema}.events ORDER BY position")
    return sorted(((order[r["citizen_ref"]], r["type"], r["old"]) for r in rows), key=repr)


async def test_a_batch_of_approvals_records_and_numbers_them_at_once_as_one_by_one(
    pool: asyncpg.Pool, schemas: tuple[str, str],
) -> None:
    batch, alone = schemas
    envelopes = approvals(3)
    handlers = IssuanceHandlers(Kit(SETTINGS, batch, f"{batch}.events"))
    async with pool.acquire() as conn:
        with statements_sent(conn) as sent:
            async with conn.transaction():
                await handlers.on_review_events(conn, envelopes)
    one_by_one = IssuanceHandlers(Kit(SETTINGS, alone, f"{alone}.events"))
    for envelope in envelopes:
        async with pool.acquire() as conn, conn.transaction():
            await one_by_one.on_review_event(conn, envelope)

    assert await cards(pool, batch, envelopes) == await cards(pool, alone, envelopes)
    assert [kind for _, kind, _ in await cards(pool, batch, envelopes)].count(
        "CardReissued") == 3
    new_cards = await pool.fetch(f"SELECT DISTINCT body::jsonb -> 'data' ->> 'new_card_no'"
                                 f" FROM {batch}.events WHERE type = 'CardReissued'")
    assert len(new_cards) == 3
    assert sum(f"INTO {batch}.applications" in query for query in sent) == 1, sent
    assert sum("nextval" in query for query in sent) == 1, sent


async def test_an_approval_of_another_citizens_application_refuses_the_batch(
    pool: asyncpg.Pool, schemas: tuple[str, str],
) -> None:
    batch, _ = schemas
    envelopes = approvals(2)
    handlers = IssuanceHandlers(Kit(SETTINGS, batch, f"{batch}.events"))
    other = CitizenStreams().emit("review.events", approved("a-1"))  # a-1 is someone else's
    with pytest.raises(Rejected, match="another citizen"):
        async with pool.acquire() as conn, conn.transaction():
            await handlers.on_review_events(conn, [*envelopes, other])
