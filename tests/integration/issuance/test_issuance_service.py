"""The issuance service in-process against the real Kafka and PostgreSQL, isolated by its own
schema and consumer group: signed commands in, replies and events out, review.events
followed once, and the durable production timer."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer

from cardctl.stack import ensure_topics
from services.issuance.adapters import issuance_ddl
from services.issuance.handlers import IssuanceHandlers
from services.issuance.main import SPEC
from services.issuance.settings import IssuanceSettings
from shared.channels import ChannelRegistry, sign
from shared.contracts.review import ReviewApproved, ReviewRejected
from shared.crypto import Vault
from shared.envelope import EventEnvelope
from shared.events import DomainEvent
from shared.eventstore import migrate
from shared.identity import check_char, citizen_ref
from shared.runtime import ServiceRuntime
from shared.service import Kit, bootstrap
from shared.topics import all_topics, reply_topic
from tests.builders import Citizens, CitizenStreams
from tests.support import (
    TopicTail,
    eventually,
    follower_paused,
    kafka_options,
    session_settings,
    skip_history,
    unique,
    until_consistent,
)

pytestmark = pytest.mark.integration

BUREAU = "bureau-futian"
CHANNELS = ("bureau-counter", "wechat-oa", "mobile-app")
CONSUMED = ("issuance.commands", "review.events")
WAIT_S = 30.0


def random_id_number() -> str:
    birth = datetime(1950, 1, 1) + timedelta(days=random.randrange(365 * 50))
    first17 = f"{random.randrange(110000, 660000)}{birth:%Y%m%d}{random.randrange(1000):03d}"
    return first17 + check_char(first17)


def bad_checksum(id_number: str) -> str:
    wrong = next(c for c in "0123456789X" if c != id_number[-1])
    return id_number[:-1] + wrong


async def waited_for(tail: TopicTail, match: Callable[[Any], bool], count: int = 1) -> list[Any]:
    """The records of `tail` that `match`, once there are `count` of them."""
    found: list[Any] = []

    async def enough() -> bool:
        found[:] = [r for r in tail.records if match(r)]
        return len(found) >= count

    await eventually(enough, WAIT_S)
    return found




@dataclass
class Harness:
    settings: IssuanceSettings
    runtime: ServiceRuntime
    producer: AIOKafkaProducer
    replies: dict[str, TopicTail]
    events: TopicTail
    channels: ChannelRegistry
    citizens: Citizens = field(default_factory=Citizens)

    @property
    def schema(self) -> str:
        return self.runtime.schema

    def ref(self, id_number: str) -> str:
        return citizen_ref(self.settings.citizen_ref_pepper.get_secret_value(), id_number)

    async def command(self, type_: str, payload: dict[str, Any],
                      channel: str = "bureau-counter") -> dict[str, Any]:
        """Send a signed command and return its reply."""
        request_id = str(uuid.uuid4())
        raw = json.dumps({"request_id": request_id, "channel": channel,
                          "issued_at": datetime.now(UTC).isoformat(), "type": type_,
                          "payload": payload}).encode()
        known = self.channels.get(channel)
        assert known is not None
        await self.producer.send_and_wait(
            "issuance.commands", raw, key=request_id.encode(),
            headers=[("x-channel-id", channel.encode()),
                     ("x-signature", sign(known.secret, raw).encode())])
        [reply] = await waited_for(self.replies[channel],
                                   lambda r: r.key == request_id.encode())
        return dict(json.loads(reply.value))

    async def review_event(self, ref: str, event: DomainEvent) -> EventEnvelope:
        """Publish the next event of the citizen's review stream, chained onto the last one
        published here, as the review service's relay would."""
        envelope = self.citizens[ref].emit("review.events", event)
        await self.publish_review(envelope)
        return envelope

    async def publish_review(self, envelope: EventEnvelope) -> None:
        await self.producer.send_and_wait("review.events", envelope.to_bytes(),
                                          key=envelope.citizen_ref.encode())

    async def events_of(self, ref: str, count: int) -> list[dict[str, Any]]:
        records = await waited_for(self.events, lambda r: r.key == ref.encode(), count)
        return [json.loads(r.value) for r in records]

    async def stream_types(self, ref: str) -> list[str]:
        rows = await self.runtime.pool.fetch(
            f"SELECT type FROM {self.schema}.events WHERE stream_id = $1 ORDER BY version",
            f"card-{ref}")
        return [r["type"] for r in rows]

    async def imported(self, id_number: str) -> str:
        card_no = f"L{random.randrange(10**12):012d}"
        reply = await self.command("ImportCard", {"id_number": id_number, "card_no": card_no})
        assert reply["status"] == "accepted", reply
        return card_no

    async def ready_for_pickup(self, id_number: str) -> tuple[str, str]:
        """An imported card reissued through an approval; returns (application_id, new card)."""
        ref = self.ref(id_number)
        old = await self.imported(id_number)
        application_id = str(uuid.uuid4())
        await self.review_event(ref, ReviewApproved(
            application_id=application_id, reviewer_id="reviewer-7", pickup_bureau=BUREAU,
            old_card_no=old))
        events = await self.events_of(ref, 4)
        assert events[-1]["type"] == "CardReadyForPickup"
        return application_id, str(events[-1]["data"]["card_no"])


