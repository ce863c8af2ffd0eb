"""The loss case of one citizen: a pure decider and its fold. No I/O, no clock, no logging."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, assert_never

from shared.contracts import decoders
from shared.contracts.common import SubjectErased
from shared.contracts.loss import (
    LossCancelled,
    LossClosed,
    LossEvent,
    LossReported,
    TemporaryLossExpired,
)
from shared.decider import Context, Decider
from shared.errors import DomainError, SubjectErasedError
from shared.events import DomainEvent, EventDecoder

# ----------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class NoLoss:
    """No loss in force: the card works."""


@dataclass(frozen=True, slots=True)
class TemporaryLoss:
    loss_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class FormalLoss:
    loss_id: str


@dataclass(frozen=True, slots=True)
class Erased:
    """The citizen was erased (SubjectErased): nothing more is decided for them."""


LossState = NoLoss | TemporaryLoss | FormalLoss | Erased
INITIAL: LossState = NoLoss()


def is_erased(state: LossState) -> bool:
    return isinstance(state, Erased)

ApplicationStatus = Literal["none", "pending", "approved", "rejected", "completed"]
# While an application is in one of these, the loss it rests on may not be lifted.
REISSUE_IN_PROGRESS: frozenset[ApplicationStatus] = frozenset({"pending", "approved"})


def stream_id(citizen_ref: str) -> str:
    return f"loss-{citizen_ref}"


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class Verification:
    """What the citizen's session token proves (checked before the decider runs)."""

    level: Literal["realname", "portrait"]
    portrait_verified_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReportLoss:
    kind: Literal["temporary", "formal"]
    channel: str
    verification: Verification


@dataclass(frozen=True, slots=True)
class CancelLoss:
    """The citizen lifts their loss (解挂)."""


@dataclass(frozen=True, slots=True)
class ExpireTemporaryLoss:
    """Internal: a durable timer of `loss_id` fell due."""

    loss_id: str


@dataclass(frozen=True, slots=True)
class CloseLoss:
    """Internal: issuance replaced the card, so the case is done."""

    new_card_no: str


LossCommand = ReportLoss | CancelLoss | ExpireTemporaryLoss | CloseLoss


@dataclass(frozen=True, slots=True)
class LossPolicy:
    """The region's rules, from settings."""

    temporary_period: timedelta
    portrait_max_age: timedelta
    financial_freeze: bool


@dataclass(frozen=True, slots=True)
class DecisionContext(Context):
    """What the decider knows besides the stream: the time, new ids, the local read tables."""

    card_no: str | None
    application_status: ApplicationStatus
    policy: LossPolicy


# ----------------------------------------------------------------------------- errors


class NoCardError(DomainError):
    code = "no_card"
    default_message = "no card is known for this citizen"


class PortraitRequiredError(DomainError):
    code = "portrait_required"
    default_message = "a formal loss needs a recent portrait verification"


class AlreadyLostError(DomainError):
    code = "already_lost"
    default_message = "a loss of this card is already in force"


class NoActiveLossError(DomainError):
    code = "no_active_loss"
    default_message = "there is no loss in force to cancel"


class ReissueInProgressError(DomainError):
    code = "reissue_in_progress"
    default_message = "a reissue application exists; the loss cannot be cancelled"


# ----------------------------------------------------------------------------- decide


def decide(command: LossCommand, state: LossState, context: DecisionContext) -> list[DomainEvent]:
    match command:
        case ReportLoss():
            return _report(command, state, context)
        case CancelLoss():
            return _cancel(state, context)
        case ExpireTemporaryLoss(loss_id=loss_id):
            return _expire(loss_id, state, context)
        case CloseLoss(new_card_no=new_card_no):
            return _close(new_card_no, state)
        case _:
            assert_never(command)


