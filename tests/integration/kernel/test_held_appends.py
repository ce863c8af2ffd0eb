"""A command batch's appends, held and written in one statement before its replies: each
command still decides on what the ones before it appended, a stream that moved on meanwhile
keeps nothing of the batch, and the batch then runs again command by command."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import structlog.testing
from pydantic import BaseModel

from shared.application import StateCache, handle_command
from shared.channels import Channel, ChannelRegistry, sign
from shared.commands import CommandContext, CommandIntake, CommandRoute
from shared.consumer import Inbound
from shared.contracts.loss import LossCancelled
from shared.envelope import GENESIS_HASH, verify_stream
from shared.events import EventMeta
from shared.eventstore import (
    HeldAppendsConflictError,
    PostgresEventStore,
    holding_appends,
)
from shared.settings import CardDeskSettings
from shared.topics import reply_topic
from tests.builders import COUNTER, pending
from tests.support import RecordingDeadLetters

pytestmark = pytest.mark.integration

TOPIC = "probe.events"
CHANNEL = Channel(channel_id="held-channel", secret="held-secret")




async def outbox_event_ids(conn: asyncpg.Connection, schema: str) -> list[str]:
    rows = await conn.fetch(f"SELECT headers FROM {schema}.outbox ORDER BY position")
    return [v for row in rows for k, v in json.loads(row["headers"]) if k == "event-id"]


async def test_held_appends_are_read_back_within_the_batch_and_written_in_one_statement(
    counted: tuple[asyncpg.Pool, list[str]], schema: str,
) -> None:
    pool, sent = counted
    async with pool.acquire() as conn, conn.transaction():
        [before] = await PostgresEventStore(conn, schema, TOPIC).append(
            "b", 0, pending(1), last_hash=GENESIS_HASH)

    async with pool.acquire() as conn, conn.transaction():
        store = PostgresEventStore(conn, schema, TOPIC)
        with holding_appends(conn, schema) as held:
            sent.clear()
            first = await store.append("a", 0, pending(2), last_hash=GENESIS_HASH)
            second = await store.append("b", 1, pending(1), last_hash=before.hash)
            # The next command on stream a reads the held events as its head and history.
            assert await store.head("a") == (2, first[-1].hash)
            assert (await store.heads(["a", "b", "c"]))["b"] == (2, second[0].hash)
            third = await store.append("a", 2, pending(1))
            assert [e.version for e in await store.read_stream("a", after_version=1)] == [2, 3]
            assert not [q for q in sent if "INSERT" in q]  # nothing written yet
            await held.flush()
    inserts = [q for q in sent if "INSERT" in q]
    assert len(inserts) == 1, sent  # every held event, and its outbox row, at once

    async with pool.acquire() as conn:
        store = PostgresEventStore(conn, schema, TOPIC)
        for stream_id in ("a", "b"):
            events = await store.read_stream(stream_id)
            assert verify_stream(stream_id, [e.to_json_dict() for e in events]) == []
        assert [e.version for e in await store.read_stream("a")] == [1, 2, 3]
        # The outbox rows in the order the batch appended, across streams.
        assert await outbox_event_ids(conn, schema) == [
            str(e.event_id) for e in (before, *first, *second, *third)]


async def test_held_appends_onto_a_stream_another_writer_moved_keep_nothing(
    pool: asyncpg.Pool, schema: str,
) -> None:
    async with pool.acquire() as conn, conn.transaction():
        [base] = await PostgresEventStore(conn, schema, TOPIC).append(
            "moved", 0, pending(1), last_hash=GENESIS_HASH)

    async def batch() -> None:
        async with pool.acquire() as conn, conn.transaction():
            store = PostgresEventStore(conn, schema, TOPIC)
            with holding_appends(conn, schema) as held:
                await store.append("fresh", 0, pending(1), last_hash=GENESIS_HASH)
                await store.append("moved", 1, pending(1), last_hash=base.hash)
                async with pool.acquire() as other, other.transaction():  # gets there first
                    await PostgresEventStore(other, schema, TOPIC).append(
                        "moved", 1, pending(1), last_hash=base.hash)
                await held.flush()

    with pytest.raises(HeldAppendsConflictError):
        await batch()

    async with pool.acquire() as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.events"
                                   " WHERE stream_id = 'fresh'") == 0
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.events") == 2
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox") == 2


class Note(BaseModel):
    stream: str


def command(offset: int, stream: str) -> Inbound:
    request_id = str(uuid.uuid4())
    value = json.dumps({"request_id": request_id, "channel": CHANNEL.channel_id,
                        "issued_at": datetime.now(UTC).isoformat(), "type": "Count",
                        "payload": {"stream": stream}}).encode()
    return Inbound("probe.commands", 0, offset, request_id.encode(), value,
                   {"x-channel-id": CHANNEL.channel_id.encode(),
                    "x-signature": sign(CHANNEL.secret, value).encode()})


def counting_intake(pool: asyncpg.Pool, schema: str, cache: StateCache,
                    dead: RecordingDeadLetters) -> CommandIntake:
    """A probe service whose command appends one event to the stream it names."""
    async def count(conn: asyncpg.Connection, ctx: CommandContext,
                    payload: Note) -> dict[str, Any]:
        meta = EventMeta(payload.stream, ctx.received_at, ctx.correlation_id, ctx.causation_id)
        [event] = await handle_command(PostgresEventStore(conn, schema, TOPIC), COUNTER,
                                       payload.stream, lambda _: [LossCancelled(loss_id="l")],
                                       meta, cache)
        return {"version": event.version}

    return CommandIntake(pool, schema, ChannelRegistry({CHANNEL.channel_id: CHANNEL}),
                         {"Count": CommandRoute(Note, count)}, dead,  # type: ignore[arg-type]
                         lambda: datetime.now(UTC),
                         settings=CardDeskSettings(consumer_max_attempts=2))


async def test_a_batch_writes_its_appends_and_its_replies_in_one_statement(
    counted: tuple[asyncpg.Pool, list[str]], schema: str,
) -> None:
    pool, sent = counted
    dead = RecordingDeadLetters()
    intake = counting_intake(pool, schema, StateCache(), dead)
    sent.clear()
    await intake.handle_batch([command(0, "x"), command(1, "y"), command(2, "x")])

    writes = [q for q in sent if "INSERT" in q]
    assert len(writes) == 1, sent
    assert "stored_replies" in writes[0] and "events" in writes[0]
    async with pool.acquire() as conn:
        topics = [r["topic"] for r in await conn.fetch(
            f"SELECT topic FROM {schema}.outbox ORDER BY position")]
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.stored_replies") == 3
    # The relay sends a reply only after the events queued before it.
    assert topics == [TOPIC] * 3 + [reply_topic(CHANNEL.channel_id)] * 3
    assert dead.sent == []


async def test_a_batch_decided_on_a_cached_state_of_a_rolled_back_write_runs_again(
    pool: asyncpg.Pool, schema: str,
) -> None:
    cache = StateCache()
    dead = RecordingDeadLetters()
    intake = counting_intake(pool, schema, cache, dead)
    await intake.handle_batch([command(0, "stale")])
    # A write that was rolled back left version 2 of "stale" in the cache.
    with contextlib.suppress(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await handle_command(PostgresEventStore(conn, schema, TOPIC), COUNTER, "stale",
                                 lambda _: [LossCancelled(loss_id="l")],
                                 EventMeta("stale", datetime.now(UTC), "c", "c"), cache)
            raise RuntimeError("rolled back")

    with structlog.testing.capture_logs() as logs:
        await intake.handle_batch(
            [command(1, "other"), command(2, "stale"), command(3, "other")])

    # The held appends met the rolled-back base; the batch ran again, appending one by one.
    assert [e["event"] for e in logs if e["event"].startswith("batch.")] == [
        "batch.appends_conflicted"]

    rows = await pool.fetch(f"SELECT value FROM {schema}.outbox WHERE topic = $1"
                            " ORDER BY position", reply_topic(CHANNEL.channel_id))
    replies = [json.loads(r["value"]) for r in rows]
    assert [(r["code"], r["data"]) for r in replies] == [
        ("accepted", {"version": 1}), ("accepted", {"version": 1}),
        ("accepted", {"version": 2}), ("accepted", {"version": 2})]
    assert dead.sent == []
    async with pool.acquire() as conn:
        store = PostgresEventStore(conn, schema, TOPIC)
        for stream_id in ("stale", "other"):
            events = await store.read_stream(stream_id)
            assert [e.version for e in events] == [1, 2]
            assert verify_stream(stream_id, [e.to_json_dict() for e in events]) == []
