"""A partition's loss commands read for their citizens once: every citizen locked and their
facts read in one statement, their streams in one more, each command then decided without a
read of its own; and the replies and events are those the commands get one by one."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg
import pytest

from services.loss.adapters import loss_ddl
from services.loss.main import wire
from services.loss.settings import LossSettings
from shared.channels import ChannelRegistry, sign
from shared.commands import CommandIntake, Reply
from shared.consumer import Inbound
from shared.service import Kit
from shared.tokens import SessionClaims, TokenSigner
from shared.topics import reply_topic
from tests.builders import new_citizen_ref
from tests.support import RecordingDeadLetters, schema_pair

pytestmark = pytest.mark.integration

CHANNEL = "wechat-oa"
SETTINGS = LossSettings()


@pytest.fixture
async def schemas(pool: asyncpg.Pool) -> AsyncIterator[tuple[str, str]]:
    async with schema_pair(pool, loss_ddl, ("lcb", "lca")) as names:
        yield names


def intake(pool: asyncpg.Pool, schema: str) -> CommandIntake:
    """Loss's commands as the service wires them, on `pool`, in `schema`."""
    wiring = wire(Kit(SETTINGS, schema, f"{schema}.events"))
    return CommandIntake(pool, schema, ChannelRegistry.from_file(SETTINGS.channels_file),
                         wiring.routes, RecordingDeadLetters(),  # type: ignore[arg-type]
                         lambda: datetime.now(UTC), settings=SETTINGS,
                         prepare=wiring.prepare)


def token(citizen_ref: str, level: Literal["realname", "portrait"] = "portrait") -> str:
    now = datetime.now(UTC)
    return TokenSigner.from_settings(SETTINGS).sign(SessionClaims(
        kid="", session_id=str(uuid.uuid4()), citizen_ref=citizen_ref, channel=CHANNEL,
        level=level, portrait_verified_at=now if level == "portrait" else None,
        issued_at=now, expires_at=now + timedelta(minutes=30)))


def command(offset: int, command_type: str, session_token: str, **payload: str) -> Inbound:
    channel = ChannelRegistry.from_file(SETTINGS.channels_file).get(CHANNEL)
    assert channel is not None
    request_id = str(uuid.uuid4())
    value = json.dumps({"request_id": request_id, "channel": CHANNEL,
                        "issued_at": datetime.now(UTC).isoformat(), "type": command_type,
                        "payload": {"session_token": session_token, **payload}}).encode()
    return Inbound("loss.commands", 0, offset, request_id.encode(), value,
                   {"x-channel-id": CHANNEL.encode(),
                    "x-signature": sign(channel.secret, value).encode()})


async def holding_cards(pool: asyncpg.Pool, schema: str, refs: list[str]) -> None:
    await pool.executemany(f"INSERT INTO {schema}.cards (citizen_ref, card_no) VALUES ($1, $2)",
                           [(ref, f"card-{i}") for i, ref in enumerate(refs)])


async def outcome(pool: asyncpg.Pool, schema: str,
                  refs: list[str]) -> tuple[list[str], list[tuple[int, str, int]]]:
    """The replies' codes in order, and each citizen's events (by index) in order."""
    rows = await pool.fetch(f"SELECT value FROM {schema}.outbox WHERE topic = $1"
                            " ORDER BY position", reply_topic(CHANNEL))
    codes = [Reply.model_validate_json(row["value"]).code for row in rows]
    order = {ref: i for i, ref in enumerate(refs)}
    events = await pool.fetch(f"SELECT citizen_ref, type, version FROM {schema}.events"
                              " ORDER BY position")
    return codes, [(order[e["citizen_ref"]], e["type"], e["version"]) for e in events]


async def test_a_batch_locks_and_reads_its_citizens_once_and_each_command_reads_nothing_more(
    pool: asyncpg.Pool, counted: tuple[asyncpg.Pool, list[str]],
    schemas: tuple[str, str],
) -> None:
    schema = schemas[0]
    refs = [new_citizen_ref() for _ in range(3)]
    await holding_cards(pool, schema, refs)
    earlier = intake(pool, schema)  # the first citizen's stream has history, in another process
    await earlier.handle(command(0, "ReportLoss", token(refs[0]), kind="temporary"))

    one_pool, sent = counted
    await intake(one_pool, schema).handle_batch([
        command(1, "ReportLoss", token(refs[0]), kind="formal"),
        command(2, "ReportLoss", token(refs[1]), kind="temporary"),
        command(3, "ReportLoss", token(refs[2]), kind="formal"),
    ])

    codes, events = await outcome(pool, schema, refs)
    assert codes == ["accepted"] * 4
    assert [(i, version) for i, _, version in events] == [(0, 1), (0, 2), (1, 1), (2, 1)]
    assert sum("locked_facts" in query for query in sent) == 1, sent
    assert sum(f"FROM {schema}.events WHERE stream_id = ANY" in query for query in sent) == 1
    assert not [query for query in sent if "ORDER BY version DESC LIMIT 1" in query], sent


async def test_a_batch_with_refusals_replies_and_appends_as_its_commands_one_by_one(
    pool: asyncpg.Pool, schemas: tuple[str, str],
) -> None:
    refs = [new_citizen_ref() for _ in range(3)]
    without_card = new_citizen_ref()
    everyone = [*refs, without_card]
    tokens = {ref: token(ref) for ref in everyone}

    def commands() -> list[Inbound]:
        return [
            command(0, "ReportLoss", tokens[refs[0]], kind="temporary"),
            command(1, "ReportLoss", tokens[without_card], kind="temporary"),  # no card
            command(2, "ReportLoss", "not.a-token", kind="temporary"),  # no citizen to read
            command(3, "ReportLoss", token(refs[1], "realname"), kind="formal"),  # no portrait
            command(4, "CancelLoss", tokens[refs[0]]),  # decided on the batch's own append
            command(5, "ReportLoss", tokens[refs[2]], kind="formal"),
            command(6, "CancelLoss", tokens[refs[1]]),  # nothing to cancel
        ]

    batch, alone = schemas
    for schema in schemas:
        await holding_cards(pool, schema, refs)
    await intake(pool, batch).handle_batch(commands())
    one_by_one = intake(pool, alone)
    for msg in commands():
        await one_by_one.handle(msg)

    assert await outcome(pool, batch, everyone) == await outcome(pool, alone, everyone)
    codes, events = await outcome(pool, batch, everyone)
    assert codes == ["accepted", "no_card", "invalid_session", "portrait_required", "accepted",
                     "accepted", "no_active_loss"]
    assert [(i, kind) for i, kind, _ in events] == [
        (0, "LossReported"), (0, "LossCancelled"), (2, "LossReported")]
