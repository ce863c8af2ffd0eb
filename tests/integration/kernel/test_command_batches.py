"""A partition's commands run in one transaction, and each still gets exactly the reply and the
effects it would get alone (DESIGN section 9: idempotent replies, nothing half-applied)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel

from shared.channels import Channel, ChannelRegistry, sign
from shared.commands import CommandContext, CommandIntake, CommandRoute, Reply
from shared.consumer import Inbound
from shared.errors import DomainError
from shared.intake.prepare import prepared
from shared.outbox import notify_channel
from shared.settings import CardDeskSettings
from shared.topics import reply_topic
from tests.support import RecordingDeadLetters

pytestmark = pytest.mark.integration

CHANNEL = Channel(channel_id="probe-channel", secret="probe-secret")
REPLIES_TOPIC = reply_topic(CHANNEL.channel_id)
SETTINGS = CardDeskSettings(consumer_max_attempts=2)
WRITES_DDL = "CREATE TABLE {schema}.writes (seq bigserial PRIMARY KEY, note text NOT NULL)"


class Note(BaseModel):
    note: str


class ProbeRefusalError(DomainError):
    code = "refused_by_probe"


class Lagging:
    """Stands in for the follower barrier: the followers behind until told otherwise."""

    def __init__(self) -> None:
        self.behind = True

    async def caught_up(self) -> bool:
        return not self.behind


class Preparations:
    """A service's batch preparation: what it was asked for, pass by pass."""

    def __init__(self) -> None:
        self.asked: list[set[str]] = []

    async def __call__(self, conn: asyncpg.Connection, citizens: Collection[str]) -> str:
        self.asked.append(set(citizens))
        return f"pass {len(self.asked)}"


def citizen_of_note(_context: CommandContext, payload: Note) -> str:
    if payload.note.startswith("forged"):
        raise ProbeRefusalError("its session names nobody")
    return payload.note.split()[-1]


def intake(pool: asyncpg.Pool, schema: str, dead: RecordingDeadLetters, *,
           barrier: Lagging | None = None, prepare: Preparations | None = None,
           ) -> CommandIntake:
    """A probe service writing each note; with `prepare`, its notes name their citizen last,
    and each reply says what the handler found prepared."""
    async def write(conn: asyncpg.Connection, _: CommandContext, payload: Note) -> dict[str, Any]:
        await conn.execute(f"INSERT INTO {schema}.writes (note) VALUES ($1)", payload.note)
        if payload.note.startswith("refuse"):
            raise ProbeRefusalError("refused after a write, which must be undone")
        if payload.note.startswith("explode"):
            raise ValueError("a bug, not a refusal")
        return {"note": payload.note} if prepare is None else {"prepared": prepared(conn)}

    route = CommandRoute(Note, write, citizen=None if prepare is None else citizen_of_note)
    return CommandIntake(pool, schema, ChannelRegistry({CHANNEL.channel_id: CHANNEL}),
                         {"Write": route}, dead,  # type: ignore[arg-type]
                         lambda: datetime.now(UTC), settings=SETTINGS,
                         barrier=barrier, prepare=prepare)  # type: ignore[arg-type]


def command(offset: int, note: str, request_id: str | None = None, *,
            secret: str = CHANNEL.secret) -> Inbound:
    request_id = request_id or str(uuid.uuid4())
    value = json.dumps({"request_id": request_id, "channel": CHANNEL.channel_id,
                        "issued_at": datetime.now(UTC).isoformat(), "type": "Write",
                        "payload": {"note": note}}).encode()
    return Inbound("probe.commands", 0, offset, request_id.encode(), value,
                   {"x-channel-id": CHANNEL.channel_id.encode(),
                    "x-signature": sign(secret, value).encode()})


async def queued_replies(pool: asyncpg.Pool, schema: str) -> list[Reply]:
    rows = await pool.fetch(f"SELECT value FROM {schema}.outbox WHERE topic = $1"
                            " ORDER BY position", REPLIES_TOPIC)
    return [Reply.model_validate_json(r["value"]) for r in rows]


async def notes(pool: asyncpg.Pool, schema: str) -> list[str]:
    return [r["note"] for r in await pool.fetch(f"SELECT note FROM {schema}.writes ORDER BY seq")]