@pytest.fixture(scope="module")
async def harness() -> AsyncIterator[Harness]:
    suffix = uuid.uuid4().hex[:10]
    schema, group = f"issuance_t{suffix}", f"carddesk-issuance-t{suffix}"
    settings = IssuanceSettings(issuance_production_seconds=0)
    brokers = settings.kafka_bootstrap
    await ensure_topics(session_settings(brokers), all_topics(settings.partitions, CHANNELS))
    await skip_history(brokers, group, CONSUMED)
    replies = {channel: TopicTail(brokers, reply_topic(channel)) for channel in CHANNELS}
    events = TopicTail(brokers, "issuance.events")
    for tail in [*replies.values(), events]:
        await tail.start()
    producer = AIOKafkaProducer(bootstrap_servers=brokers, **kafka_options())
    await producer.start()
    runtime = bootstrap(SPEC, settings, schema=schema, group=group).runtime
    try:
        await runtime.start()
        await runtime.broker.start()
        yield Harness(settings, runtime, producer, replies, events,
                      ChannelRegistry.from_file(settings.channels_file))
    finally:
        await runtime.broker.stop()
        await runtime.stop()
        await producer.stop()
        for tail in [*replies.values(), events]:
            await tail.stop()
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


async def test_an_imported_card_is_issued_once_and_a_repeat_changes_nothing(
    harness: Harness,
) -> None:
    id_number = random_id_number()
    ref = harness.ref(id_number)
    card_no = await harness.imported(id_number)

    [issued] = await harness.events_of(ref, 1)
    assert issued["type"] == "CardIssued"
    assert issued["data"] == {"card_no": card_no, "imported": True}
    assert issued["stream_id"] == f"card-{ref}"

    again = await harness.command("ImportCard", {"id_number": id_number, "card_no": card_no})
    assert (again["status"], again["data"]["already_imported"]) == ("accepted", True)
    other = await harness.command("ImportCard", {"id_number": id_number, "card_no": "L999999"})
    assert (other["status"], other["code"]) == ("rejected", "card_exists")
    assert await harness.stream_types(ref) == ["CardIssued"]


async def test_an_id_number_with_a_bad_checksum_imports_nothing(harness: Harness) -> None:
    reply = await harness.command(
        "ImportCard", {"id_number": bad_checksum(random_id_number()), "card_no": "L123456"})
    assert (reply["status"], reply["code"]) == ("rejected", "invalid_id_number")


async def test_an_approval_starts_production_reissues_the_card_and_readies_it_for_pickup(
    harness: Harness,
) -> None:
    id_number = random_id_number()
    ref = harness.ref(id_number)
    old = await harness.imported(id_number)
    application_id = str(uuid.uuid4())
    approval = await harness.review_event(ref, ReviewApproved(
        application_id=application_id, reviewer_id="reviewer-7", pickup_bureau=BUREAU,
        old_card_no=old))

    events = await harness.events_of(ref, 4)
    assert [e["type"] for e in events] == [
        "CardIssued", "CardProductionStarted", "CardReissued", "CardReadyForPickup"]
    started, reissued, ready = events[1:]
    assert started["data"]["application_id"] == application_id
    assert started["correlation_id"] == approval.correlation_id
    assert started["causation_id"] == str(approval.event_id)
    assert reissued["data"]["old_card_no"] == old
    assert reissued["data"]["new_card_no"].startswith(
        harness.settings.issuance_card_no_prefix + harness.settings.issuance_region_code)
    assert ready["data"] == {"application_id": application_id, "pickup_bureau": BUREAU,
                             "card_no": reissued["data"]["new_card_no"]}


