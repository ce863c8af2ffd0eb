"""The pure card-status projection: `project(row, event) -> row`.

Cross-topic order is not guaranteed, so each topic folds into its own sub-state and the
visible status is a function of the sub-states alone: any interleaving that keeps per-topic
order ends in the same row.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal, assert_never, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.contracts.auth import (
    ElectronicCardAuthorized,
    IdentityLocked,
    IdentityVerificationFailed,
    IdentityVerified,
    SessionStarted,
)
from shared.contracts.common import SubjectErased
from shared.contracts.issuance import (
    CardCollected,
    CardIssued,
    CardProductionStarted,
    CardReadyForPickup,
    CardReissued,
)
from shared.contracts.loss import LossCancelled, LossClosed, LossReported, TemporaryLossExpired
from shared.contracts.review import (
    ApplicationWithdrawn,
    ReissueApplied,
    ReviewApproved,
    ReviewRejected,
)
from shared.contracts.upcasters import UPCASTERS
from shared.envelope import EventEnvelope
from shared.events import EventDecoder
from shared.masking import mask_card_no

StatusEvent = Annotated[
    SessionStarted
    | IdentityVerified
    | IdentityVerificationFailed
    | IdentityLocked
    | ElectronicCardAuthorized
    | LossReported
    | LossCancelled
    | TemporaryLossExpired
    | LossClosed
    | ReissueApplied
    | ReviewApproved
    | ReviewRejected
    | ApplicationWithdrawn
    | CardIssued
    | CardProductionStarted
    | CardReissued
    | CardReadyForPickup
    | CardCollected
    | SubjectErased,
    Field(discriminator="type"),
]
decode_event: EventDecoder[StatusEvent] = EventDecoder(TypeAdapter(StatusEvent), UPCASTERS)
PROJECTED_TYPES: frozenset[str] = frozenset(
    m.model_fields["type"].default for m in get_args(get_args(StatusEvent)[0])
)


def decode_known(envelope: EventEnvelope) -> StatusEvent | None:
    """The typed event, or None for a type a producer added after this projection was
    written: contracts grow by new types, and those must not stop the projection."""
    return decode_event(envelope) if envelope.type in PROJECTED_TYPES else None


# What the API shows in place of a field of an erased citizen.
ERASED = "[erased]"


class CardStatus(StrEnum):
    ACTIVE = "ACTIVE"
    TEMP_LOST = "TEMP_LOST"
    LOST = "LOST"
    REISSUE_APPLIED = "REISSUE_APPLIED"
    REISSUE_REJECTED = "REISSUE_REJECTED"
    IN_PRODUCTION = "IN_PRODUCTION"
    READY_FOR_PICKUP = "READY_FOR_PICKUP"
    CANCELLED = "CANCELLED"


class ECardStatus(StrEnum):
    ACTIVE = "ACTIVE"
    RESTRICTED = "RESTRICTED"
    UNAVAILABLE = "UNAVAILABLE"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LossState(_Frozen):
    """The loss in force, from loss.events."""

    loss_id: str
    kind: Literal["temporary", "formal"]
    expires_at: datetime | None
    card_ref: str | None


class ApplicationState(_Frozen):
    """The latest reissue application, from review.events."""

    application_id: str
    status: Literal["pending", "approved", "rejected"]
    pickup_bureau: str


class CardState(_Frozen):
    """The card the citizen holds or awaits, from issuance.events."""

    card_ref: str | None = None
    card_no_masked: str | None = None
    stage: Literal["in_production", "ready", "collected"] | None = None
    application_id: str | None = None
    pickup_bureau: str | None = None


class SubStates(_Frozen):
    """One fold per topic; `erased` may come from any of them."""

    loss: LossState | None = None
    application: ApplicationState | None = None
    card: CardState = CardState()
    e_card_authorized: bool = False
    erased: bool = False


class CardStatusRow(_Frozen):
    """A `card_status` row (DESIGN section 6) and the sub-states it is derived from."""

    citizen_ref: str
    card_no_masked: str | None
    status: CardStatus
    e_card_status: ECardStatus
    loss_kind: Literal["temporary", "formal"] | None
    loss_expires_at: datetime | None
    application_id: str | None
    application_status: Literal["pending", "approved", "rejected"] | None
    pickup_bureau: str | None
    updated_at: datetime
    last_event_id: str
    sub_states: SubStates

    def public(self) -> dict[str, object]:
        """The row as the query API shows it: the DESIGN columns only."""
        return self.model_dump(mode="json", exclude={"sub_states"})


def card_ref(card_no: str | None) -> str | None:
    """A stable reference to a card number, to tell cards apart without keeping the number."""
    if card_no is None:
        return None
    return hashlib.sha256(card_no.encode()).hexdigest()[:16]


_LossEvent = LossReported | LossCancelled | TemporaryLossExpired | LossClosed
_ReviewEvent = ReissueApplied | ReviewApproved | ReviewRejected | ApplicationWithdrawn
_IssuanceEvent = (CardIssued | CardProductionStarted | CardReissued | CardReadyForPickup
                 | CardCollected)


def evolve(sub: SubStates, event: StatusEvent) -> SubStates:
    """Fold one event into the sub-state of the topic it belongs to."""
    match event:
        case (SessionStarted() | IdentityVerified() | IdentityVerificationFailed()
              | IdentityLocked()):
            return sub
        case ElectronicCardAuthorized():
            return sub.model_copy(update={"e_card_authorized": True})
        case LossReported() | LossCancelled() | TemporaryLossExpired() | LossClosed():
            return sub.model_copy(update={"loss": _fold_loss(event)})
        case ReissueApplied() | ReviewApproved() | ReviewRejected() | ApplicationWithdrawn():
            application = _fold_application(sub.application, event)
            return sub.model_copy(update={"application": application})
        case (CardIssued() | CardProductionStarted() | CardReissued() | CardReadyForPickup()
              | CardCollected()):
            return sub.model_copy(update={"card": _fold_card(sub.card, event)})
        case SubjectErased():
            return sub.model_copy(update={"erased": True})
        case _:
            assert_never(event)


def _fold_loss(event: _LossEvent) -> LossState | None:
    """loss.events: the loss in force after `event`."""
    match event:
        case LossReported(loss_id=loss_id, kind=kind, expires_at=expires_at, card_no=card_no):
            return LossState(loss_id=loss_id, kind=kind, expires_at=expires_at,
                             card_ref=card_ref(card_no))
        case LossCancelled() | TemporaryLossExpired() | LossClosed():
            return None
        case _:
            assert_never(event)


def _fold_application(latest: ApplicationState | None,
                      event: _ReviewEvent) -> ApplicationState | None:
    """review.events: the latest application after `event`."""
    match event:
        case ReissueApplied(application_id=application_id, pickup_bureau=bureau):
            return ApplicationState(application_id=application_id, status="pending",
                                    pickup_bureau=bureau)
        case ReviewApproved(application_id=application_id, pickup_bureau=bureau):
            return ApplicationState(application_id=application_id, status="approved",
                                    pickup_bureau=bureau)
        case ReviewRejected(application_id=application_id):
            return ApplicationState(application_id=application_id, status="rejected",
                                    pickup_bureau=latest.pickup_bureau if latest else "")
        case ApplicationWithdrawn():
            return None
        case _:
            assert_never(event)


def _another_card(card: CardState, stage: Literal["in_production", "collected"],
                  application_id: str, card_no: str) -> CardState:
    """The card after a new number was assigned (`CardReissued`) or handed over."""
    return card.model_copy(update={"stage": stage, "application_id": application_id,
                                   "card_ref": card_ref(card_no),
                                   "card_no_masked": mask_card_no(card_no)})


def _fold_card(card: CardState, event: _IssuanceEvent) -> CardState:
    """issuance.events: the card held or awaited after `event`."""
    match event:
        case CardIssued(card_no=card_no):
            return CardState(card_ref=card_ref(card_no), card_no_masked=mask_card_no(card_no))
        case CardProductionStarted(application_id=application_id, pickup_bureau=bureau):
            return card.model_copy(update={"stage": "in_production",
                                           "application_id": application_id,
                                           "pickup_bureau": bureau})
        case CardReadyForPickup(application_id=application_id, pickup_bureau=bureau):
            return card.model_copy(update={"stage": "ready", "application_id": application_id,
                                           "pickup_bureau": bureau})
        case CardReissued(application_id=application_id, new_card_no=card_no):
            return _another_card(card, "in_production", application_id, card_no)
        case CardCollected(application_id=application_id, card_no=card_no):
            return _another_card(card, "collected", application_id, card_no)
        case _:
            assert_never(event)


def _current_loss(sub: SubStates) -> LossState | None:
    """The loss in force, unless it concerns a card that has since been replaced."""
    loss, held = sub.loss, sub.card.card_ref
    if loss is None or loss.card_ref is None or held is None or loss.card_ref == held:
        return loss
    return None


def _open_application(sub: SubStates) -> ApplicationState | None:
    """The latest application, unless its card has already been collected."""
    application = sub.application
    if application is None:
        return None
    if sub.card.stage == "collected" and sub.card.application_id == application.application_id:
        return None
    return application


def derive(sub: SubStates) -> tuple[CardStatus, ECardStatus]:
    """The visible status and e-card status, by the precedence of DESIGN section 6."""
    if sub.erased:
        return CardStatus.CANCELLED, ECardStatus.UNAVAILABLE
    match sub.card.stage:
        case "in_production":
            return CardStatus.IN_PRODUCTION, ECardStatus.UNAVAILABLE
        case "ready":
            return CardStatus.READY_FOR_PICKUP, ECardStatus.UNAVAILABLE
        case "collected" | None:
            pass
        case _:
            assert_never(sub.card.stage)
    e_card = (ECardStatus.ACTIVE if sub.e_card_authorized or sub.card.stage == "collected"
              else ECardStatus.UNAVAILABLE)
    application, loss = _open_application(sub), _current_loss(sub)
    if application is not None and application.status in ("pending", "approved"):
        return CardStatus.REISSUE_APPLIED, ECardStatus.UNAVAILABLE
    if application is not None and loss is not None and loss.kind == "formal":
        return CardStatus.REISSUE_REJECTED, ECardStatus.UNAVAILABLE
    if loss is None:
        return CardStatus.ACTIVE, e_card
    match loss.kind:
        case "formal":
            return CardStatus.LOST, ECardStatus.UNAVAILABLE
        case "temporary":
            restricted = ECardStatus.RESTRICTED if e_card is ECardStatus.ACTIVE else e_card
            return CardStatus.TEMP_LOST, restricted
        case _:
            assert_never(loss.kind)


def project(row: CardStatusRow | None, envelope: EventEnvelope) -> CardStatusRow:
    """The row after one event. `updated_at`/`last_event_id` follow the latest event by
    `(occurred_at, event_id)`, so they too are independent of the arrival order."""
    event = decode_known(envelope)
    sub = row.sub_states if row else SubStates()
    if event is not None:
        sub = evolve(sub, event)
    event_id = str(envelope.event_id)
    if row is None or (envelope.occurred_at, event_id) > (row.updated_at, row.last_event_id):
        updated_at, last_event_id = envelope.occurred_at, event_id
    else:
        updated_at, last_event_id = row.updated_at, row.last_event_id
    return status_row(envelope.citizen_ref, sub, updated_at, last_event_id)


def status_row(citizen_ref: str, sub: SubStates, updated_at: datetime,
               last_event_id: str) -> CardStatusRow:
    """The row the sub-states give. A fold that keeps only the sub-states and the latest
    `(occurred_at, event_id)` (the rebuild's) builds the same row as `project` event by event."""
    status, e_card = derive(sub)
    loss, application = _current_loss(sub), sub.application
    pickup_bureau = ((application.pickup_bureau or None) if application
                     else sub.card.pickup_bureau)
    return CardStatusRow(
        citizen_ref=citizen_ref,
        card_no_masked=ERASED if sub.erased else sub.card.card_no_masked,
        status=status,
        e_card_status=e_card,
        loss_kind=loss.kind if loss else None,
        loss_expires_at=loss.expires_at if loss else None,
        application_id=application.application_id if application else None,
        application_status=application.status if application else None,
        pickup_bureau=ERASED if sub.erased else pickup_bureau,
        updated_at=updated_at,
        last_event_id=last_event_id,
        sub_states=sub,
    )
