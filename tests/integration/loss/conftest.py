"""The loss service running in-process against the real Kafka and PostgreSQL, isolated by its
own schema and consumer group, plus helpers that act as a channel and as the other services."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
import pytest
from aiokafka import (
    AIOKafkaProducer,
)

from cardctl.stack import ensure_topics
from services.loss.main import SPEC
from services.loss.settings import LossSettings
from shared.channels import ChannelRegistry, sign
from shared.envelope import EventEnvelope
from shared.events import DomainEvent
from shared.eventstore import event_message
from shared.runtime import ServiceRuntime
from shared.service import bootstrap
from shared.tokens import SessionClaims, TokenSigner
from shared.topics import all_topics, reply_topic
from tests.builders import Citizens
from tests.support import TopicTail, kafka_options, session_settings, skip_history

CHANNEL = "wechat-oa"
CONSUMED = ("loss.commands", "issuance.events", "review.events")


@pytest.fixture(scope="module")
def loss_settings() -> LossSettings:
    # A one-second temporary loss, so that expiry can be watched happening.
    return LossSettings(loss_temporary_period=timedelta(seconds=1),
                        loss_expiry_scan_interval=timedelta(milliseconds=200))


class Tail(TopicTail):
    """Every record of a topic from the moment it started, collected in the background."""

    def json_values(self) -> list[dict[str, Any]]:
        return [json.loads(r.value) for r in self.records]

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 30.0, *,
        after: int = 0,
    ) -> dict[str, Any]:
        """The first matching value among the records from index `after` on."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            for value in self.json_values()[after:]:
                if predicate(value):
                    return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.topic}: nothing matched within {timeout_s}s")




class Harness:
    """Acts as a channel and as the issuance and review services towards the loss service."""

    def __init__(self, settings: LossSettings, runtime: ServiceRuntime, db: asyncpg.Pool,
                 producer: AIOKafkaProducer, replies: Tail, loss_events: Tail) -> None:
        self.settings = settings
        self.runtime = runtime
        self.schema = runtime.schema
        self.db = db
        self.producer = producer
        self.replies = replies
        self.loss_events = loss_events
        self.signer = TokenSigner.from_settings(settings)
        channel = ChannelRegistry.from_file(settings.channels_file).get(CHANNEL)
        assert channel is not None
        self.channel_secret = channel.secret
        self._citizens = Citizens()

    @staticmethod
    def new_citizen() -> str:
        return secrets.token_hex(32)

    def token(self, citizen_ref: str, level: Literal["realname", "portrait"] = "realname") -> str:
        now = datetime.now(UTC)
        return self.signer.sign(SessionClaims(
            kid="", session_id=str(uuid.uuid4()), citizen_ref=citizen_ref, channel=CHANNEL,
            level=level,
            portrait_verified_at=now if level == "portrait" else None,
            issued_at=now, expires_at=now + timedelta(minutes=30),
        ))

    async def command(self, command_type: str, payload: dict[str, Any], *,
                      request_id: str | None = None,
                      headers: Sequence[tuple[str, bytes]] = ()) -> dict[str, Any]:
        """Send a signed command on loss.commands and return the reply to this sending."""
        request_id = request_id or str(uuid.uuid4())
        seen = len(self.replies.records)
        value = json.dumps({"request_id": request_id, "channel": CHANNEL,
                            "issued_at": datetime.now(UTC).isoformat(), "type": command_type,
                            "payload": payload}).encode()
        await self.producer.send_and_wait(
            "loss.commands", value=value, key=request_id.encode(),
            headers=[("x-channel-id", CHANNEL.encode()),
                     ("x-signature", sign(self.channel_secret, value).encode()),
                     *headers],
        )
        return await self.replies.wait_for(lambda r: r["request_id"] == request_id, after=seen)

    def seal(self, stream_id: str, citizen_ref: str, event: DomainEvent) -> EventEnvelope:
        """The next event of another service's stream, chained as its store would."""
        return self._citizens[citizen_ref].append(stream_id, event)

    async def publish(self, topic: str, envelope: EventEnvelope) -> None:
        message = event_message(topic, envelope)
        await self.producer.send_and_wait(topic, value=message.value, key=message.key,
                                          headers=list(message.headers))

    async def eventually(self, query: str, *args: Any, expect: Any,
                         timeout_s: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        last: Any = None
        while asyncio.get_running_loop().time() < deadline:
            last = await self.db.fetchval(query.format(schema=self.schema), *args)
            if last == expect:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"expected {expect!r}, last saw {last!r}")


@pytest.fixture(scope="module")
async def harness(loss_settings: LossSettings) -> AsyncIterator[Harness]:
    suffix = uuid.uuid4().hex[:10]
    schema, group = f"loss_test_{suffix}", f"carddesk-loss-test-{suffix}"
    brokers = loss_settings.kafka_bootstrap
    await ensure_topics(session_settings(brokers),
                        all_topics(loss_settings.partitions, [CHANNEL]))
    await skip_history(brokers, group, CONSUMED)
    replies = Tail(brokers, reply_topic(CHANNEL))
    loss_events = Tail(brokers, "loss.events")
    await replies.start()
    await loss_events.start()
    producer = AIOKafkaProducer(bootstrap_servers=brokers, **kafka_options())
    await producer.start()
    db = await asyncpg.create_pool(loss_settings.database_url, min_size=1, max_size=2)
    runtime = bootstrap(SPEC, loss_settings, schema=schema, group=group).runtime
    await runtime.start()
    await runtime.broker.start()
    try:
        yield Harness(loss_settings, runtime, db, producer, replies, loss_events)
    finally:
        await runtime.broker.stop()
        await runtime.stop()
        await db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await db.close()
        await producer.stop()
        await replies.stop()
        await loss_events.stop()