async def test_a_redelivered_approval_produces_nothing_new(harness: Harness) -> None:
    id_number = random_id_number()
    ref = harness.ref(id_number)
    old = await harness.imported(id_number)
    approved = ReviewApproved(application_id=str(uuid.uuid4()), reviewer_id="reviewer-7",
                              pickup_bureau=BUREAU, old_card_no=old)
    first = await harness.review_event(ref, approved)
    await harness.events_of(ref, 4)

    await harness.publish_review(first)  # the same message again
    await harness.review_event(ref, approved)  # the same approval, a new event id
    # Same key, same partition: once this one is processed, the two before it were too.
    marker = await harness.review_event(ref, ReviewRejected(
        application_id=str(uuid.uuid4()), reviewer_id="reviewer-7", reason="marker"))

    async def marker_processed() -> bool:
        return bool(await harness.runtime.pool.fetchval(
            f"SELECT count(*) FROM {harness.schema}.processed WHERE message_id = $1",
            str(marker.event_id)))

    await eventually(marker_processed, WAIT_S)
    assert await harness.stream_types(ref) == [
        "CardIssued", "CardProductionStarted", "CardReissued", "CardReadyForPickup"]


async def test_the_holder_collects_the_card_with_their_id_number(harness: Harness) -> None:
    id_number = random_id_number()
    application_id, new_card = await harness.ready_for_pickup(id_number)

    reply = await harness.command("CollectCard", {
        "application_id": application_id, "bureau_id": BUREAU,
        "presented_id_number": id_number.lower()})

    assert reply["status"] == "accepted", reply
    collected = (await harness.events_of(harness.ref(id_number), 5))[-1]
    assert collected["type"] == "CardCollected"
    assert collected["data"]["by_proxy"] is False
    assert collected["data"]["card_no"] == new_card
    again = await harness.command("CollectCard", {
        "application_id": application_id, "bureau_id": BUREAU,
        "presented_id_number": id_number})
    assert (again["status"], again["code"]) == ("rejected", "already_collected")


async def test_a_proxy_needs_an_authorisation_and_their_particulars_are_stored_encrypted(
    harness: Harness,
) -> None:
    id_number, proxy_id = random_id_number(), random_id_number()
    application_id, _ = await harness.ready_for_pickup(id_number)
    ref = harness.ref(id_number)
    command = {"application_id": application_id, "bureau_id": BUREAU,
               "presented_id_number": id_number,
               "proxy": {"id_number": proxy_id, "name": "代领人", "authorisation_ref": "  "}}

    refused = await harness.command("CollectCard", command)
    assert (refused["status"], refused["code"]) == ("rejected", "authorisation_required")

    command["proxy"]["authorisation_ref"] = "AUTH-2025-0042"  # type: ignore[index]
    accepted = await harness.command("CollectCard", command)
    assert accepted["status"] == "accepted", accepted

    collected = (await harness.events_of(ref, 5))[-1]
    assert collected["data"]["by_proxy"] is True
    assert collected["data"]["authorisation_ref"] == "AUTH-2025-0042"
    assert collected["data"]["proxy_id_number"].startswith("enc:v1:")
    vault = Vault(harness.schema, harness.settings.master_key.get_secret_value())
    async with harness.runtime.pool.acquire() as conn:
        assert await vault.decrypt(conn, ref, collected["data"]["proxy_id_number"]) == proxy_id
        assert await vault.decrypt(conn, ref, collected["data"]["proxy_name"]) == "代领人"
        bodies = " ".join(r["body"] for r in await conn.fetch(
            f"SELECT body FROM {harness.schema}.events WHERE citizen_ref = $1", ref))
    for plain in (id_number, proxy_id, "代领人"):
        assert plain not in bodies


