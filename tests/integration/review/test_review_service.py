"""The review service in-process against the real Kafka and PostgreSQL: loss events in,
signed channel commands in, replies and review events out."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import (
    AIOKafkaProducer,
    ConsumerRecord,
)

from cardctl.stack import ensure_topics
from services.review.main import SPEC
from services.review.settings import ReviewSettings
from shared.channels import ChannelRegistry, sign
from shared.contracts.loss import LossCancelled, LossReported
from shared.envelope import EventEnvelope
from shared.events import DomainEvent
from shared.runtime import ServiceRuntime
from shared.service import bootstrap
from shared.tokens import SessionClaims, TokenSigner
from shared.topics import all_topics, reply_topic
from tests.builders import Citizens
from tests.support import (
    TopicTail,
    follower_paused,
    kafka_options,
    skip_history,
    until_consistent,
)

pytestmark = pytest.mark.integration

WAIT_S = 30.0
REPLY_CHANNELS = ("wechat-oa", "bureau-counter")
TOPICS = ("review.commands", "review.events", "loss.events",
          *(reply_topic(channel_id) for channel_id in REPLY_CHANNELS),
          "review.commands.dlq", "loss.events.dlq")


class Tail(TopicTail):
    """Everything published on a topic from the moment `start` returns."""

    async def first(self, match: Callable[[ConsumerRecord], bool], *,
                    after: int = 0) -> ConsumerRecord:
        """The first matching record among those from index `after` on."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            for record in self.records[after:]:
                if match(record):
                    return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"nothing matching on {self.topic} within {WAIT_S}s")




@dataclass
class Harness:
    settings: ReviewSettings
    runtime: ServiceRuntime
    schema: str
    producer: AIOKafkaProducer
    channels: ChannelRegistry
    replies: dict[str, Tail]
    events: Tail
    citizens: Citizens = field(default_factory=Citizens)

    async def publish_loss_event(self, citizen_ref: str, event: DomainEvent) -> EventEnvelope:
        """Append to the citizen's loss stream as the loss service would, and publish it."""
        envelope = self.citizens[citizen_ref].emit("loss.events", event)
        await self.producer.send_and_wait("loss.events", value=envelope.to_bytes(),
                                          key=citizen_ref.encode())
        return envelope

    async def wait_for_loss(self, citizen_ref: str, *, in_force: bool) -> None:
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            found = await self.runtime.pool.fetchval(
                f"SELECT in_force FROM {self.schema}.losses WHERE citizen_ref = $1",
                citizen_ref)
            if found is in_force:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the loss of {citizen_ref[:8]} never became in_force={in_force}")

    def token(self, citizen_ref: str) -> str:
        now = datetime.now(UTC)
        claims = SessionClaims(kid="", session_id=str(uuid.uuid4()), citizen_ref=citizen_ref,
                               channel="wechat-oa", level="realname", issued_at=now,
                               expires_at=now + timedelta(minutes=10))
        return TokenSigner.from_settings(self.settings).sign(claims)

    async def send(self, channel_id: str, command_type: str, payload: dict[str, Any], *,
                   request_id: str | None = None) -> dict[str, Any]:
        """Send a signed command and return the reply to this sending of it, from the
        channel's reply topic."""
        channel = self.channels.get(channel_id)
        assert channel is not None
        request_id = request_id or str(uuid.uuid4())
        seen = len(self.replies[channel_id].records)
        value = json.dumps({"request_id": request_id, "channel": channel_id,
                            "issued_at": datetime.now(UTC).isoformat(), "type": command_type,
                            "payload": payload}).encode()
        await self.producer.send_and_wait(
            "review.commands", value=value, key=request_id.encode(),
            headers=[("x-channel-id", channel_id.encode()),
                     ("x-signature", sign(channel.secret, value).encode())],
        )
        record = await self.replies[channel_id].first(lambda r: r.key == request_id.encode(),
                                                      after=seen)
        reply: dict[str, Any] = json.loads(record.value)
        return reply

    async def event(self, citizen_ref: str, event_type: str) -> ConsumerRecord:
        return await self.events.first(
            lambda r: r.key == citizen_ref.encode() and json.loads(r.value)["type"] == event_type
        )