async def test_a_batch_replies_to_each_command_as_if_it_had_come_alone(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    dead = RecordingDeadLetters()
    first = command(0, "one")
    batch = [first, command(1, "refuse me"), command(2, "forged", secret="wrong"),
             command(3, "one again", first.key.decode() if first.key else None),
             command(4, "two")]
    # The repeat carries a different body under the same request id: the stored reply wins.
    await intake(pool, schema, dead).handle_batch(batch)

    replies = await queued_replies(pool, schema)
    assert [(r.status, r.code) for r in replies] == [
        ("accepted", "accepted"), ("rejected", "refused_by_probe"),
        ("accepted", "accepted"), ("accepted", "accepted")]
    assert replies[0] == replies[2]  # the repeated request got the identical reply
    assert replies[3].data == {"note": "two"}
    assert await notes(pool, schema) == ["one", "two"]  # the refusal's write was undone
    assert dead.sent == [(2, "bad_signature")]
    assert dead.producer.sent == []  # failing authentication earns no reply at all
    stored = await pool.fetchval(f"SELECT count(*) FROM {schema}.stored_replies")
    assert stored == 3

    # Redelivered after a crash before the offset commit: the same replies, nothing new.
    await intake(pool, schema, dead).handle_batch(batch)
    assert (await queued_replies(pool, schema))[4:] == replies
    assert await notes(pool, schema) == ["one", "two"]


async def test_a_batch_that_appends_no_events_still_wakes_the_relay_for_its_replies(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    woken = asyncio.Event()
    def wake(*_: object) -> None:
        woken.set()

    async with pool.acquire() as listener:
        await listener.add_listener(notify_channel(schema), wake)
        await intake(pool, schema, RecordingDeadLetters()).handle_batch([command(0, "one")])
        await asyncio.wait_for(woken.wait(), 10)
        await listener.remove_listener(notify_channel(schema), wake)
    assert [r.data for r in await queued_replies(pool, schema)] == [{"note": "one"}]


async def test_a_command_that_fails_undoes_the_batch_and_each_is_run_alone(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    dead = RecordingDeadLetters()
    await intake(pool, schema, dead).handle_batch(
        [command(0, "before"), command(1, "explode"), command(2, "after")])

    assert await notes(pool, schema) == ["before", "after"]
    assert [r.data for r in await queued_replies(pool, schema)] == [
        {"note": "before"}, {"note": "after"}]
    assert dead.sent == [(1, "processing_failed")]


async def test_stored_replies_are_purged_once_a_repeat_would_be_stale_anyway(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    probe = intake(pool, schema, RecordingDeadLetters())
    await probe.handle_batch([command(0, "old"), command(1, "recent")])
    await pool.execute(f"UPDATE {schema}.stored_replies SET created_at = now() - $1::interval"
                       " WHERE request_id IN (SELECT request_id FROM {schema}.stored_replies"
                       "  ORDER BY created_at LIMIT 1)".replace("{schema}", schema),
                       2 * probe.freshness + timedelta(seconds=1))

    # The outbox rows of those replies: one sent long ago, one sent just now, one not yet.
    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() - $1::interval"
                       " WHERE position = (SELECT min(position) FROM {schema}.outbox)"
                       .replace("{schema}", schema), 2 * probe.freshness + timedelta(seconds=1))
    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now()"
                       " WHERE position = (SELECT max(position) FROM {schema}.outbox)"
                       .replace("{schema}", schema))
    await pool.execute(f"INSERT INTO {schema}.outbox (topic, value, sent_at)"
                       " VALUES ('loss.events', 'x', now() - interval '1 day')")

    assert await probe.purge_stored_replies(batch=1) == 1
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.stored_replies") == 1
    # Only the reply sent long ago left the outbox; events keep the relay's own retention.
    assert [r["topic"] for r in await pool.fetch(
        f"SELECT topic FROM {schema}.outbox ORDER BY position")] == [
        REPLIES_TOPIC, "loss.events"]


async def test_sent_replies_leave_the_outbox_in_position_order_up_to_the_first_recent_one(
    pool: asyncpg.Pool, schema: str,
) -> None:
    """The purge takes the reply rows in the order the relay sent them and stops at the
    first one sent within the window: it never walks the window's replies. A reply re-sent
    out of order waits behind the recent one for the next purge."""
    await pool.execute(WRITES_DDL.format(schema=schema))
    probe = intake(pool, schema, RecordingDeadLetters())
    await probe.handle_batch([command(i, f"note-{i}") for i in range(4)])
    stale = 2 * probe.freshness + timedelta(seconds=1)
    positions = [r["position"] for r in await pool.fetch(
        f"SELECT position FROM {schema}.outbox ORDER BY position")]
    assert len(positions) == 4
    for position, age in zip(positions, (stale, stale, timedelta(0), stale), strict=True):
        await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() - $2::interval"
                           " WHERE position = $1", position, age)

    await probe.purge_stored_replies(batch=1)
    left = [r["position"] for r in await pool.fetch(
        f"SELECT position FROM {schema}.outbox ORDER BY position")]
    assert left == positions[2:]

    await pool.execute(f"UPDATE {schema}.outbox SET sent_at = now() - $2::interval"
                       " WHERE position = $1", positions[2], stale)
    await probe.purge_stored_replies(batch=1)
    assert await pool.fetchval(f"SELECT count(*) FROM {schema}.outbox") == 0


async def test_the_new_ids_a_handler_asks_its_context_for_come_from_the_intake(
    pool: asyncpg.Pool, schema: str,
) -> None:
    given = iter(["id-1", "id-2"])

    async def create(_conn: asyncpg.Connection, context: CommandContext,
                     _payload: Note) -> dict[str, Any]:
        return {"id": context.new_id()}

    probe = CommandIntake(pool, schema, ChannelRegistry({CHANNEL.channel_id: CHANNEL}),
                          {"Write": CommandRoute(Note, create)},
                          RecordingDeadLetters(), lambda: datetime.now(UTC),  # type: ignore[arg-type]
                          settings=SETTINGS, ids=lambda: next(given))
    await probe.handle_batch([command(0, "a"), command(1, "b")])
    assert [r.data for r in await queued_replies(pool, schema)] == [{"id": "id-1"},
                                                                     {"id": "id-2"}]


async def test_a_command_refused_while_the_followers_lag_is_decided_afresh_when_repeated(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    barrier = Lagging()
    probe = intake(pool, schema, RecordingDeadLetters(), barrier=barrier)
    first = command(0, "one")
    await probe.handle_batch([first, command(1, "one", first.key.decode() if first.key else None)])
    barrier.behind = False
    await probe.handle(command(2, "one", first.key.decode() if first.key else None))

    assert [r.code for r in await queued_replies(pool, schema)] == [
        "not_yet_consistent", "not_yet_consistent", "accepted"]
    assert await notes(pool, schema) == ["one"]


async def test_a_batch_is_prepared_once_for_the_citizens_its_new_commands_name(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    prepare = Preparations()
    probe = intake(pool, schema, RecordingDeadLetters(), prepare=prepare)
    earlier = command(0, "for alice")
    await probe.handle(earlier)
    await probe.handle_batch([
        command(1, "for alice", earlier.key.decode() if earlier.key else None),  # a repeat
        command(2, "for bob"), command(3, "forged carol"), command(4, "again bob"),
        command(5, "for dave")])

    assert prepare.asked == [{"alice"}, {"bob", "dave"}]
    assert [r.data for r in await queued_replies(pool, schema)] == [
        {"prepared": "pass 1"}, {"prepared": "pass 1"}, {"prepared": "pass 2"},
        {"prepared": "pass 2"}, {"prepared": "pass 2"}, {"prepared": "pass 2"}]
    async with pool.acquire() as conn:
        assert prepared(conn) is None  # the batch's, and nobody's once it is done


async def test_a_pass_run_again_after_a_refusal_is_prepared_again(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    prepare = Preparations()
    await intake(pool, schema, RecordingDeadLetters(), prepare=prepare).handle_batch(
        [command(0, "for erin"), command(1, "refuse frank"), command(2, "for gina")])

    # The first pass met the refusal without savepoints and was rolled back, what it
    # prepared with it: the second pass read for itself under its own transaction.
    assert prepare.asked == [{"erin", "frank", "gina"}] * 2
    replies = await queued_replies(pool, schema)
    assert [r.code for r in replies] == ["accepted", "refused_by_probe", "accepted"]
    assert [replies[0].data, replies[2].data] == [{"prepared": "pass 2"}] * 2
    assert await notes(pool, schema) == ["for erin", "for gina"]


async def test_a_batch_refused_while_the_followers_lag_prepares_nothing(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(WRITES_DDL.format(schema=schema))
    prepare = Preparations()
    await intake(pool, schema, RecordingDeadLetters(), prepare=prepare,
                 barrier=Lagging()).handle_batch(
        [command(0, "for hana")])

    assert prepare.asked == []
    assert [r.code for r in await queued_replies(pool, schema)] == ["not_yet_consistent"]