async def test_collection_at_another_bureau_or_by_someone_else_is_refused(
    harness: Harness,
) -> None:
    id_number = random_id_number()
    application_id, _ = await harness.ready_for_pickup(id_number)
    base = {"application_id": application_id, "bureau_id": BUREAU,
            "presented_id_number": id_number}

    wrong_bureau = await harness.command("CollectCard", {**base, "bureau_id": "bureau-nanshan"})
    stranger = await harness.command("CollectCard",
                                     {**base, "presented_id_number": random_id_number()})
    unknown = await harness.command("CollectCard", {**base, "application_id": "no-such-app"})

    assert [wrong_bureau["code"], stranger["code"], unknown["code"]] == [
        "wrong_bureau", "id_mismatch", "unknown_application"]


async def test_a_channel_that_is_not_a_bureau_may_not_collect_or_import(harness: Harness) -> None:
    id_number = random_id_number()
    application_id, _ = await harness.ready_for_pickup(id_number)

    collect = await harness.command("CollectCard", {
        "application_id": application_id, "bureau_id": BUREAU,
        "presented_id_number": id_number}, channel="wechat-oa")
    imported = await harness.command("ImportCard", {
        "id_number": random_id_number(), "card_no": "L123456"}, channel="mobile-app")

    assert (collect["status"], collect["code"]) == ("rejected", "bureau_only")
    assert (imported["status"], imported["code"]) == ("rejected", "bureau_only")
    assert (await harness.stream_types(harness.ref(id_number)))[-1] == "CardReadyForPickup"


# --- the durable production timer (PostgreSQL only) ---------------------------------------


async def test_with_a_production_time_the_card_is_ready_only_when_the_timer_fires(
    harness: Harness,
) -> None:
    schema = unique("issuance_timer")
    now = datetime.now(UTC)
    settings = IssuanceSettings(issuance_production_seconds=7 * 86400)
    pool = harness.runtime.pool
    await migrate(pool, schema, issuance_ddl(schema))
    try:
        handlers = IssuanceHandlers(Kit(settings, schema, "issuance.events", clock=lambda: now))
        ref = uuid.uuid4().hex
        approved = ReviewApproved(application_id=str(uuid.uuid4()), reviewer_id="r",
                                  pickup_bureau=BUREAU, old_card_no="L000001")
        envelope = CitizenStreams(ref).emit("review.events", approved, at=now)
        async with pool.acquire() as conn, conn.transaction():
            await handlers.on_review_event(conn, envelope)

        async def types() -> list[str]:
            rows = await pool.fetch(
                f"SELECT type FROM {schema}.events WHERE stream_id = $1 ORDER BY version",
                f"card-{ref}")
            return [r["type"] for r in rows]

        assert await types() == ["CardIssued", "CardProductionStarted"]
        assert await handlers.finish_due_productions(pool, now + timedelta(days=6)) == 0
        assert await handlers.finish_due_productions(pool, now + timedelta(days=7)) == 1
        assert await types() == ["CardIssued", "CardProductionStarted", "CardReissued",
                                 "CardReadyForPickup"]
        assert await handlers.finish_due_productions(pool, now + timedelta(days=8)) == 0
        assert await pool.fetchval(f"SELECT count(*) FROM {schema}.production_timers") == 0
    finally:
        await pool.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_a_collection_waits_for_the_approval_the_review_follower_has_not_applied(
    harness: Harness,
) -> None:
    id_number = random_id_number()
    ref = harness.ref(id_number)
    old = await harness.imported(id_number)
    application_id = str(uuid.uuid4())
    collect = {"application_id": application_id, "bureau_id": BUREAU,
               "presented_id_number": id_number}

    async with follower_paused(harness.runtime, "review.events"):
        await harness.review_event(ref, ReviewApproved(
            application_id=application_id, reviewer_id="reviewer-7", pickup_bureau=BUREAU,
            old_card_no=old))
        while_paused = await harness.command("CollectCard", collect)
    await harness.events_of(ref, 4)  # production started, reissued, ready for pickup
    after = await until_consistent(lambda: harness.command("CollectCard", collect))

    assert (while_paused["status"], while_paused["code"]) == ("rejected", "not_yet_consistent")
    # Resuming the follower rebalances the group, which may redeliver the first command:
    # decided afresh then, it is the one that collects the card, and this one repeats it.
    assert (after["status"], after["code"]) in {("accepted", "accepted"),
                                                ("rejected", "already_collected")}, after
    assert (await harness.stream_types(ref)).count("CardCollected") == 1
