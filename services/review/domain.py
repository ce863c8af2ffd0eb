"""Reissue applications, decided purely: `decide(command, state, context)`, `evolve(state,
event)`, and the `DECIDER` that holds them.

The state is one citizen's stream `review-{citizen_ref}`: their latest application and what
earlier ones left behind. Whether a formal loss is in force comes from loss.events (tracked by
`track_loss`) and enters `decide` in the context, with the time, new application ids and the
region's approval rule. No I/O, no clock, no id generation here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, assert_never

from shared.channels import bureau_served
from shared.contracts import decoders
from shared.contracts.common import SubjectErased
from shared.contracts.loss import (
    LossCancelled,
    LossClosed,
    LossEvent,
    LossReported,
    TemporaryLossExpired,
)
from shared.contracts.review import (
    ApplicationWithdrawn,
    ReissueApplied,
    ReviewApproved,
    ReviewEvent,
    ReviewRejected,
)
from shared.decider import Context, Decider
from shared.errors import BureauNotServedError, DomainError, SubjectErasedError
from shared.events import DomainEvent, EventDecoder

# The stable reason recorded when a cancelled loss takes its application with it.
WITHDRAWN_LOSS_CANCELLED = "loss_cancelled"


def stream_id(citizen_ref: str) -> str:
    return f"review-{citizen_ref}"


# --- errors -------------------------------------------------------------------------------


class NoFormalLossError(DomainError):
    code = "no_formal_loss"
    default_message = "a reissue needs a formal loss in force"


class ApplicationPendingError(DomainError):
    code = "application_pending"
    default_message = "an application is already awaiting review"


class AlreadyApprovedError(DomainError):
    code = "already_approved"
    default_message = "an application for this loss has already been approved"


class UnknownApplicationError(DomainError):
    code = "unknown_application"
    default_message = "no such application"


class AlreadyDecidedError(DomainError):
    code = "already_decided"
    default_message = "this application is no longer awaiting review"


class ReasonRequiredError(DomainError):
    code = "reason_required"
    default_message = "a rejection must give a reason"


# --- what decide reads besides the stream -------------------------------------------------


@dataclass(frozen=True, slots=True)
class LossView:
    """The citizen's latest loss case as loss.events told us."""

    loss_id: str
    kind: Literal["temporary", "formal"]
    card_no: str | None
    in_force: bool

    @property
    def is_formal_in_force(self) -> bool:
        return self.in_force and self.kind == "formal"


@dataclass(frozen=True, slots=True)
class AutoApprovalRule:
    """The region's rule for approving clean cases without a reviewer."""

    enabled: bool
    max_rejections: int
    bureaus: frozenset[str]
    reviewer_id: str

    def approves(self, earlier_rejections: int, pickup_bureau: str) -> bool:
        return (
            self.enabled
            and earlier_rejections <= self.max_rejections
            and (not self.bureaus or pickup_bureau in self.bureaus)
        )


MANUAL_ONLY = AutoApprovalRule(enabled=False, max_rejections=0, bureaus=frozenset(),
                               reviewer_id="auto-rule")


@dataclass(frozen=True, slots=True)
class DecisionContext(Context):
    """What the decider knows besides the stream: the time, new application ids, the
    citizen's loss case as loss.events told review, and the region's approval rule."""

    loss: LossView | None
    rule: AutoApprovalRule


# --- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitApplication:
    """Personal fields arrive already encrypted (`enc:v1:`): the domain never sees plaintext.
    The application's id is the context's next one."""

    address: str
    phone: str
    photo_ref: str
    pickup_bureau: str
    channel: str


@dataclass(frozen=True, slots=True)
class DecideApplication:
    application_id: str
    reviewer_id: str
    decision: Literal["approve", "reject"]
    reason: str
    # The bureaus the deciding channel serves (`Channel.bureaus`; empty: every bureau).
    bureaus: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WithdrawApplication:
    """The loss `loss_id` was cancelled: its open or rejected application goes with it."""

    loss_id: str
    reason: str


ReviewCommand = SubmitApplication | DecideApplication | WithdrawApplication


# --- state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Application:
    application_id: str
    loss_id: str
    old_card_no: str | None
    pickup_bureau: str


