"""The broker authenticates every client and authorises each principal by its ACLs (DESIGN 8).

Each refusal is paired with what the same principal may do, so that a broker letting
everything through, or refusing everything, fails these tests.
"""

from __future__ import annotations

import asyncio
import json
import stat
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError

from cardctl.kafka_access import describe_acls, scram_users
from cardctl.stack import Stack, _open_admin, kafka_answers
from shared.channels import ChannelRegistry
from shared.kafka import client_options, read_credentials, with_credentials
from shared.settings import CardDeskSettings
from tests.support import create_topics

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0


def principal(stack: Stack, name: str) -> CardDeskSettings:
    username, password = read_credentials(stack.credentials_file)[name]
    return with_credentials(stack.settings, username, password)


def channel(stack: Stack, channel_id: str) -> CardDeskSettings:
    found = ChannelRegistry.from_file(stack.settings.channels_file).get(channel_id)
    assert found is not None and found.kafka_password is not None
    return with_credentials(stack.settings, channel_id, found.kafka_password)


@asynccontextmanager
async def producer_as(settings: CardDeskSettings) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                request_timeout_ms=10_000, **client_options(settings))
    await asyncio.wait_for(producer.start(), TIMEOUT_S)
    try:
        yield producer
    finally:
        await producer.stop()


async def send(settings: CardDeskSettings, topic: str, value: bytes = b"probe") -> None:
    """`value` on partition 0 of `topic`, which `read_first` reads."""
    async with producer_as(settings) as producer:
        await asyncio.wait_for(producer.send_and_wait(topic, value, key=b"probe", partition=0),
                               TIMEOUT_S)


