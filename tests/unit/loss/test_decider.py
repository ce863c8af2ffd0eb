"""The loss decider: given past events, when a command arrives, then these events or a refusal."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest

from services.loss.domain import (
    DECIDER,
    AlreadyLostError,
    ApplicationStatus,
    CancelLoss,
    CloseLoss,
    DecisionContext,
    ExpireTemporaryLoss,
    LossCommand,
    LossPolicy,
    LossState,
    NoActiveLossError,
    NoCardError,
    PortraitRequiredError,
    ReissueInProgressError,
    ReportLoss,
    Verification,
)
from shared.contracts.common import SubjectErased
from shared.contracts.loss import (
    LossCancelled,
    LossClosed,
    LossEvent,
    LossReported,
    TemporaryLossExpired,
)
from shared.errors import SubjectErasedError
from tests.deciders import Given
from tests.deciders import given as spec

NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
PERIOD = timedelta(days=15)
PORTRAIT_MAX_AGE = timedelta(minutes=10)
CARD = "A12345678"
POLICY = LossPolicy(temporary_period=PERIOD, portrait_max_age=PORTRAIT_MAX_AGE,
                    financial_freeze=True)
CONTEXT = DecisionContext(now=NOW, new_id=lambda: "L2", card_no=CARD, application_status="none",
                          policy=POLICY)


def opening(loss_id: str) -> DecisionContext:
    """The context in which a new case gets `loss_id`."""
    return replace(CONTEXT, new_id=lambda: loss_id)

REALNAME = Verification("realname")
FRESH_PORTRAIT = Verification("portrait", NOW - timedelta(minutes=2))


def report(
    kind: Literal["temporary", "formal"], verification: Verification = REALNAME
) -> ReportLoss:
    return ReportLoss(kind=kind, channel="wechat-oa", verification=verification)


def temporary_reported(loss_id: str = "L1", at: datetime = NOW - timedelta(days=1)) -> LossReported:
    return LossReported(loss_id=loss_id, kind="temporary", card_no=CARD, expires_at=at + PERIOD,
                        financial_freeze=True, channel="wechat-oa")


def formal_reported(loss_id: str = "L1", *, supersedes: bool = False) -> LossReported:
    return LossReported(loss_id=loss_id, kind="formal", card_no=CARD, expires_at=None,
                        financial_freeze=True, channel="wechat-oa",
                        supersedes_temporary=supersedes)


def given(*history: LossEvent) -> Given[LossCommand, LossState, LossEvent, DecisionContext]:
    return spec(DECIDER, *history, context=CONTEXT)


# ----------------------------------------------------------------------------- report


def test_a_temporary_loss_freezes_the_card_until_the_period_ends() -> None:
    given().when(report("temporary")).then(
        LossReported(loss_id="L2", kind="temporary", card_no=CARD, expires_at=NOW + PERIOD,
                     financial_freeze=True, channel="wechat-oa")
    )


def test_the_financial_freeze_follows_the_regions_policy() -> None:
    no_freeze = replace(CONTEXT, policy=replace(POLICY, financial_freeze=False))
    [event] = given().when(report("temporary"), no_freeze).decided()
    assert isinstance(event, LossReported)
    assert event.financial_freeze is False


def test_a_citizen_without_a_known_card_cannot_report_a_loss() -> None:
    given().when(report("temporary"), replace(CONTEXT, card_no=None)).then_refused(NoCardError)


def test_a_formal_loss_with_a_fresh_portrait_verification_has_no_expiry() -> None:
    given().when(report("formal", FRESH_PORTRAIT)).then(
        LossReported(loss_id="L2", kind="formal", card_no=CARD, expires_at=None,
                     financial_freeze=True, channel="wechat-oa")
    )


def test_a_formal_loss_needs_a_portrait_verification() -> None:
    given().when(report("formal", REALNAME)).then_refused(PortraitRequiredError)


def test_a_formal_loss_is_refused_when_the_portrait_verification_is_too_old() -> None:
    stale = Verification("portrait", NOW - PORTRAIT_MAX_AGE - timedelta(seconds=1))
    given().when(report("formal", stale)).then_refused(PortraitRequiredError)


def test_a_portrait_verification_exactly_at_the_limit_still_counts() -> None:
    edge = Verification("portrait", NOW - PORTRAIT_MAX_AGE)
    [event] = given().when(report("formal", edge)).decided()
    assert isinstance(event, LossReported)
    assert event.kind == "formal"


def test_a_temporary_loss_made_formal_keeps_its_case_and_loses_its_expiry() -> None:
    given(temporary_reported("L1")).when(report("formal", FRESH_PORTRAIT), opening("L9")).then(
        formal_reported("L1", supersedes=True)
    )


def test_a_temporary_loss_is_not_made_formal_without_a_portrait_verification() -> None:
    given(temporary_reported()).when(report("formal", REALNAME)).then_refused(
        PortraitRequiredError
    )


def test_a_second_temporary_loss_is_refused_while_one_is_in_force() -> None:
    given(temporary_reported()).when(report("temporary")).then_refused(AlreadyLostError)


def test_a_second_formal_loss_is_refused() -> None:
    given(formal_reported()).when(report("formal", FRESH_PORTRAIT)).then_refused(AlreadyLostError)


def test_a_temporary_loss_is_refused_while_a_formal_one_is_in_force() -> None:
    given(formal_reported()).when(report("temporary")).then_refused(AlreadyLostError)


def test_a_new_loss_may_be_reported_after_the_last_one_was_cancelled() -> None:
    [event] = given(temporary_reported("L1"), LossCancelled(loss_id="L1")).when(
        report("temporary"), opening("L3")
    ).decided()
    assert isinstance(event, LossReported)
    assert event.loss_id == "L3"


# ----------------------------------------------------------------------------- cancel


def test_a_temporary_loss_can_be_cancelled_which_lifts_the_freeze() -> None:
    given(temporary_reported("L1")).when(CancelLoss()).then(
        LossCancelled(loss_id="L1", financial_freeze=False)
    )


def test_a_formal_loss_without_an_application_can_be_cancelled() -> None:
    given(formal_reported("L1")).when(CancelLoss()).then(LossCancelled(loss_id="L1"))


def test_cancelling_without_a_loss_in_force_is_refused() -> None:
    given().when(CancelLoss()).then_refused(NoActiveLossError)


def test_cancelling_an_expired_loss_is_refused() -> None:
    given(temporary_reported("L1"), TemporaryLossExpired(loss_id="L1")).when(
        CancelLoss()
    ).then_refused(NoActiveLossError)


@pytest.mark.parametrize("status", ["pending", "approved"])
def test_cancelling_is_refused_while_a_reissue_application_is_in_progress(
    status: ApplicationStatus,
) -> None:
    context = replace(CONTEXT, application_status=status)
    given(formal_reported()).when(CancelLoss(), context).then_refused(ReissueInProgressError)


@pytest.mark.parametrize("status", ["rejected", "none", "completed"])
def test_cancelling_is_allowed_once_no_application_is_in_progress(
    status: ApplicationStatus,
) -> None:
    context = replace(CONTEXT, application_status=status)
    given(formal_reported("L1")).when(CancelLoss(), context).then(LossCancelled(loss_id="L1"))


# ----------------------------------------------------------------------------- expiry


def test_a_due_temporary_loss_expires_and_lifts_the_freeze() -> None:
    due = temporary_reported("L1", at=NOW - PERIOD)
    given(due).when(ExpireTemporaryLoss("L1")).then(
        TemporaryLossExpired(loss_id="L1", financial_freeze=False)
    )


def test_a_timer_that_fires_early_expires_nothing() -> None:
    given(temporary_reported("L1")).when(ExpireTemporaryLoss("L1")).then()


def test_the_timer_of_a_temporary_loss_made_formal_is_void() -> None:
    given(temporary_reported("L1", at=NOW - PERIOD), formal_reported("L1", supersedes=True)).when(
        ExpireTemporaryLoss("L1")
    ).then()


def test_the_timer_of_a_cancelled_loss_is_void() -> None:
    given(temporary_reported("L1", at=NOW - PERIOD), LossCancelled(loss_id="L1")).when(
        ExpireTemporaryLoss("L1")
    ).then()


def test_the_timer_of_an_earlier_loss_does_not_expire_a_later_one() -> None:
    given(
        temporary_reported("L1", at=NOW - 2 * PERIOD),
        LossCancelled(loss_id="L1"),
        temporary_reported("L2", at=NOW - PERIOD),
    ).when(ExpireTemporaryLoss("L1")).then()


# ----------------------------------------------------------------------------- reissue


def test_a_reissued_card_closes_the_loss_in_force() -> None:
    given(formal_reported("L1")).when(CloseLoss("B87654321")).then(
        LossClosed(loss_id="L1", new_card_no="B87654321")
    )


def test_a_reissued_card_without_a_loss_in_force_changes_nothing() -> None:
    given().when(CloseLoss("B87654321")).then()


def test_after_a_reissue_a_new_loss_may_be_reported() -> None:
    [event] = given(formal_reported("L1"), LossClosed(loss_id="L1", new_card_no="B1")).when(
        report("temporary"), replace(opening("L5"), card_no="B1")
    ).decided()
    assert isinstance(event, LossReported)
    assert (event.loss_id, event.card_no) == ("L5", "B1")


# ----------------------------------------------------------------------------- erasure

ERASED = SubjectErased(reason="request")


def test_after_an_erasure_a_loss_report_is_refused_as_erased() -> None:
    given(formal_reported(), ERASED).when(report("temporary")).then_refused(SubjectErasedError)


def test_after_an_erasure_erased_outranks_an_unknown_card() -> None:
    given(ERASED).when(report("formal", FRESH_PORTRAIT),
                       replace(CONTEXT, card_no=None)).then_refused(SubjectErasedError)


def test_after_an_erasure_a_cancellation_is_refused_as_erased() -> None:
    given(temporary_reported(), ERASED).when(CancelLoss()).then_refused(SubjectErasedError)


def test_after_an_erasure_a_due_expiry_timer_is_void() -> None:
    given(temporary_reported("L1", at=NOW - PERIOD - timedelta(days=1)), ERASED).when(
        ExpireTemporaryLoss("L1")).then()


def test_after_an_erasure_a_reissued_card_closes_nothing() -> None:
    given(formal_reported(), ERASED).when(CloseLoss("B87654321")).then()


def test_events_after_an_erasure_do_not_reopen_the_case() -> None:
    assert DECIDER.is_erased(given(ERASED, formal_reported()).state)
