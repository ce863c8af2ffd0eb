"""An auditor replays the real log after many concurrent journeys: the card status and timeline
rebuilt from the log alone agree with the live projection, and a live row made wrong on purpose
is reported with its citizen and field."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner

from cardctl.audit import CONTRACT_TOPICS, audit_app, partitions_of, replay_log
from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Journey, Session
from cardctl.operations import seed
from services.status.settings import StatusSettings
from shared.settings import CardDeskSettings
from tests.support import BUREAU_CHANNEL, CITIZEN_CHANNEL, eventually, kafka_options

# The running status service's consumer group (`carddesk-<name>`, shared.service).
STATUS_GROUP = "carddesk-status"

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Ending:
    """How a journey ends: the status shown and the last events it must have produced."""

    status: str
    last_events: tuple[str, ...]


async def whole(journey: Journey, s: Session) -> Ending:
    await journey.whole(s)
    return Ending("ACTIVE", ("CardCollected", "LossClosed"))


async def temporary_loss_that_expires(journey: Journey, s: Session) -> Ending:
    await journey.log_in(s)
    await journey.authorize_e_card(s)
    await journey.report_loss(s, "temporary")
    return Ending("ACTIVE", ("TemporaryLossExpired",))


async def rejected_application(journey: Journey, s: Session) -> Ending:
    await journey.log_in(s)
    await journey.verify_portrait(s)
    await journey.report_loss(s, "formal")
    await journey.apply_for_reissue(s)
    await journey.sim.expect_accepted("review", "DecideReview", {
        "application_id": s.application_id, "reviewer_id": "reviewer-2", "decision": "reject",
        "reason": "photo unclear"}, channel_id=BUREAU_CHANNEL,
        retry_codes=frozenset({"unknown_application"}))
    return Ending("REISSUE_REJECTED", ("ReviewRejected",))


async def cancelled_loss(journey: Journey, s: Session) -> Ending:
    await journey.log_in(s)
    await journey.verify_portrait(s)
    await journey.report_loss(s, "formal")
    await journey.sim.expect_accepted("loss", "CancelLoss", {"session_token": s.token},
                                      channel_id=CITIZEN_CHANNEL, session_key=s.key)
    return Ending("ACTIVE", ("LossCancelled",))


async def approved_not_collected(journey: Journey, s: Session) -> Ending:
    await journey.log_in(s)
    await journey.verify_portrait(s)
    await journey.report_loss(s, "formal")
    await journey.apply_for_reissue(s)
    await journey.approve(s)
    return Ending("READY_FOR_PICKUP", ("CardReadyForPickup", "LossClosed"))


JOURNEYS: list[Callable[[Journey, Session], Awaitable[Ending]]] = [
    whole, temporary_loss_that_expires, rejected_application, cancelled_loss,
    approved_not_collected,
]


async def drive(journey: Journey, citizen: SyntheticCitizen,
                run: Callable[[Journey, Session], Awaitable[Ending]]) -> tuple[Session, str]:
    session = Session(citizen)
    ending = await run(journey, session)
    await journey.wait_for_timeline(session.citizen_ref, *ending.last_events, timeout_s=90)
    await journey.wait_for_status(session.citizen_ref, ending.status, timeout_s=90)
    return session, ending.status


async def projection_caught_up(settings: StatusSettings) -> None:
    """The status consumer group has committed, on every partition, at least the end offsets
    seen now: every event published so far is in the live projection (a consumer commits only
    after its transaction)."""
    bootstrap = settings.kafka_bootstrap
    layout = await partitions_of(bootstrap, list(CONTRACT_TOPICS), security=kafka_options())
    partitions = [TopicPartition(t, p) for t, ps in layout.items() for p in ps]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), group_id=None)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_options())
    await admin.start()
    try:
        async def committed_all() -> bool:
            committed = await admin.list_consumer_group_offsets(STATUS_GROUP)
            return not [tp for tp, end in ends.items()
                        if end > 0 and (tp not in committed or committed[tp].offset < end)]

        await eventually(committed_all, timeout_s=60)
    finally:
        await admin.close()


def audit(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(audit_app, ["replay", *args])
    return result.exit_code, result.output


async def test_replaying_the_log_reproduces_every_citizens_live_status_and_timeline(
    journey: Journey, settings: CardDeskSettings, tmp_path: Path,
) -> None:
    citizens = await seed(settings, 20, tmp_path / "audit.jsonl", report=lambda _: None)
    driven = await asyncio.gather(*(drive(journey, c, JOURNEYS[i % len(JOURNEYS)])
                                    for i, c in enumerate(citizens)))
    status_settings = StatusSettings()
    await projection_caught_up(status_settings)
    mine = {s.citizen_ref for s, _ in driven}
    assert {status for _, status in driven} == {"ACTIVE", "REISSUE_REJECTED", "READY_FOR_PICKUP"}

    # --all on the real topics: another run sharing this Kafka may still be publishing, so
    # citizens whose events arrive while the replay runs may differ; ours are done.
    report = await replay_log(status_settings.kafka_bootstrap, status_settings.database_url,
                              schema=status_settings.status_schema,
                              security=kafka_options())
    assert mine <= set(report.agreed), [d.describe() for d in report.differences]
    assert report.events >= 20

    one = driven[0][0].citizen_ref
    code, output = await asyncio.to_thread(audit, "--citizen", one)
    assert code == 0, output
    assert "1 citizen(s) agree with the live projection, 0 differ" in output


async def test_a_live_row_made_wrong_is_reported_with_its_citizen_and_field(
    journey: Journey, settings: CardDeskSettings, tmp_path: Path,
) -> None:
    [citizen] = await seed(settings, 1, tmp_path / "wrong.jsonl", report=lambda _: None)
    session, status = await drive(journey, citizen, cancelled_loss)
    status_settings = StatusSettings()
    await projection_caught_up(status_settings)
    ref, schema = session.citizen_ref, status_settings.status_schema

    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(f"UPDATE {schema}.card_status SET status = 'LOST'"
                           " WHERE citizen_ref = $1", ref)
        code, output = await asyncio.to_thread(audit, "--citizen", ref)
        report = await replay_log(status_settings.kafka_bootstrap, settings.database_url,
                                  schema=schema, security=kafka_options())
    finally:
        await conn.execute(f"UPDATE {schema}.card_status SET status = $2"
                           " WHERE citizen_ref = $1", ref, status)
        await conn.close()

    assert code == 1, output
    assert f"DIFF {ref} status: log ACTIVE / live LOST" in output
    assert "0 citizen(s) agree with the live projection, 1 differ" in output
    assert ref in report.disagreeing
    assert [(d.field, d.log_value, d.live_value) for d in report.differences
            if d.citizen_ref == ref] == [("status", "ACTIVE", "LOST")]
    code, output = await asyncio.to_thread(audit, "--citizen", ref)
    assert code == 0, output