@dataclass(frozen=True, slots=True)
class History:
    """What earlier applications leave behind: their ids and the loss case of each rejection."""

    application_ids: frozenset[str] = frozenset()
    rejected_losses: tuple[str, ...] = ()

    def with_application(self, application_id: str) -> History:
        return History(self.application_ids | {application_id}, self.rejected_losses)

    def with_rejection(self, loss_id: str) -> History:
        return History(self.application_ids, (*self.rejected_losses, loss_id))

    def rejections_for(self, loss_id: str) -> int:
        return self.rejected_losses.count(loss_id)


@dataclass(frozen=True, slots=True)
class NoOpenApplication:
    """Never applied, or the last application was withdrawn."""

    history: History = field(default_factory=History)


@dataclass(frozen=True, slots=True)
class Pending:
    application: Application
    history: History


@dataclass(frozen=True, slots=True)
class Approved:
    application: Application
    history: History


@dataclass(frozen=True, slots=True)
class Rejected:
    application: Application
    history: History


@dataclass(frozen=True, slots=True)
class Erased:
    """The citizen was erased: nothing more is decided for them."""


ReviewState = NoOpenApplication | Pending | Approved | Rejected | Erased
INITIAL: ReviewState = NoOpenApplication()


def is_erased(state: ReviewState) -> bool:
    return isinstance(state, Erased)


class InconsistentStreamError(Exception):
    """A decision on an application that is not the stream's open one: the log was tampered."""


def _history(state: ReviewState) -> History:
    match state:
        case NoOpenApplication(history=history) | Pending(history=history):
            return history
        case Approved(history=history) | Rejected(history=history):
            return history
        case Erased():
            return History()
        case _:
            assert_never(state)


def _open_application(state: ReviewState, application_id: str) -> Application:
    if isinstance(state, Pending) and state.application.application_id == application_id:
        return state.application
    raise InconsistentStreamError(f"{application_id} is not the pending application")


def evolve(state: ReviewState, event: ReviewEvent) -> ReviewState:
    if isinstance(state, Erased):
        return state
    match event:
        case ReissueApplied():
            application = Application(event.application_id, event.loss_id, event.old_card_no,
                                      event.pickup_bureau)
            return Pending(application, _history(state).with_application(event.application_id))
        case ReviewApproved():
            return Approved(_open_application(state, event.application_id), _history(state))
        case ReviewRejected():
            application = _open_application(state, event.application_id)
            return Rejected(application, _history(state).with_rejection(application.loss_id))
        case ApplicationWithdrawn():
            return NoOpenApplication(_history(state))
        case SubjectErased():
            return Erased()
        case _:
            assert_never(event)


# --- decide -------------------------------------------------------------------------------


def decide(
    command: ReviewCommand, state: ReviewState, context: DecisionContext
) -> list[DomainEvent]:
    match command:
        case SubmitApplication():
            return _submit(command, state, context)
        case DecideApplication():
            return _decide(command, state)
        case WithdrawApplication():
            return _withdraw(command, state)
        case _:
            assert_never(command)


def _submit(
    command: SubmitApplication, state: ReviewState, context: DecisionContext
) -> list[DomainEvent]:
    if isinstance(state, Erased):
        raise SubjectErasedError()
    loss = context.loss
    if loss is None or not loss.is_formal_in_force:
        raise NoFormalLossError()
    resubmission_of = _resubmission_of(state, loss)
    application_id = context.new_id()
    applied = ReissueApplied(
        application_id=application_id,
        loss_id=loss.loss_id,
        old_card_no=loss.card_no,
        address=command.address,
        phone=command.phone,
        photo_ref=command.photo_ref,
        pickup_bureau=command.pickup_bureau,
        channel=command.channel,
        resubmission_of=resubmission_of,
    )
    rule = context.rule
    if not rule.approves(_history(state).rejections_for(loss.loss_id), command.pickup_bureau):
        return [applied]
    return [
        applied,
        ReviewApproved(
            application_id=application_id,
            reviewer_id=rule.reviewer_id,
            automatic=True,
            pickup_bureau=command.pickup_bureau,
            old_card_no=loss.card_no,
        ),
    ]


