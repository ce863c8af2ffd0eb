"""The auth service in-process on the real Kafka and PostgreSQL, driven as a channel drives it:
signed commands on `auth.commands`, replies read from the channel's own reply topic by
request id."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.auth.adapters import enroll
from services.auth.domain import stream_id
from services.auth.main import SPEC
from services.auth.settings import AuthSettings
from shared.channels import ChannelRegistry, sign
from shared.commands import Reply
from shared.outbox import make_producer
from shared.runtime import ServiceRuntime
from shared.service import bootstrap
from shared.tokens import TokenVerifier
from shared.topics import command_topic, reply_topic
from tests.integration.auth.citizens import (
    Citizen,
    new_citizen,
    random_face,
    with_wrong_check_char,
)
from tests.support import (
    create_topics,
    drop_schema,
    eventually,
    kafka_options,
    skip_history,
    unique,
)

pytestmark = pytest.mark.integration

CHANNEL = "wechat-oa"
COMMANDS_TOPIC = command_topic("auth")
REPLIES_TOPIC = reply_topic(CHANNEL)
REPLY_TIMEOUT_S = 60.0


class Replies:
    """Every reply published on the channel's reply topic since the reader started, by
    request id."""

    def __init__(self, bootstrap: str) -> None:
        self.consumer = AIOKafkaConsumer(REPLIES_TOPIC, bootstrap_servers=bootstrap,
                                         **kafka_options(),
                                         group_id=None, enable_auto_commit=False)
        self.seen: dict[str, list[bytes]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.consumer.start()
        for _ in range(600):  # group-less subscription: assigned once metadata arrives
            if self.consumer.assignment():
                break
            await asyncio.sleep(0.05)
        assert self.consumer.assignment(), f"{REPLIES_TOPIC} has no partitions"
        await self.consumer.seek_to_end()
        for tp in self.consumer.assignment():  # pin the positions before any command is sent
            await self.consumer.position(tp)
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    request_id = (record.key or b"").decode()
                    self.seen.setdefault(request_id, []).append(record.value)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.consumer.stop()

    async def raw(self, request_id: str, count: int = 1) -> list[bytes]:
        deadline = asyncio.get_running_loop().time() + REPLY_TIMEOUT_S
        while len(self.seen.get(request_id, [])) < count:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no reply {count} for request {request_id}")
            await asyncio.sleep(0.05)
        return self.seen[request_id][:count]

    async def reply(self, request_id: str) -> Reply:
        return Reply.model_validate_json((await self.raw(request_id))[0])


class ChannelClient:
    """What a WeChat official account would do: sign and send commands, await replies."""

    def __init__(self, producer: AIOKafkaProducer, secret: str, replies: Replies) -> None:
        self.producer = producer
        self.secret = secret
        self.replies = replies

    def envelope(self, command_type: str, payload: dict[str, Any],
                 request_id: str | None = None) -> tuple[str, bytes]:
        request_id = request_id or str(uuid.uuid4())
        raw = json.dumps({"request_id": request_id, "channel": CHANNEL,
                          "issued_at": datetime.now(UTC).isoformat(),
                          "type": command_type, "payload": payload}).encode()
        return request_id, raw

    async def send_raw(self, request_id: str, raw: bytes, signature: str | None = None) -> None:
        await self.producer.send_and_wait(
            COMMANDS_TOPIC, value=raw, key=request_id.encode(),
            headers=[("x-channel-id", CHANNEL.encode()),
                     ("x-signature", (signature or sign(self.secret, raw)).encode())])

    async def send(self, command_type: str, payload: dict[str, Any]) -> Reply:
        request_id, raw = self.envelope(command_type, payload)
        await self.send_raw(request_id, raw)
        return await self.replies.reply(request_id)

    async def captcha(self) -> dict[str, Any]:
        reply = await self.send("IssueCaptcha", {})
        assert reply.status == "accepted", reply
        return reply.data

    async def login(self, citizen: Citizen, *, name: str | None = None,
                    id_number: str | None = None) -> Reply:
        issued = await self.captcha()
        return await self.send("StartSession", {
            "id_number": id_number or citizen.id_number, "name": name or citizen.name,
            "captcha_id": issued["captcha_id"], "captcha_code": issued["code"]})

    async def token(self, citizen: Citizen) -> str:
        reply = await self.login(citizen)
        assert reply.status == "accepted", reply
        return str(reply.data["session_token"])

    async def portrait(self, token: str, face: list[float], liveness: float = 0.95) -> Reply:
        return await self.send("VerifyPortrait", {"session_token": token,
                                                  "liveness_score": liveness,
                                                  "face_embedding": face})


@pytest.fixture(scope="module")
def settings_for_service(stack: object) -> AuthSettings:
    return AuthSettings()




@pytest.fixture(scope="module")
async def service(settings_for_service: AuthSettings) -> AsyncIterator[ServiceRuntime]:
    """The auth service in a schema and consumer group of this module's own."""
    schema, group = unique("auth_test"), unique("carddesk-auth-test")
    await create_topics(settings_for_service.kafka_bootstrap,
                        [COMMANDS_TOPIC, "auth.events", REPLIES_TOPIC, f"{COMMANDS_TOPIC}.dlq"],
                        partitions=settings_for_service.partitions)
    await skip_history(settings_for_service.kafka_bootstrap, group, [COMMANDS_TOPIC])
    runtime = bootstrap(SPEC, settings_for_service, schema=schema, group=group).runtime
    await runtime.start()
    await runtime.broker.start()
    try:
        yield runtime
    finally:
        await runtime.broker.stop()
        await runtime.stop()
        await drop_schema(settings_for_service, schema)


