"""The status projection's writer under its followers, on the real PostgreSQL: the lock the
four followers share is what keeps two topics' events of one citizen from overwriting each
other (the writer takes no lock of its own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.status.adapters import StatusWriter, load_rows, status_ddl, status_follower
from services.status.projection import project
from shared import checked
from shared.chain import chain_columns, chain_insert
from shared.checked import Bookkeeping, CheckedFollow
from shared.consumer import BatchEventHandler, EventConsumer, Inbound
from shared.contracts import issuance, loss
from shared.envelope import EventEnvelope
from shared.eventstore import migrate
from shared.locks import citizen_namespace
from shared.metrics import REGISTRY
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


def checked_follower(pool: asyncpg.Pool, schema: str, topic: str, settings: CardDeskSettings,
                     writer: StatusWriter) -> EventConsumer:
    """The status service's follower of `topic` with its checked writes, as wired in
    `services.status.main`."""
    return EventConsumer(pool, schema, status_follower(topic), writer.handler_for(topic),
                         RecordingDeadLetters(), settings=settings,  # type: ignore[arg-type]
                         batch_handler=writer.batch_handler_for(topic),
                         checked=CheckedFollow(writer, topic))


class Outcomes(StatusWriter):
    """The status writer, noting what each checked call returned."""

    def __init__(self, schema: str) -> None:
        super().__init__(schema)
        self.returned: list[bool] = []

    async def apply_checked(self, *args: Any, **kwargs: Any) -> bool:
        applied = await super().apply_checked(*args, **kwargs)
        self.returned.append(applied)
        return applied


def records(topic: str, envelopes: Sequence[EventEnvelope]) -> list[Inbound]:
    return [Inbound(topic, 0, offset, e.citizen_ref.encode(), e.to_bytes())
            for offset, e in enumerate(envelopes)]


async def bookkeeping(pool: asyncpg.Pool, schema: str) -> tuple[int, int, int]:
    """How many processed rows, chain rows and timeline entries the schema holds."""
    return tuple(await pool.fetchrow(
        f"SELECT (SELECT count(*) FROM {schema}.processed),"
        f" (SELECT count(*) FROM {schema}.followed_chain),"
        f" (SELECT count(*) FROM {schema}.card_timeline)"))


def checked_writes(topic: str, status: str) -> float:
    """How many batches of `topic`'s status follower were checked calls with that outcome,
    in this process (every test's follower has the same name)."""
    return REGISTRY.get_sample_value("carddesk_checked_writes_total", {
        "consumer": status_follower(topic), "status": status}) or 0.0


def formal_loss(c: CitizenStreams) -> EventEnvelope:
    return c.emit("loss.events", loss.LossReported(
        loss_id="l1", kind="formal", card_no="A01234567", expires_at=None,
        financial_freeze=True, channel="wechat-oa"))


async def test_a_checked_batch_is_one_read_and_one_call_with_no_transaction_of_its_own(
    counted: tuple[asyncpg.Pool, list[str]], schema: str, settings: CardDeskSettings,
) -> None:
    pool, sent = counted
    writer = Outcomes(schema)
    cards = checked_follower(pool, schema, "issuance.events", settings, writer)
    a, b = CitizenStreams(), CitizenStreams()
    warm = CitizenStreams()  # asyncpg prepares each statement once
    await cards.handle_batch(records("issuance.events", [
        warm.emit("issuance.events", issuance.CardIssued(card_no="A00000000"))]))
    batch = [a.emit("issuance.events", issuance.CardIssued(card_no="A01234567")),
             b.emit("issuance.events", issuance.CardIssued(card_no="B07654321")),
             a.emit("issuance.events", issuance.CardProductionStarted(
                 application_id="app-1", pickup_bureau="bureau-1",
                 ready_by=datetime.now(UTC)))]
    sent.clear()
    applied_before = checked_writes("issuance.events", "applied")
    await cards.handle_batch(records("issuance.events", batch))
    assert checked_writes("issuance.events", "applied") == applied_before + 1
    assert len(sent) == 2 and not any(q.startswith(("BEGIN", "COMMIT")) for q in sent), sent
    assert writer.returned == [True, True]
    async with pool.acquire() as conn:
        rows = await load_rows(conn, schema, [a.citizen_ref, b.citizen_ref])
    assert rows == {a.citizen_ref: project(project(None, batch[0]), batch[2]),
                    b.citizen_ref: project(None, batch[1])}
    assert await bookkeeping(pool, schema) == (4, 4, 4)

    sent.clear()
    await cards.handle_batch(records("issuance.events", batch))  # redelivered
    assert len(sent) == 1, sent  # the read: nothing to write
    assert await bookkeeping(pool, schema) == (4, 4, 4)


async def test_a_checked_write_that_finds_the_row_changed_since_its_read_goes_the_locked_way(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    plain, checked = StatusWriter(schema), Outcomes(schema)
    c = CitizenStreams()
    issued = c.emit("issuance.events", issuance.CardIssued(card_no="A01234567"))
    reported = formal_loss(c)
    written = asyncio.Event()

    async def write_then_linger(conn: asyncpg.Connection,
                                envelopes: Sequence[EventEnvelope]) -> None:
        await plain.apply_all(conn, envelopes, "issuance.events")
        written.set()
        await asyncio.sleep(0.5)  # not committed yet: the loss follower reads no row now

    card = follower(pool, schema, "issuance.events", settings, plain, handler=write_then_linger)
    losses = checked_follower(pool, schema, "loss.events", settings, checked)
    missed_before = checked_writes("loss.events", "missed")
    first = asyncio.create_task(card.handle(records("issuance.events", [issued])[0]))
    await asyncio.wait_for(written.wait(), timeout=10)
    await asyncio.wait_for(losses.handle(records("loss.events", [reported])[0]), timeout=10)
    await asyncio.wait_for(first, timeout=10)

    assert checked.returned == [False]  # it read no row; under the lock there was one
    assert checked_writes("loss.events", "missed") == missed_before + 1
    async with pool.acquire() as conn:
        row = (await load_rows(conn, schema, [c.citizen_ref]))[c.citizen_ref]
    # Without the check the loss follower writes its row over the card's.
    assert (row.card_no_masked, row.loss_kind, row.status.value) == ("*****4567", "formal",
                                                                     "LOST")
    assert await bookkeeping(pool, schema) == (2, 2, 2)


async def checked_call(pool: asyncpg.Pool, writer: StatusWriter, topic: str,
                       envelopes: Sequence[EventEnvelope],
                       between: Callable[[asyncpg.Connection], Awaitable[object]]) -> bool:
    """The unlocked read of `envelopes` (none processed or recorded before), `between`,
    then the checked call that writes them all."""
    consumed = [(status_follower(topic), str(e.event_id)) for e in envelopes]
    async with pool.acquire() as conn:
        found = await checked.read(conn, writer, timedelta(days=1), envelopes, consumed)
        await between(conn)
        return await writer.apply_checked(
            conn, citizen_namespace(writer.schema), found, [(topic, envelopes)],
            Bookkeeping.of(found, consumed, list(envelopes)))


async def test_a_checked_write_changes_nothing_when_a_stream_moved_after_its_read(
    pool: asyncpg.Pool, schema: str,
) -> None:
    c = CitizenStreams()
    reported = formal_loss(c)

    async def another_instance_took_it(conn: asyncpg.Connection) -> None:
        await conn.execute(chain_insert(schema, 1), *chain_columns([reported]))

    applied = await checked_call(pool, StatusWriter(schema), "loss.events", [reported],
                                 another_instance_took_it)
    assert applied is False
    assert await bookkeeping(pool, schema) == (0, 1, 0)
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.card_status") == 0


async def test_a_checked_write_undoes_itself_when_an_event_was_recorded_processed_meanwhile(
    pool: asyncpg.Pool, schema: str,
) -> None:
    c = CitizenStreams()
    reported = formal_loss(c)

    async def recorded_without_the_lock(conn: asyncpg.Connection) -> None:
        await conn.execute(f"INSERT INTO {schema}.processed (consumer, message_id)"
                           " VALUES ($1, $2)", status_follower("loss.events"),
                           str(reported.event_id))

    with pytest.raises(asyncpg.exceptions.SerializationError):
        await checked_call(pool, StatusWriter(schema), "loss.events", [reported],
                           recorded_without_the_lock)
    assert await bookkeeping(pool, schema) == (1, 0, 0)
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.card_status") == 0


async def test_two_topics_of_one_fetch_are_one_checked_read_and_one_call(
    counted: tuple[asyncpg.Pool, list[str]], schema: str, settings: CardDeskSettings,
) -> None:
    pool, sent = counted
    writer = Outcomes(schema)
    cards = checked_follower(pool, schema, "issuance.events", settings, writer)
    losses = checked_follower(pool, schema, "loss.events", settings, writer)
    warm, c = CitizenStreams(), CitizenStreams()
    await EventConsumer.handle_together([
        (cards, records("issuance.events", [
            warm.emit("issuance.events", issuance.CardIssued(card_no="A00000000"))])),
        (losses, records("loss.events", [formal_loss(warm)]))])
    sent.clear()
    await EventConsumer.handle_together([
        (cards, records("issuance.events", [
            c.emit("issuance.events", issuance.CardIssued(card_no="A01234567"))])),
        (losses, records("loss.events", [formal_loss(c)]))])
    assert len(sent) == 2, sent
    assert writer.returned == [True, True]
    async with pool.acquire() as conn:
        row = (await load_rows(conn, schema, [c.citizen_ref]))[c.citizen_ref]
    assert (row.card_no_masked, row.loss_kind, row.status.value) == ("*****4567", "formal",
                                                                     "LOST")
    assert await pool.fetch(
        f"SELECT consumer FROM {schema}.processed p JOIN {schema}.card_timeline t"
        " ON t.event_id = p.message_id WHERE t.citizen_ref = $1 ORDER BY consumer",
        c.citizen_ref) == [(status_follower("issuance.events"),),
                           (status_follower("loss.events"),)]
