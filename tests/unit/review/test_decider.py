"""The review decider, given/when/then: past review events, a command (in a context: the
time, the next application id, the citizen's loss case, the region's approval rule), the
events it decides or its refusal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

import pytest

from services.review.domain import (
    DECIDER,
    MANUAL_ONLY,
    WITHDRAWN_LOSS_CANCELLED,
    AlreadyApprovedError,
    AlreadyDecidedError,
    ApplicationPendingError,
    AutoApprovalRule,
    DecideApplication,
    DecisionContext,
    LossView,
    NoFormalLossError,
    ReasonRequiredError,
    ReviewCommand,
    ReviewState,
    SubmitApplication,
    UnknownApplicationError,
    WithdrawApplication,
    track_loss,
    withdrawal_for,
)
from shared.contracts.common import SubjectErased
from shared.contracts.loss import LossCancelled, LossClosed, LossReported, TemporaryLossExpired
from shared.contracts.review import (
    ApplicationWithdrawn,
    ReissueApplied,
    ReviewApproved,
    ReviewEvent,
    ReviewRejected,
)
from shared.erasure import decide_erasure
from shared.errors import BureauNotServedError, SubjectErasedError
from tests.deciders import Given
from tests.deciders import given as spec

NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
LOSS = LossView(loss_id="loss-1", kind="formal", card_no="C0001", in_force=True)
AUTO = AutoApprovalRule(enabled=True, max_rejections=0, bureaus=frozenset(),
                        reviewer_id="auto-rule")
CONTEXT = DecisionContext(now=NOW, new_id=lambda: "app-1", loss=LOSS, rule=MANUAL_ONLY)


def context(application_id: str = "app-1", *, loss: LossView | None = LOSS,
            rule: AutoApprovalRule = MANUAL_ONLY) -> DecisionContext:
    """The usual context, in which a new application gets `application_id`."""
    return replace(CONTEXT, new_id=lambda: application_id, loss=loss, rule=rule)


def given(*history: ReviewEvent) -> Given[ReviewCommand, ReviewState, ReviewEvent,
                                          DecisionContext]:
    return spec(DECIDER, *history, context=CONTEXT)


def submit(bureau: str = "bureau-1") -> SubmitApplication:
    return SubmitApplication(address="enc:v1:a", phone="enc:v1:p", photo_ref="enc:v1:f",
                             pickup_bureau=bureau, channel="wechat-oa")


def applied(application_id: str = "app-1", resubmission_of: str | None = None,
            bureau: str = "bureau-1", loss_id: str = "loss-1") -> ReissueApplied:
    return ReissueApplied(application_id=application_id, loss_id=loss_id, old_card_no="C0001",
                          address="enc:v1:a", phone="enc:v1:p", photo_ref="enc:v1:f",
                          pickup_bureau=bureau, channel="wechat-oa",
                          resubmission_of=resubmission_of)


def approve(application_id: str = "app-1", *,
            bureaus: tuple[str, ...] = ()) -> DecideApplication:
    return DecideApplication(application_id=application_id, reviewer_id="rev-7",
                             decision="approve", reason="", bureaus=bureaus)


def reject(application_id: str = "app-1", reason: str = "photo unclear", *,
           bureaus: tuple[str, ...] = ()) -> DecideApplication:
    return DecideApplication(application_id=application_id, reviewer_id="rev-7",
                             decision="reject", reason=reason, bureaus=bureaus)


def approved(application_id: str = "app-1", *, automatic: bool = False,
             reviewer_id: str = "rev-7") -> ReviewApproved:
    return ReviewApproved(application_id=application_id, reviewer_id=reviewer_id,
                          automatic=automatic, pickup_bureau="bureau-1", old_card_no="C0001")


def rejected(application_id: str = "app-1") -> ReviewRejected:
    return ReviewRejected(application_id=application_id, reviewer_id="rev-7",
                          reason="photo unclear")


def withdraw(loss_id: str = "loss-1") -> WithdrawApplication:
    return WithdrawApplication(loss_id=loss_id, reason=WITHDRAWN_LOSS_CANCELLED)


def withdrawn(application_id: str = "app-1") -> ApplicationWithdrawn:
    return ApplicationWithdrawn(application_id=application_id, reason=WITHDRAWN_LOSS_CANCELLED)


# --- submitting -----------------------------------------------------------------------------


def test_a_citizen_with_a_formal_loss_in_force_applies_and_the_application_awaits_review() -> None:
    given().when(submit()).then(applied())


def test_a_new_application_takes_the_next_id_the_context_gives() -> None:
    given().when(submit(), context("app-9")).then(applied("app-9"))


def test_an_application_without_any_loss_is_refused_as_no_formal_loss() -> None:
    given().when(submit(), context(loss=None)).then_refused(NoFormalLossError)


def test_an_application_under_a_temporary_loss_is_refused_as_no_formal_loss() -> None:
    temporary = LossView(loss_id="loss-1", kind="temporary", card_no="C0001", in_force=True)
    given().when(submit(), context(loss=temporary)).then_refused(NoFormalLossError)


def test_an_application_after_the_formal_loss_ended_is_refused_as_no_formal_loss() -> None:
    ended = LossView(loss_id="loss-1", kind="formal", card_no="C0001", in_force=False)
    given().when(submit(), context(loss=ended)).then_refused(NoFormalLossError)


def test_a_second_application_while_one_is_pending_is_refused() -> None:
    given(applied()).when(submit(), context("app-2")).then_refused(ApplicationPendingError)


def test_an_application_after_approval_for_the_same_loss_is_refused() -> None:
    given(applied(), approved()).when(submit(), context("app-2")).then_refused(
        AlreadyApprovedError)


def test_a_new_loss_after_an_approved_reissue_allows_a_new_application() -> None:
    new_loss = LossView(loss_id="loss-2", kind="formal", card_no="C0001", in_force=True)
    given(applied(), approved()).when(submit(), context("app-2", loss=new_loss)).then(
        applied("app-2", loss_id="loss-2")
    )


def test_a_rejected_application_can_be_resubmitted_and_names_the_rejected_one() -> None:
    given(applied(), rejected()).when(submit(), context("app-2")).then(
        applied("app-2", resubmission_of="app-1")
    )


def test_reject_then_resubmit_then_approve_approves_the_resubmission() -> None:
    given(applied(), rejected(), applied("app-2", resubmission_of="app-1")).when(
        approve("app-2")
    ).then(approved("app-2"))


def test_an_erased_citizen_cannot_apply() -> None:
    given(SubjectErased(reason="request")).when(submit()).then_refused(SubjectErasedError)


# --- automatic approval -------------------------------------------------------------------


def test_with_automatic_approval_off_a_clean_case_waits_for_a_reviewer() -> None:
    given().when(submit(), context(rule=MANUAL_ONLY)).then(applied())


def test_with_automatic_approval_on_a_clean_case_is_applied_and_approved_at_once() -> None:
    given().when(submit(), context(rule=AUTO)).then(
        applied(), approved(automatic=True, reviewer_id="auto-rule")
    )


def test_automatic_approval_records_the_configured_reviewer_id() -> None:
    rule = AutoApprovalRule(enabled=True, max_rejections=0, bureaus=frozenset(),
                            reviewer_id="region-42-rule")
    given().when(submit(), context(rule=rule)).then(
        applied(), approved(automatic=True, reviewer_id="region-42-rule")
    )


def test_a_resubmission_after_a_rejection_is_not_a_clean_case() -> None:
    given(applied(), rejected()).when(submit(), context("app-2", rule=AUTO)).then(
        applied("app-2", resubmission_of="app-1")
    )


def test_a_region_may_tolerate_earlier_rejections_in_automatic_approval() -> None:
    tolerant = AutoApprovalRule(enabled=True, max_rejections=1, bureaus=frozenset(),
                                reviewer_id="auto-rule")
    given(applied(), rejected()).when(submit(), context("app-2", rule=tolerant)).then(
        applied("app-2", resubmission_of="app-1"),
        approved("app-2", automatic=True, reviewer_id="auto-rule"),
    )


def test_automatic_approval_applies_only_to_the_allowed_pickup_bureaus() -> None:
    only_b1 = AutoApprovalRule(enabled=True, max_rejections=0, bureaus=frozenset({"bureau-1"}),
                               reviewer_id="auto-rule")
    given().when(submit(bureau="bureau-9"), context(rule=only_b1)).then(
        applied(bureau="bureau-9"))
    given().when(submit(bureau="bureau-1"), context(rule=only_b1)).then(
        applied(), approved(automatic=True, reviewer_id="auto-rule")
    )


# --- deciding -------------------------------------------------------------------------------


def test_a_reviewer_approves_a_pending_application_with_its_bureau_and_old_card() -> None:
    given(applied()).when(approve()).then(approved())


def test_a_reviewer_rejects_a_pending_application_with_a_reason() -> None:
    given(applied()).when(reject()).then(rejected())


def test_a_rejection_without_a_reason_is_refused() -> None:
    given(applied()).when(reject(reason="   ")).then_refused(ReasonRequiredError)


def test_a_decision_on_an_unknown_application_is_refused() -> None:
    given(applied()).when(approve("app-404")).then_refused(UnknownApplicationError)


def test_a_decision_on_an_approved_application_is_refused_as_already_decided() -> None:
    given(applied(), approved()).when(reject()).then_refused(AlreadyDecidedError)


def test_a_decision_on_an_earlier_rejected_application_is_refused_as_already_decided() -> None:
    given(applied(), rejected(), applied("app-2", resubmission_of="app-1")).when(
        approve("app-1")
    ).then_refused(AlreadyDecidedError)


def test_a_decision_on_a_withdrawn_application_is_refused_as_already_decided() -> None:
    given(applied(), withdrawn()).when(approve()).then_refused(AlreadyDecidedError)


# --- withdrawal when the loss is cancelled -----------------------------------------------


def test_cancelling_the_loss_withdraws_a_pending_application() -> None:
    given(applied()).when(withdraw()).then(withdrawn())


def test_cancelling_the_loss_withdraws_a_rejected_application() -> None:
    given(applied(), rejected()).when(withdraw()).then(withdrawn())


def test_cancelling_the_loss_leaves_an_approved_application_alone() -> None:
    given(applied(), approved()).when(withdraw()).then()


def test_cancelling_a_loss_without_an_application_records_nothing() -> None:
    given().when(withdraw()).then()


def test_cancelling_another_loss_case_leaves_the_application_alone() -> None:
    given(applied()).when(withdraw("loss-0")).then()


def test_after_a_withdrawal_a_new_formal_loss_allows_a_fresh_application() -> None:
    new_loss = LossView(loss_id="loss-2", kind="formal", card_no="C0001", in_force=True)
    given(applied(), rejected(), withdrawn()).when(submit(), context("app-2", loss=new_loss)).then(
        applied("app-2", loss_id="loss-2")
    )


# --- the loss case as loss.events tell it -------------------------------------------------


def reported(kind: Literal["temporary", "formal"] = "formal") -> LossReported:
    return LossReported(loss_id="loss-1", kind=kind, card_no="C0001",
                        expires_at=None, financial_freeze=True, channel="wechat-oa")


def test_a_reported_formal_loss_is_in_force() -> None:
    assert track_loss(None, reported()) == LOSS


def test_a_cancelled_loss_is_no_longer_in_force_and_asks_for_a_withdrawal() -> None:
    event = LossCancelled(loss_id="loss-1")
    assert track_loss(LOSS, event) == LossView("loss-1", "formal", "C0001", in_force=False)
    assert withdrawal_for(event) == withdraw()


def test_an_expired_temporary_loss_ends_without_a_withdrawal() -> None:
    temporary = track_loss(None, reported("temporary"))
    event = TemporaryLossExpired(loss_id="loss-1")
    assert track_loss(temporary, event) == LossView("loss-1", "temporary", "C0001",
                                                    in_force=False)
    assert withdrawal_for(event) is None


def test_the_old_expiry_of_a_temporary_loss_made_formal_does_not_end_it() -> None:
    assert track_loss(LOSS, TemporaryLossExpired(loss_id="loss-1")) == LOSS


def test_a_closed_loss_ends_without_a_withdrawal() -> None:
    event = LossClosed(loss_id="loss-1", new_card_no="C0002")
    assert track_loss(LOSS, event) == LossView("loss-1", "formal", "C0001", in_force=False)
    assert withdrawal_for(event) is None


def test_an_event_about_another_loss_case_changes_nothing() -> None:
    assert track_loss(LOSS, LossCancelled(loss_id="loss-0")) == LOSS


# --- erasure --------------------------------------------------------------------------------


def test_an_erased_citizens_pending_application_can_no_longer_be_decided() -> None:
    erased = given(applied(), SubjectErased(reason="request"))
    erased.when(approve()).then_refused(SubjectErasedError)
    erased.when(reject()).then_refused(SubjectErasedError)


def test_a_cancelled_loss_withdraws_nothing_for_an_erased_citizen() -> None:
    given(applied(), SubjectErased(reason="request")).when(withdraw()).then()


def test_erasing_a_review_stream_twice_records_subject_erased_once() -> None:
    before = given(applied()).state
    after = given(applied(), SubjectErased(reason="request")).state
    assert decide_erasure(DECIDER.is_erased(before), "request") == [
        SubjectErased(reason="request")]
    assert decide_erasure(DECIDER.is_erased(after), "request") == []


# --- a bureau channel bound to the bureaus it serves ---------------------------------------


def test_a_channel_serving_the_pickup_bureau_decides_as_any_bureau_channel_would() -> None:
    given(applied()).when(approve(bureaus=("bureau-1", "bureau-9"))).then(approved())
    given(applied()).when(reject(bureaus=("bureau-1",))).then(rejected())


@pytest.mark.parametrize("decision", [approve, reject])
def test_a_channel_restricted_to_another_bureau_can_neither_approve_nor_reject(
    decision: Callable[..., DecideApplication],
) -> None:
    given(applied(bureau="bureau-1")).when(
        decision(bureaus=("bureau-2",))).then_refused(BureauNotServedError)


def test_another_bureau_learns_nothing_of_an_application_already_decided() -> None:
    # Not `already_decided`: whether the application exists there is none of its business.
    given(applied(), approved()).when(reject(bureaus=("bureau-2",))).then_refused(
        BureauNotServedError)
    given(applied(), rejected()).when(approve(bureaus=("bureau-2",))).then_refused(
        BureauNotServedError)