@pytest.fixture(scope="module")
async def channel(
    service: ServiceRuntime, settings_for_service: AuthSettings
) -> AsyncIterator[ChannelClient]:
    replies = Replies(settings_for_service.kafka_bootstrap)
    await replies.start()
    producer = make_producer(settings_for_service)
    await producer.start()
    known = ChannelRegistry.from_file(settings_for_service.channels_file).get(CHANNEL)
    assert known is not None
    yield ChannelClient(producer, known.secret, replies)
    await producer.stop()
    await replies.stop()


@pytest.fixture
async def db(service: ServiceRuntime) -> asyncpg.Pool:
    return service.pool


@pytest.fixture
async def schema(service: ServiceRuntime) -> str:
    return service.schema


@pytest.fixture
async def citizen(db: asyncpg.Pool, settings_for_service: AuthSettings, schema: str) -> Citizen:
    person = new_citizen()
    async with db.acquire() as conn:
        await enroll(conn, person.id_number, person.name, person.face, settings_for_service,
                     schema=schema)
    return person


async def event_types(db: asyncpg.Pool, schema: str, ref: str) -> list[str]:
    rows = await db.fetch(f"SELECT type FROM {schema}.events WHERE stream_id = $1"
                          " ORDER BY version", stream_id(ref))
    return [r["type"] for r in rows]


async def test_a_citizen_gets_a_captcha_logs_in_and_the_token_verifies(
    channel: ChannelClient, citizen: Citizen, settings_for_service: AuthSettings,
    db: asyncpg.Pool, schema: str
) -> None:
    reply = await channel.login(citizen)
    assert (reply.status, reply.code) == ("accepted", "accepted")
    claims = TokenVerifier.from_settings(settings_for_service).verify(
        reply.data["session_token"], now=datetime.now(UTC), channel=CHANNEL)
    assert claims.citizen_ref == reply.data["citizen_ref"]
    assert claims.level == "realname"
    card = await channel.send("AuthorizeElectronicCard",
                              {"session_token": reply.data["session_token"]})
    assert card.status == "accepted", card
    assert await event_types(db, schema, claims.citizen_ref) == [
        "SessionStarted", "IdentityVerified", "ElectronicCardAuthorized"]

    async def published() -> bool:
        unsent = await db.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE topic = 'auth.events'"
            " AND key = $1 AND sent_at IS NULL", claims.citizen_ref.encode())
        sent = await db.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE topic = 'auth.events'"
            " AND key = $1 AND sent_at IS NOT NULL", claims.citizen_ref.encode())
        return bool(unsent == 0 and sent == 3)

    await eventually(published)