@pytest.fixture(scope="module")
async def review() -> AsyncIterator[Harness]:
    settings = ReviewSettings()
    wanted = [t for t in all_topics(settings.partitions, REPLY_CHANNELS) if t.name in TOPICS]
    await ensure_topics(settings, wanted)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, **kafka_options())
    await producer.start()
    replies = {channel_id: Tail(settings.kafka_bootstrap, reply_topic(channel_id))
               for channel_id in REPLY_CHANNELS}
    events = Tail(settings.kafka_bootstrap, "review.events")
    for tail in replies.values():
        await tail.start()
    await events.start()
    suffix = uuid.uuid4().hex[:10]
    schema, group = f"review_test_{suffix}", f"carddesk-review-test-{suffix}"
    await skip_history(settings.kafka_bootstrap, group, ["review.commands", "loss.events"])
    runtime = bootstrap(SPEC, settings, schema=schema, group=group).runtime
    await runtime.start()
    await runtime.broker.start()
    try:
        yield Harness(settings, runtime, schema, producer,
                      ChannelRegistry.from_file(settings.channels_file), replies, events)
    finally:
        await producer.stop()
        await runtime.broker.stop()
        await runtime.stop()
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
        for tail in replies.values():
            await tail.stop()
        await events.stop()


def new_citizen() -> str:
    return secrets.token_hex(32)


def formal_loss(loss_id: str) -> LossReported:
    return LossReported(loss_id=loss_id, kind="formal", card_no=f"T{secrets.randbelow(10**8):08d}",
                        expires_at=None, financial_freeze=True, channel="wechat-oa")


def application(harness: Harness, citizen_ref: str) -> dict[str, Any]:
    return {
        "session_token": harness.token(citizen_ref),
        "address": f"No. {secrets.token_hex(4)} Renmin Road, Building 7",
        "phone": f"139{secrets.randbelow(10**8):08d}",
        "photo_ref": f"photo-{secrets.token_hex(8)}",
        "pickup_bureau": "bureau-east",
    }


async def applied_citizen(review: Harness) -> tuple[str, str, dict[str, Any]]:
    """A citizen under a formal loss with an accepted application: (ref, application_id, data)."""
    citizen_ref = new_citizen()
    await review.publish_loss_event(citizen_ref, formal_loss(str(uuid.uuid4())))
    await review.wait_for_loss(citizen_ref, in_force=True)
    payload = application(review, citizen_ref)
    reply = await review.send("wechat-oa", "SubmitReissueApplication", payload)
    assert (reply["status"], reply["code"]) == ("accepted", "accepted")
    return citizen_ref, reply["data"]["application_id"], payload


async def test_a_submitted_application_is_published_with_its_personal_data_encrypted(
    review: Harness,
) -> None:
    citizen_ref, application_id, payload = await applied_citizen(review)

    record = await review.event(citizen_ref, "ReissueApplied")

    data = json.loads(record.value)["data"]
    assert data["application_id"] == application_id
    assert data["pickup_bureau"] == "bureau-east"
    for personal in ("address", "phone", "photo_ref"):
        assert data[personal].startswith("enc:v1:")
        assert payload[personal].encode() not in record.value


async def test_a_decision_from_a_channel_that_is_not_a_bureau_is_refused_as_bureau_only(
    review: Harness,
) -> None:
    _, application_id, _ = await applied_citizen(review)

    reply = await review.send("wechat-oa", "DecideReview", {
        "application_id": application_id, "reviewer_id": "rev-1", "decision": "approve"})

    assert (reply["status"], reply["code"]) == ("rejected", "bureau_only")


