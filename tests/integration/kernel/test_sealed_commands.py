"""Sealed personal fields through the command intake: a sealed value opens only in the command
it was sealed for, and plain personal fields are refused where sealing is required."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from shared.channels import Channel, ChannelRegistry, sign
from shared.commands import CommandContext, CommandIntake, CommandRoute, Reply, open_reply
from shared.consumer import Inbound
from shared.contracts.auth import StartSession
from shared.contracts.issuance import ImportCard
from shared.sealing import FieldSealer, SealContext
from shared.settings import CardDeskSettings
from tests.support import RecordingDeadLetters

pytestmark = pytest.mark.integration

CITIZEN = Channel(channel_id="probe-citizen", secret="probe-secret-1")
BUREAU = Channel(channel_id="probe-bureau", secret="probe-secret-2", bureau=True)
ID_NUMBER = "11010519491231002X"
LOGIN = {"id_number": ID_NUMBER, "name": "张三", "captcha_id": "c-1", "captcha_code": "123456"}
SETTINGS = CardDeskSettings()
SEALER = FieldSealer(SETTINGS.command_sealing_public_key)


class Probe:
    """An intake whose handlers record the payloads they were given."""

    def __init__(self, pool: asyncpg.Pool, schema: str, *, require_sealed: bool) -> None:
        self.seen: list[Any] = []
        self.dead = RecordingDeadLetters()

        async def record(_conn: asyncpg.Connection, _ctx: CommandContext,
                         payload: Any) -> dict[str, Any]:
            self.seen.append(payload)
            return {}

        self.intake = CommandIntake(
            pool, schema, ChannelRegistry({c.channel_id: c for c in (CITIZEN, BUREAU)}),
            {"StartSession": CommandRoute(StartSession, record),
             "ImportCard": CommandRoute(ImportCard, record, bureau_only=True)},
            self.dead, lambda: datetime.now(UTC),  # type: ignore[arg-type]
            settings=SETTINGS.model_copy(update={"consumer_max_attempts": 1,
                                                 "require_sealed_fields": require_sealed}))
        self.offset = 0

    async def send(self, channel: Channel, command_type: str, payload: dict[str, Any],
                   request_id: str) -> Reply:
        value = json.dumps({"request_id": request_id, "channel": channel.channel_id,
                            "issued_at": datetime.now(UTC).isoformat(), "type": command_type,
                            "payload": payload}, ensure_ascii=False).encode()
        self.offset += 1
        await self.intake.handle(Inbound(
            "probe.commands", 0, self.offset, request_id.encode(), value,
            {"x-channel-id": channel.channel_id.encode(),
             "x-signature": sign(channel.secret, value).encode()}))
        refused = [Reply.model_validate_json(v) for _, v in self.dead.producer.sent]
        mine = [r for r in refused if r.request_id == request_id]
        if mine:
            return mine[-1]
        rows = await self.intake.pool.fetch(
            f"SELECT reply FROM {self.intake.schema}.stored_replies"
            " WHERE channel = $1 AND request_id = $2", channel.channel_id, request_id)
        assert len(rows) == 1, f"no reply to {request_id}"
        return open_reply(channel, request_id, bytes(rows[0]["reply"]))


def sealed(channel: Channel, command_type: str, payload: dict[str, Any],
           request_id: str) -> dict[str, Any]:
    return SEALER.seal_payload(SealContext(channel.channel_id, command_type, request_id), payload)


async def test_a_sealed_login_opens_in_the_command_it_was_sealed_for(
    pool: asyncpg.Pool, schema: str,
) -> None:
    probe = Probe(pool, schema, require_sealed=True)
    request_id = str(uuid.uuid4())
    reply = await probe.send(CITIZEN, "StartSession",
                             sealed(CITIZEN, "StartSession", LOGIN, request_id), request_id)
    assert reply.code == "accepted"
    assert [p.model_dump() for p in probe.seen] == [LOGIN]


async def test_a_sealed_login_replayed_under_a_new_request_id_is_refused(
    pool: asyncpg.Pool, schema: str,
) -> None:
    probe = Probe(pool, schema, require_sealed=False)
    original = str(uuid.uuid4())
    lifted = sealed(CITIZEN, "StartSession", LOGIN, original)
    await probe.send(CITIZEN, "StartSession", lifted, original)
    replay = await probe.send(CITIZEN, "StartSession", lifted, str(uuid.uuid4()))
    assert (replay.status, replay.code) == ("rejected", "bad_sealed_field")
    assert len(probe.seen) == 1  # only the original ran
    assert probe.dead.sent == [(2, "bad_sealed_field")]


async def test_a_sealed_id_number_lifted_into_another_command_or_channel_is_refused(
    pool: asyncpg.Pool, schema: str,
) -> None:
    probe = Probe(pool, schema, require_sealed=False)
    request_id = str(uuid.uuid4())
    login = sealed(CITIZEN, "StartSession", LOGIN, request_id)
    # The login's sealed ID number in an ImportCard of the same request id, from a bureau.
    imported = await probe.send(BUREAU, "ImportCard",
                                {"id_number": login["id_number"], "card_no": "S0001"},
                                request_id)
    assert imported.code == "bad_sealed_field"
    # The whole login resent by another channel under the same request id.
    resent = await probe.send(BUREAU, "StartSession", login, request_id)
    assert resent.code == "bad_sealed_field"
    assert probe.seen == []
    assert ID_NUMBER not in imported.message and ID_NUMBER not in resent.message


async def test_plain_personal_fields_are_refused_where_sealing_is_required(
    pool: asyncpg.Pool, schema: str,
) -> None:
    strict = Probe(pool, schema, require_sealed=True)
    request_id = str(uuid.uuid4())
    reply = await strict.send(CITIZEN, "StartSession", LOGIN, request_id)
    assert (reply.status, reply.code) == ("rejected", "unsealed_personal_data")
    assert ID_NUMBER not in reply.model_dump_json() and "张三" not in reply.model_dump_json()
    half = dict(sealed(CITIZEN, "StartSession", LOGIN, request_id := str(uuid.uuid4())))
    half["name"] = LOGIN["name"]
    assert (await strict.send(CITIZEN, "StartSession", half, request_id)).code \
        == "unsealed_personal_data"
    assert strict.seen == []

    # Where it is not required (development), DESIGN's plain shapes still work.
    lenient = Probe(pool, schema, require_sealed=False)
    assert (await lenient.send(CITIZEN, "StartSession", LOGIN, str(uuid.uuid4()))).code \
        == "accepted"
    assert [p.id_number for p in lenient.seen] == [ID_NUMBER]
