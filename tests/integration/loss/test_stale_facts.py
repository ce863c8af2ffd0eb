"""Loss decides only on facts it has certainly seen: its issuance follower and its commands
never interleave on one citizen, and a command waits for the followers to catch up."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from shared.contracts.issuance import CardReissued
from tests.integration.loss.conftest import Harness
from tests.integration.loss.test_loss_service import citizen_with_card, report_formal_loss
from tests.support import follower_paused, until_consistent

pytestmark = pytest.mark.integration

RACES = 30


Outcome = tuple[str, str, str, dict[str, Any]]


async def race_reissue_against_a_new_report(harness: Harness) -> Outcome:
    """A citizen with a formal loss: issuance's CardReissued and the citizen's next ReportLoss
    reach the loss service at the same moment."""
    citizen_ref, old_card = await citizen_with_card(harness)
    await report_formal_loss(harness, citizen_ref)
    new_card = f"N{uuid.uuid4().int % 10**9:09d}"
    reissued = harness.seal(f"card-{citizen_ref}", citizen_ref, CardReissued(
        application_id=str(uuid.uuid4()), new_card_no=new_card, old_card_no=old_card))
    _, reply = await asyncio.gather(
        harness.publish("issuance.events", reissued),
        harness.command("ReportLoss", {"session_token": harness.token(citizen_ref, "portrait"),
                                       "kind": "formal"}),
    )
    return citizen_ref, old_card, new_card, reply


def loss_closed_of(citizen_ref: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e["citizen_ref"] == citizen_ref and e["type"] == "LossClosed"


async def test_a_loss_reported_while_the_card_is_being_reissued_never_names_the_old_card(
    harness: Harness,
) -> None:
    outcomes = await asyncio.gather(*(race_reissue_against_a_new_report(harness)
                                      for _ in range(RACES)))

    for citizen_ref, old_card, new_card, reply in outcomes:
        await harness.loss_events.wait_for(loss_closed_of(citizen_ref))
        reports = [e for e in harness.loss_events.json_values()
                   if e["citizen_ref"] == citizen_ref and e["type"] == "LossReported"]
        assert reports[0]["data"]["card_no"] == old_card  # the first, honest report
        later = reports[1:]
        if reply["status"] == "accepted":
            assert [e["data"]["card_no"] for e in later] == [new_card], reply
        else:
            assert reply["code"] == "already_lost", reply
            assert later == []


async def test_a_loss_is_not_decided_while_the_issuance_follower_is_behind(
    harness: Harness,
) -> None:
    citizen_ref, old_card = await citizen_with_card(harness)
    await report_formal_loss(harness, citizen_ref)
    new_card = f"N{uuid.uuid4().int % 10**9:09d}"
    payload = {"session_token": harness.token(citizen_ref, "portrait"), "kind": "formal"}
    request_id = str(uuid.uuid4())

    async with follower_paused(harness.runtime, "issuance.events"):
        # Issuance replaced the card (and the citizen holds the new one); loss has not seen it.
        await harness.publish("issuance.events", harness.seal(
            f"card-{citizen_ref}", citizen_ref, CardReissued(
                application_id=str(uuid.uuid4()), new_card_no=new_card, old_card_no=old_card)))
        while_paused = await harness.command("ReportLoss", payload, request_id=request_id)
    retried = await until_consistent(
        lambda: harness.command("ReportLoss", payload, request_id=request_id))

    assert (while_paused["status"], while_paused["code"]) == ("rejected", "not_yet_consistent")
    assert retried["status"] == "accepted", retried
    reported = await harness.loss_events.wait_for(
        lambda e: e["citizen_ref"] == citizen_ref and e["type"] == "LossReported"
        and e["data"]["loss_id"] == retried["data"]["loss_id"])
    assert reported["data"]["card_no"] == new_card