def _report(command: ReportLoss, state: LossState, context: DecisionContext) -> list[DomainEvent]:
    # Erasure outranks every other refusal: nothing about the citizen is decided any more.
    if isinstance(state, Erased):
        raise SubjectErasedError()
    if context.card_no is None:
        raise NoCardError()
    match state:
        case FormalLoss():
            raise AlreadyLostError()
        case TemporaryLoss() if command.kind == "temporary":
            raise AlreadyLostError()
        case TemporaryLoss(loss_id=loss_id):
            _require_recent_portrait(command.verification, context)
            # Made formal: the same case goes on, and its expiry no longer applies.
            return [_reported(command, loss_id, context, supersedes_temporary=True)]
        case NoLoss():
            if command.kind == "formal":
                _require_recent_portrait(command.verification, context)
            return [_reported(command, context.new_id(), context, supersedes_temporary=False)]
        case _:
            assert_never(state)


def _require_recent_portrait(verification: Verification, context: DecisionContext) -> None:
    verified_at = verification.portrait_verified_at
    if verification.level != "portrait" or verified_at is None:
        raise PortraitRequiredError()
    if context.now - verified_at > context.policy.portrait_max_age:
        raise PortraitRequiredError("the portrait verification is too old; verify again")


def _reported(
    command: ReportLoss, loss_id: str, context: DecisionContext, *, supersedes_temporary: bool
) -> LossReported:
    temporary = command.kind == "temporary"
    return LossReported(
        loss_id=loss_id,
        kind=command.kind,
        card_no=context.card_no,
        expires_at=context.now + context.policy.temporary_period if temporary else None,
        financial_freeze=context.policy.financial_freeze,
        channel=command.channel,
        supersedes_temporary=supersedes_temporary,
    )


def _cancel(state: LossState, context: DecisionContext) -> list[DomainEvent]:
    if isinstance(state, Erased):
        raise SubjectErasedError()
    if context.card_no is None:
        raise NoCardError()
    match state:
        case NoLoss():
            raise NoActiveLossError()
        case TemporaryLoss(loss_id=loss_id) | FormalLoss(loss_id=loss_id):
            if context.application_status in REISSUE_IN_PROGRESS:
                raise ReissueInProgressError()
            return [LossCancelled(loss_id=loss_id, financial_freeze=False)]
        case _:
            assert_never(state)


def _expire(loss_id: str, state: LossState, context: DecisionContext) -> list[DomainEvent]:
    """A timer is void unless its temporary loss is still the one in force and due."""
    match state:
        case TemporaryLoss(loss_id=active, expires_at=expires_at):
            if active == loss_id and expires_at <= context.now:
                return [TemporaryLossExpired(loss_id=loss_id, financial_freeze=False)]
            return []
        case NoLoss() | FormalLoss() | Erased():
            return []
        case _:
            assert_never(state)


def _close(new_card_no: str, state: LossState) -> list[DomainEvent]:
    match state:
        case TemporaryLoss(loss_id=loss_id) | FormalLoss(loss_id=loss_id):
            return [LossClosed(loss_id=loss_id, new_card_no=new_card_no)]
        case NoLoss() | Erased():
            return []
        case _:
            assert_never(state)


# ----------------------------------------------------------------------------- evolve


def evolve(state: LossState, event: LossEvent) -> LossState:
    if isinstance(state, Erased):
        return state
    match event:
        case LossReported(kind="temporary", expires_at=datetime() as expires_at):
            return TemporaryLoss(event.loss_id, expires_at)
        case LossReported():
            # A temporary loss is never written without expires_at; one would last until lifted.
            return FormalLoss(event.loss_id)
        case LossCancelled() | TemporaryLossExpired() | LossClosed():
            return NoLoss()
        case SubjectErased():
            return Erased()
        case _:
            assert_never(event)


decode: EventDecoder[LossEvent] = decoders.LOSS

DECIDER: Decider[LossCommand, LossState, LossEvent, DecisionContext] = Decider(
    initial=INITIAL, evolve=evolve, decide=decide, decode=decode, stream_id=stream_id,
    is_erased=is_erased)