async def test_a_bureau_approval_publishes_review_approved_with_the_pickup_bureau_and_old_card(
    review: Harness,
) -> None:
    citizen_ref, application_id, _ = await applied_citizen(review)
    applied = json.loads((await review.event(citizen_ref, "ReissueApplied")).value)["data"]

    reply = await review.send("bureau-counter", "DecideReview", {
        "application_id": application_id, "reviewer_id": "rev-1", "decision": "approve"})

    assert (reply["status"], reply["code"]) == ("accepted", "accepted")
    approved = json.loads((await review.event(citizen_ref, "ReviewApproved")).value)
    assert approved["data"] == {
        "application_id": application_id, "reviewer_id": "rev-1", "automatic": False,
        "pickup_bureau": "bureau-east", "old_card_no": applied["old_card_no"],
    }
    assert approved["correlation_id"] == reply["request_id"]


async def test_an_application_without_a_formal_loss_is_refused_as_no_formal_loss(
    review: Harness,
) -> None:
    citizen_ref = new_citizen()

    reply = await review.send("wechat-oa", "SubmitReissueApplication",
                              application(review, citizen_ref))

    assert (reply["status"], reply["code"]) == ("rejected", "no_formal_loss")


async def test_a_rejection_then_a_cancelled_loss_withdraws_the_application(
    review: Harness,
) -> None:
    citizen_ref = new_citizen()
    loss_id = str(uuid.uuid4())
    await review.publish_loss_event(citizen_ref, formal_loss(loss_id))
    await review.wait_for_loss(citizen_ref, in_force=True)
    submitted = await review.send("wechat-oa", "SubmitReissueApplication",
                                  application(review, citizen_ref))
    application_id = submitted["data"]["application_id"]
    rejected = await review.send("bureau-counter", "DecideReview", {
        "application_id": application_id, "reviewer_id": "rev-1", "decision": "reject",
        "reason": "photo unclear"})
    assert rejected["code"] == "accepted"

    cancelled = await review.publish_loss_event(citizen_ref, LossCancelled(loss_id=loss_id))

    withdrawn = json.loads((await review.event(citizen_ref, "ApplicationWithdrawn")).value)
    assert withdrawn["data"] == {"application_id": application_id, "reason": "loss_cancelled"}
    assert withdrawn["causation_id"] == str(cancelled.event_id)
    assert withdrawn["correlation_id"] == cancelled.correlation_id
    again = await review.send("wechat-oa", "SubmitReissueApplication",
                              application(review, citizen_ref))
    assert again["code"] == "no_formal_loss"


async def test_a_decision_on_an_application_nobody_submitted_is_refused_as_unknown(
    review: Harness,
) -> None:
    reply = await review.send("bureau-counter", "DecideReview", {
        "application_id": str(uuid.uuid4()), "reviewer_id": "rev-1", "decision": "approve"})

    assert (reply["status"], reply["code"]) == ("rejected", "unknown_application")


async def test_an_application_is_not_accepted_while_the_loss_follower_is_behind(
    review: Harness,
) -> None:
    citizen_ref = new_citizen()
    await review.publish_loss_event(citizen_ref, formal_loss("L-stale"))
    await review.wait_for_loss(citizen_ref, in_force=True)
    payload = application(review, citizen_ref)
    request_id = str(uuid.uuid4())

    async with follower_paused(review.runtime, "loss.events"):
        # The loss service lifted the loss; review has not applied that yet.
        await review.publish_loss_event(citizen_ref, LossCancelled(loss_id="L-stale"))
        while_paused = await review.send("wechat-oa", "SubmitReissueApplication", payload,
                                         request_id=request_id)
    retried = await until_consistent(lambda: review.send(
        "wechat-oa", "SubmitReissueApplication", payload, request_id=request_id))

    assert (while_paused["status"], while_paused["code"]) == ("rejected", "not_yet_consistent")
    assert (retried["status"], retried["code"]) == ("rejected", "no_formal_loss")
