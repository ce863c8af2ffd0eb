"""The status projection's writer under its followers, on the real PostgreSQL: the lock the
four followers share is what keeps two topics' events of one citizen from overwriting each
other (the writer takes no lock of its own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import asyncpg
import pytest

from services.status.adapters import StatusWriter, load_rows, status_ddl, status_follower
from shared.consumer import BatchEventHandler, EventConsumer, Inbound
from shared.contracts import issuance, loss
from shared.envelope import EventEnvelope
from shared.eventstore import migrate
from shared.settings import CardDeskSettings
from tests.builders import CitizenStreams
from tests.support import RecordingDeadLetters, unique

pytestmark = pytest.mark.integration


@pytest.fixture
async def schema(pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = unique("sw")
    await migrate(pool, name, status_ddl(name))
    yield name
    await pool.execute(f"DROP SCHEMA {name} CASCADE")


def follower(pool: asyncpg.Pool, schema: str, topic: str, settings: CardDeskSettings,
             writer: StatusWriter, handler: BatchEventHandler | None = None) -> EventConsumer:
    """The status service's follower of `topic`, as `services.status.main` wires it."""
    return EventConsumer(pool, schema, status_follower(topic), writer.handler_for(topic),
                         RecordingDeadLetters(), settings=settings,  # type: ignore[arg-type]
                         batch_handler=handler or writer.batch_handler_for(topic))


async def test_two_followers_writing_one_new_citizen_at_once_both_reach_the_row(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    writer = StatusWriter(schema)
    c = CitizenStreams()
    issued = c.emit("issuance.events", issuance.CardIssued(card_no="A01234567"))
    reported = c.emit("loss.events", loss.LossReported(
        loss_id="l1", kind="formal", card_no="A01234567", expires_at=None,
        financial_freeze=True, channel="wechat-oa"))
    written = asyncio.Event()

    async def write_then_linger(conn: asyncpg.Connection,
                                envelopes: Sequence[EventEnvelope]) -> None:
        await writer.apply_all(conn, envelopes, "issuance.events")
        written.set()
        await asyncio.sleep(0.5)  # not committed yet: the loss follower comes now

    card = follower(pool, schema, "issuance.events", settings, writer, handler=write_then_linger)
    losses = follower(pool, schema, "loss.events", settings, writer)
    first = asyncio.create_task(card.handle(Inbound("issuance.events", 0, 0, b"c",
                                                    issued.to_bytes())))
    await asyncio.wait_for(written.wait(), timeout=10)
    await asyncio.wait_for(losses.handle(Inbound("loss.events", 0, 0, b"c",
                                                 reported.to_bytes())), timeout=10)
    await asyncio.wait_for(first, timeout=10)

    async with pool.acquire() as conn:
        row = (await load_rows(conn, schema, [c.citizen_ref]))[c.citizen_ref]
    # Without the shared lock the loss follower projects onto no row and overwrites the card.
    assert (row.card_no_masked, row.loss_kind, row.status.value) == ("*****4567", "formal",
                                                                     "LOST")