async def read_first(settings: CardDeskSettings, topic: str) -> list[bytes]:
    """What a principal reads of partition 0, from the beginning to its end, by manual
    assignment."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                **client_options(settings))
    await asyncio.wait_for(consumer.start(), TIMEOUT_S)
    try:
        # A topic the principal may not describe: the broker answers its metadata with an
        # authorisation error (aiokafka would otherwise retry the lookup for ever).
        client = consumer._client
        client.add_topic(topic)
        await asyncio.wait_for(client.force_metadata_update(), TIMEOUT_S)
        if topic in client.cluster.unauthorized_topics:
            raise TopicAuthorizationFailedError(topic)
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        end = (await asyncio.wait_for(consumer.end_offsets([tp]), TIMEOUT_S))[tp]
        await asyncio.wait_for(consumer.seek_to_beginning(tp), TIMEOUT_S)
        # The topic may hold other runs' records too: read partition 0 to its end.
        values: list[bytes] = []
        deadline = asyncio.get_running_loop().time() + TIMEOUT_S
        while await consumer.position(tp) < end:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{topic}/0: read {len(values)} records, not to {end}")
            batch = await consumer.getmany(tp, timeout_ms=1000)
            values.extend(record.value for record in batch.get(tp, []))
        return values
    finally:
        await consumer.stop()


async def test_a_client_without_credentials_is_refused(stack: Stack) -> None:
    anonymous = stack.settings.model_copy(update={"kafka_user": None, "kafka_password": None})
    with pytest.raises((KafkaError, TimeoutError)):
        await send(anonymous, "auth.commands")


async def test_a_wrong_password_is_refused(stack: Stack) -> None:
    username, _ = read_credentials(stack.credentials_file)["admin"]
    with pytest.raises((KafkaError, TimeoutError)):
        await send(with_credentials(stack.settings, username, "not-the-password"),
                   "auth.commands")
    with pytest.raises((KafkaError, TimeoutError)):
        await send(with_credentials(stack.settings, "wechat-oa", "dev-kafka-mobile-app"),
                   "auth.commands")


async def test_a_channel_cannot_write_an_event_topic(stack: Stack) -> None:
    with pytest.raises(TopicAuthorizationFailedError):
        await send(channel(stack, "wechat-oa"), "review.events")


async def test_a_channel_reads_its_own_reply_topic_and_not_another_channels(
    stack: Stack,
) -> None:
    mine, theirs = "channel.replies.wechat-oa", "channel.replies.mobile-app"
    await create_topics(stack.settings.kafka_bootstrap, [mine, theirs], partitions=1)
    marker = uuid.uuid4().hex.encode()
    # Services write every reply topic.
    await send(principal(stack, "review"), mine, marker)
    await send(principal(stack, "auth"), theirs, marker)
    assert marker in await read_first(channel(stack, "wechat-oa"), mine)
    assert marker in await read_first(channel(stack, "mobile-app"), theirs)
    with pytest.raises(TopicAuthorizationFailedError):
        await read_first(channel(stack, "wechat-oa"), theirs)


async def test_a_channel_cannot_read_event_or_command_topics(stack: Stack) -> None:
    for topic in ("auth.events", "loss.commands"):
        with pytest.raises(TopicAuthorizationFailedError):
            await read_first(channel(stack, "bureau-counter"), topic)


async def test_the_auditor_reads_event_topics_but_cannot_write_them(stack: Stack) -> None:
    auditor = principal(stack, "auditor")
    for topic in ("auth.events", "loss.events", "review.events", "issuance.events"):
        await read_first(auditor, topic)  # no authorisation error
    with pytest.raises(TopicAuthorizationFailedError):
        await send(auditor, "review.events")
    with pytest.raises(TopicAuthorizationFailedError):
        await read_first(auditor, "auth.commands")


async def test_a_service_cannot_write_another_services_events_topic(stack: Stack) -> None:
    with pytest.raises(TopicAuthorizationFailedError):
        await send(principal(stack, "loss"), "review.events")
    with pytest.raises(TopicAuthorizationFailedError):
        await send(principal(stack, "status"), "issuance.events")
    # …nor read what it does not consume: issuance consumes review.events, not loss.events.
    await read_first(principal(stack, "issuance"), "review.events")
    with pytest.raises(TopicAuthorizationFailedError):
        await read_first(principal(stack, "issuance"), "loss.events")


async def test_a_service_cannot_create_topics(stack: Stack) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.settings.kafka_bootstrap,
                                **client_options(principal(stack, "review")))
    await asyncio.wait_for(admin.start(), TIMEOUT_S)
    try:
        from aiokafka.admin import NewTopic

        response = await admin.create_topics([NewTopic(f"rogue_{uuid.uuid4().hex[:8]}", 1, 1)])
        codes = [row[1] for row in response.topic_errors]
        assert codes and all(code != 0 for code in codes)
    finally:
        await admin.close()


async def _acl_count(stack: Stack) -> int:
    admin = await _open_admin(stack.admin_settings(), TIMEOUT_S)
    try:
        return len(await describe_acls(admin))
    finally:
        await admin.close()


async def test_up_twice_changes_nothing_and_credentials_stay_private(stack: Stack) -> None:
    path = stack.credentials_file
    before, acls_before = path.read_bytes(), await _acl_count(stack)
    await asyncio.to_thread(stack.ensure_topics_and_access)
    await asyncio.to_thread(stack.ensure_topics_and_access)
    assert path.read_bytes() == before
    assert await _acl_count(stack) == acls_before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    body = json.loads(before)
    for name in ("admin", "auditor", "auth", "loss", "review", "issuance", "status"):
        assert set(body[name]) == {"username", "password"}
        assert len(body[name]["password"]) >= 32
    assert len({entry["password"] for entry in body.values()}) == len(body)
    properties = path.parent / "server.properties"
    if properties.exists():
        assert stat.S_IMODE(properties.stat().st_mode) == 0o600


async def test_a_channel_added_to_the_file_gets_access_and_loses_it_when_removed(
    stack: Stack, tmp_path: Path,
) -> None:
    kiosk = f"kiosk-{uuid.uuid4().hex[:8]}"
    raw = json.loads(stack.settings.channels_file.read_text(encoding="utf-8"))
    raw[kiosk] = {"secret": "s", "bureau": False, "kafka_password": uuid.uuid4().hex}
    grown = tmp_path / "channels.json"
    grown.write_text(json.dumps(raw), encoding="utf-8")
    replies = f"channel.replies.{kiosk}"
    await create_topics(stack.settings.kafka_bootstrap, [replies], partitions=1)
    as_kiosk = with_credentials(stack.settings, kiosk, raw[kiosk]["kafka_password"])
    wider = Stack(stack.settings.model_copy(update={"channels_file": grown}))
    try:
        await asyncio.to_thread(wider.ensure_topics_and_access)
        assert await read_first(as_kiosk, replies) == []
        assert kiosk in await users_on(stack)
    finally:
        await asyncio.to_thread(stack.ensure_topics_and_access)
    # Its user is gone, not only its ACLs: the password it was given no longer logs in.
    assert kiosk not in await users_on(stack)
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while await kafka_answers(as_kiosk, timeout_s=5.0):  # the broker applies it a moment later
        assert asyncio.get_running_loop().time() < deadline, f"{kiosk} still logs in"
        await asyncio.sleep(0.2)
    with pytest.raises((KafkaError, TimeoutError)):
        await read_first(as_kiosk, replies)
    assert {"admin", "auditor", "status", "console", "wechat-oa"} <= await users_on(stack)


async def users_on(stack: Stack) -> set[str]:
    """The broker's SCRAM users, as the administrator sees them."""
    admin = await _open_admin(stack.admin_settings(), TIMEOUT_S)
    try:
        return await scram_users(admin)
    finally:
        await admin.close()
