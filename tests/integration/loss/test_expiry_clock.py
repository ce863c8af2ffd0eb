"""A temporary loss's expiry timer ends with the loss, however it ends; the timers are only
touched when one runs (an hour-long temporary period here, so none expires meanwhile)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.loss.settings import LossSettings
from tests.integration.loss.conftest import Harness
from tests.integration.loss.test_loss_service import citizen_with_card, report_formal_loss

pytestmark = pytest.mark.integration

TIMERS = "SELECT count(*) FROM {schema}.expiry_timers WHERE citizen_ref = $1"


@pytest.fixture(scope="module")
def loss_settings() -> LossSettings:
    return LossSettings(loss_temporary_period=timedelta(hours=1))


async def report_temporary_loss(harness: Harness, citizen_ref: str) -> None:
    reply = await harness.command(
        "ReportLoss", {"session_token": harness.token(citizen_ref), "kind": "temporary"})
    assert (reply["status"], reply["code"]) == ("accepted", "accepted"), reply
    await harness.eventually(TIMERS, citizen_ref, expect=1)


async def test_a_temporary_loss_made_formal_stops_its_clock(harness: Harness) -> None:
    citizen_ref, _ = await citizen_with_card(harness)
    await report_temporary_loss(harness, citizen_ref)

    await report_formal_loss(harness, citizen_ref)

    await harness.eventually(TIMERS, citizen_ref, expect=0)


async def test_a_cancelled_temporary_loss_stops_its_clock(harness: Harness) -> None:
    citizen_ref, _ = await citizen_with_card(harness)
    await report_temporary_loss(harness, citizen_ref)

    reply = await harness.command("CancelLoss", {"session_token": harness.token(citizen_ref)})

    assert (reply["status"], reply["code"]) == ("accepted", "accepted"), reply
    await harness.eventually(TIMERS, citizen_ref, expect=0)


async def test_a_formal_loss_from_none_arms_no_clock_and_a_cancel_leaves_none(
    harness: Harness,
) -> None:
    citizen_ref, _ = await citizen_with_card(harness)
    await report_formal_loss(harness, citizen_ref)
    assert await harness.db.fetchval(TIMERS.format(schema=harness.schema), citizen_ref) == 0

    reply = await harness.command("CancelLoss", {"session_token": harness.token(citizen_ref)})

    assert (reply["status"], reply["code"]) == ("accepted", "accepted"), reply
    assert await harness.db.fetchval(TIMERS.format(schema=harness.schema), citizen_ref) == 0
