"""The loss service through Kafka and PostgreSQL: commands in, replies and events out."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from shared.contracts.issuance import CardIssued, CardReadyForPickup, CardReissued
from shared.contracts.review import ReissueApplied, ReviewRejected
from tests.integration.loss.conftest import Harness

pytestmark = pytest.mark.integration


def loss_event(citizen_ref: str, event_type: str) -> Any:
    return lambda e: e["citizen_ref"] == citizen_ref and e["type"] == event_type


async def citizen_with_card(harness: Harness) -> tuple[str, str]:
    """A fresh citizen whose card issuance has announced and the loss service has learned."""
    citizen_ref = harness.new_citizen()
    card_no = f"C{uuid.uuid4().int % 10**9:09d}"
    issued = harness.seal(f"card-{citizen_ref}", citizen_ref, CardIssued(card_no=card_no))
    await harness.publish("issuance.events", issued)
    await harness.eventually("SELECT card_no FROM {schema}.cards WHERE citizen_ref = $1",
                             citizen_ref, expect=card_no)
    return citizen_ref, card_no


async def report_formal_loss(harness: Harness, citizen_ref: str) -> dict[str, Any]:
    reply = await harness.command(
        "ReportLoss", {"session_token": harness.token(citizen_ref, "portrait"), "kind": "formal"}
    )
    assert (reply["status"], reply["code"]) == ("accepted", "accepted"), reply
    return reply


async def test_a_reported_temporary_loss_is_published_with_the_frozen_card(
    harness: Harness,
) -> None:
    citizen_ref, card_no = await citizen_with_card(harness)

    reply = await harness.command(
        "ReportLoss", {"session_token": harness.token(citizen_ref), "kind": "temporary"}
    )

    assert reply["status"] == "accepted", reply
    assert reply["data"]["kind"] == "temporary"
    event = await harness.loss_events.wait_for(loss_event(citizen_ref, "LossReported"))
    assert event["stream_id"] == f"loss-{citizen_ref}"
    assert event["correlation_id"] == reply["request_id"]
    assert event["data"]["loss_id"] == reply["data"]["loss_id"]
    assert event["data"]["kind"] == "temporary"
    assert event["data"]["card_no"] == card_no
    assert event["data"]["financial_freeze"] is True
    assert event["data"]["expires_at"] is not None


async def test_a_temporary_loss_expires_by_itself_when_its_period_ends(harness: Harness) -> None:
    citizen_ref, _ = await citizen_with_card(harness)
    reply = await harness.command(
        "ReportLoss", {"session_token": harness.token(citizen_ref), "kind": "temporary"}
    )
    assert reply["status"] == "accepted", reply

    expired = await harness.loss_events.wait_for(loss_event(citizen_ref, "TemporaryLossExpired"))

    reported = await harness.loss_events.wait_for(loss_event(citizen_ref, "LossReported"))
    assert expired["data"]["loss_id"] == reported["data"]["loss_id"]
    assert expired["data"]["financial_freeze"] is False
    assert expired["causation_id"] == reported["event_id"]
    assert expired["version"] == reported["version"] + 1
    await harness.eventually(
        "SELECT count(*) FROM {schema}.expiry_timers WHERE citizen_ref = $1", citizen_ref,
        expect=0,
    )


async def test_a_formal_loss_without_a_portrait_verification_is_refused(
    harness: Harness,
) -> None:
    citizen_ref, _ = await citizen_with_card(harness)

    reply = await harness.command(
        "ReportLoss", {"session_token": harness.token(citizen_ref, "realname"), "kind": "formal"}
    )

    assert (reply["status"], reply["code"]) == ("rejected", "portrait_required")


async def test_a_forged_session_token_is_refused(harness: Harness) -> None:
    reply = await harness.command("ReportLoss", {"session_token": "forged.token",
                                                 "kind": "temporary"})

    assert (reply["status"], reply["code"]) == ("rejected", "invalid_session")


async def test_a_citizen_without_a_known_card_cannot_report_a_loss(harness: Harness) -> None:
    reply = await harness.command(
        "ReportLoss", {"session_token": harness.token(harness.new_citizen()), "kind": "temporary"}
    )

    assert (reply["status"], reply["code"]) == ("rejected", "no_card")


async def test_cancelling_is_refused_while_an_application_is_pending_and_allowed_after_rejection(
    harness: Harness,
) -> None:
    citizen_ref, card_no = await citizen_with_card(harness)
    await report_formal_loss(harness, citizen_ref)
    application_id = str(uuid.uuid4())
    review_stream = f"review-{citizen_ref}"
    applied = harness.seal(review_stream, citizen_ref, ReissueApplied(
        application_id=application_id, loss_id="irrelevant", old_card_no=card_no,
        address="enc:v1:x", phone="enc:v1:x", photo_ref="enc:v1:x", pickup_bureau="B01",
        channel="wechat-oa",
    ))
    await harness.publish("review.events", applied)
    await harness.eventually("SELECT status FROM {schema}.applications WHERE citizen_ref = $1",
                             citizen_ref, expect="pending")

    refused = await harness.command("CancelLoss", {"session_token": harness.token(citizen_ref)})

    assert (refused["status"], refused["code"]) == ("rejected", "reissue_in_progress")

    rejected = harness.seal(review_stream, citizen_ref, ReviewRejected(
        application_id=application_id, reviewer_id="R1", reason="photo unusable"))
    await harness.publish("review.events", rejected)
    await harness.eventually("SELECT status FROM {schema}.applications WHERE citizen_ref = $1",
                             citizen_ref, expect="rejected")

    allowed = await harness.command("CancelLoss", {"session_token": harness.token(citizen_ref)})

    assert (allowed["status"], allowed["code"]) == ("accepted", "accepted"), allowed
    cancelled = await harness.loss_events.wait_for(loss_event(citizen_ref, "LossCancelled"))
    assert cancelled["data"]["financial_freeze"] is False
    assert cancelled["correlation_id"] == allowed["request_id"]


async def test_a_reissued_card_closes_the_loss_once_even_when_redelivered(
    harness: Harness,
) -> None:
    citizen_ref, card_no = await citizen_with_card(harness)
    await report_formal_loss(harness, citizen_ref)
    reissued = harness.seal(f"card-{citizen_ref}", citizen_ref, CardReissued(
        application_id=str(uuid.uuid4()), new_card_no="N123456789", old_card_no=card_no))

    await harness.publish("issuance.events", reissued)
    await harness.publish("issuance.events", reissued)  # redelivered, same event id
    # Same key, same partition: once this one is processed, the duplicate was too.
    marker = harness.seal(f"card-{citizen_ref}", citizen_ref, CardReadyForPickup(
        application_id="A", pickup_bureau="B01", card_no="N123456789"))
    await harness.publish("issuance.events", marker)
    await harness.eventually(
        "SELECT count(*) FROM {schema}.processed WHERE message_id = $1", str(marker.event_id),
        expect=1,
    )

    closed = await harness.loss_events.wait_for(loss_event(citizen_ref, "LossClosed"))
    assert closed["data"]["new_card_no"] == "N123456789"
    assert closed["causation_id"] == str(reissued.event_id)
    assert closed["correlation_id"] == reissued.correlation_id
    count = await harness.db.fetchval(
        f"SELECT count(*) FROM {harness.schema}.events WHERE stream_id = $1 AND type = $2",
        f"loss-{citizen_ref}", "LossClosed",
    )
    assert count == 1
    card = await harness.db.fetchval(
        f"SELECT card_no FROM {harness.schema}.cards WHERE citizen_ref = $1", citizen_ref)
    assert card == "N123456789"