def _resubmission_of(state: ReviewState, loss: LossView) -> str | None:
    """The rejected application that a new one for `loss` resubmits, if any. Refused while
    an application is pending, or once one for the same loss was approved."""
    match state:
        case Pending():
            raise ApplicationPendingError()
        case Approved(application=previous):
            # A card lost again after its reissue is a new loss case, with a new application.
            if previous.loss_id == loss.loss_id:
                raise AlreadyApprovedError()
            return None
        case Rejected(application=previous):
            return previous.application_id if previous.loss_id == loss.loss_id else None
        case NoOpenApplication() | Erased():
            return None
        case _:
            assert_never(state)


def _decide(command: DecideApplication, state: ReviewState) -> list[DomainEvent]:
    if isinstance(state, Erased):
        raise SubjectErasedError()
    # Before anything else about the application, so another bureau learns nothing of it.
    _require_bureau_served(command, state)
    if not isinstance(state, Pending) or state.application.application_id != command.application_id:
        if command.application_id in _history(state).application_ids:
            raise AlreadyDecidedError()
        raise UnknownApplicationError()
    application = state.application
    match command.decision:
        case "approve":
            return [
                ReviewApproved(
                    application_id=application.application_id,
                    reviewer_id=command.reviewer_id,
                    automatic=False,
                    pickup_bureau=application.pickup_bureau,
                    old_card_no=application.old_card_no,
                )
            ]
        case "reject":
            reason = command.reason.strip()
            if not reason:
                raise ReasonRequiredError()
            return [
                ReviewRejected(
                    application_id=application.application_id,
                    reviewer_id=command.reviewer_id,
                    reason=reason,
                )
            ]
        case _:
            assert_never(command.decision)


def _require_bureau_served(command: DecideApplication, state: ReviewState) -> None:
    """A channel bound to other bureaus may not decide the stream's latest application."""
    match state:
        case Pending(application=known) | Approved(application=known) | Rejected(application=known):
            if (known.application_id == command.application_id
                    and not bureau_served(command.bureaus, known.pickup_bureau)):
                raise BureauNotServedError()
        case NoOpenApplication() | Erased():
            pass
        case _:
            assert_never(state)


def _withdraw(command: WithdrawApplication, state: ReviewState) -> list[DomainEvent]:
    match state:
        case Pending(application=application) | Rejected(application=application):
            if application.loss_id == command.loss_id:
                return [ApplicationWithdrawn(application_id=application.application_id,
                                             reason=command.reason)]
            return []
        case NoOpenApplication() | Approved() | Erased():
            return []
        case _:
            assert_never(state)


# --- the loss case, as loss.events tell it ------------------------------------------------


def track_loss(current: LossView | None, event: LossEvent) -> LossView | None:
    """The citizen's loss case after `event`; events about another case leave it as it is."""
    match event:
        case LossReported():
            return LossView(event.loss_id, event.kind, event.card_no, in_force=True)
        case LossCancelled() | LossClosed():
            return _ended(current, event.loss_id)
        case TemporaryLossExpired():
            # A temporary loss made formal keeps its id; its old expiry must not end it.
            if current is not None and current.kind == "temporary":
                return _ended(current, event.loss_id)
            return current
        case SubjectErased():
            return None if current is None else _ended(current, current.loss_id)
        case _:
            assert_never(event)


def _ended(current: LossView | None, loss_id: str) -> LossView | None:
    if current is None or current.loss_id != loss_id:
        return current
    return LossView(current.loss_id, current.kind, current.card_no, in_force=False)


def withdrawal_for(event: LossEvent) -> WithdrawApplication | None:
    """Only a cancellation withdraws an application; expiry and closure do not."""
    if isinstance(event, LossCancelled):
        return WithdrawApplication(loss_id=event.loss_id, reason=WITHDRAWN_LOSS_CANCELLED)
    return None


decode: EventDecoder[ReviewEvent] = decoders.REVIEW

DECIDER: Decider[ReviewCommand, ReviewState, ReviewEvent, DecisionContext] = Decider(
    initial=INITIAL, evolve=evolve, decide=decide, decode=decode, stream_id=stream_id,
    is_erased=is_erased)