async def test_a_wrong_name_a_bad_checksum_and_a_reused_captcha_are_refused_with_their_codes(
    channel: ChannelClient, citizen: Citizen
) -> None:
    wrong_name = await channel.login(citizen, name=citizen.name + "甲")
    assert (wrong_name.status, wrong_name.code) == ("rejected", "identity_mismatch")
    bad_checksum = await channel.login(citizen,
                                       id_number=with_wrong_check_char(citizen.id_number))
    assert (bad_checksum.status, bad_checksum.code) == ("rejected", "invalid_id_number")

    issued = await channel.captcha()
    login = {"id_number": citizen.id_number, "name": citizen.name,
             "captcha_id": issued["captcha_id"], "captcha_code": issued["code"]}
    assert (await channel.send("StartSession", login)).status == "accepted"
    reused = await channel.send("StartSession", login)
    assert (reused.status, reused.code) == ("rejected", "captcha_used")


async def test_three_failed_portraits_lock_the_citizen_out_even_with_the_right_face(
    channel: ChannelClient, citizen: Citizen, settings_for_service: AuthSettings,
    db: asyncpg.Pool, schema: str
) -> None:
    token = await channel.token(citizen)
    verified = await channel.portrait(token, citizen.face)
    assert verified.status == "accepted", verified
    upgraded = TokenVerifier.from_settings(settings_for_service).verify(
        verified.data["session_token"], now=datetime.now(UTC), channel=CHANNEL)
    assert upgraded.level == "portrait"
    assert upgraded.portrait_verified_at is not None

    codes = [(await channel.portrait(token, random_face())).code for _ in range(3)]
    assert codes == ["face_mismatch", "face_mismatch", "portrait_locked"]
    fourth = await channel.portrait(token, citizen.face)
    assert (fourth.status, fourth.code) == ("rejected", "portrait_locked")
    assert await event_types(db, schema, upgraded.citizen_ref) == [
        "SessionStarted", "IdentityVerified", "IdentityVerified",
        "IdentityVerificationFailed", "IdentityVerificationFailed",
        "IdentityVerificationFailed", "IdentityLocked"]


async def test_a_repeated_request_gets_the_identical_reply_and_records_nothing_more(
    channel: ChannelClient, citizen: Citizen, db: asyncpg.Pool, schema: str
) -> None:
    issued = await channel.captcha()
    request_id, raw = channel.envelope("StartSession", {
        "id_number": citizen.id_number, "name": citizen.name,
        "captcha_id": issued["captcha_id"], "captcha_code": issued["code"]})
    await channel.send_raw(request_id, raw)
    first = await channel.replies.raw(request_id)
    await channel.send_raw(request_id, raw)
    both = await channel.replies.raw(request_id, count=2)
    assert both[0] == both[1] == first[0]
    reply = Reply.model_validate_json(first[0])
    assert reply.status == "accepted"
    assert await event_types(db, schema, reply.data["citizen_ref"]) == [
        "SessionStarted", "IdentityVerified"]


async def test_a_command_with_a_wrong_signature_gets_no_reply_and_changes_nothing(
    channel: ChannelClient
) -> None:
    request_id, raw = channel.envelope("IssueCaptcha", {})
    await channel.send_raw(request_id, raw, signature=sign("not-the-secret", raw))
    assert "code" in await channel.captcha()
    await asyncio.sleep(1.0)  # room for a stray reply, if one were ever sent
    assert request_id not in channel.replies.seen  # its sender is unknown: the DLQ only


async def test_a_header_that_is_not_utf8_gets_no_reply_and_the_next_command_is_served(
    channel: ChannelClient
) -> None:
    request_id, raw = channel.envelope("IssueCaptcha", {})
    await channel.producer.send_and_wait(
        COMMANDS_TOPIC, value=raw, key=request_id.encode(),
        headers=[("x-channel-id", CHANNEL.encode()), ("x-signature", b"\xff\xfe\xfd")])
    assert "code" in await channel.captcha()
    await asyncio.sleep(1.0)
    assert request_id not in channel.replies.seen
