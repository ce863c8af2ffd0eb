"""A citizen's card as pure functions: the state, `evolve`, and `decide` (no I/O, no clock:
the time comes in the `DecisionContext`, new card numbers in the commands that need one).

Raw ID numbers never enter here: the handler hands over a `PresentedId` (does the checksum
hold, and whose citizen_ref is it), and the proxy's particulars arrive already encrypted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import assert_never

from shared.channels import bureau_served
from shared.contracts import decoders
from shared.contracts.common import SubjectErased
from shared.contracts.issuance import (
    CardCollected,
    CardIssued,
    CardProductionStarted,
    CardReadyForPickup,
    CardReissued,
    IssuanceEvent,
)
from shared.decider import Context, Decider
from shared.errors import BureauNotServedError, DomainError, SubjectErasedError
from shared.events import EventDecoder


def stream_id(citizen_ref: str) -> str:
    return f"card-{citizen_ref}"


def format_card_no(prefix: str, region_code: str, number: int, digits: int) -> str:
    """A new card number: prefix, region code, then the sequence number zero-padded."""
    return f"{prefix}{region_code}{number:0{digits}d}"


# --- errors (stable reply codes) -----------------------------------------------------------


class InvalidIdNumberError(DomainError):
    code = "invalid_id_number"
    default_message = "the ID number fails the GB 11643-1999 checksum"


class CardExistsError(DomainError):
    code = "card_exists"
    default_message = "this citizen already holds a different card"


class UnknownApplicationError(DomainError):
    code = "unknown_application"
    default_message = "no approved application has this id"


class NotReadyForPickupError(DomainError):
    code = "not_ready_for_pickup"
    default_message = "the card is still in production"


class AlreadyCollectedError(DomainError):
    code = "already_collected"
    default_message = "the card of this application has already been collected"


class WrongBureauError(DomainError):
    code = "wrong_bureau"
    default_message = "the card waits for pickup at another bureau"


class IdMismatchError(DomainError):
    code = "id_mismatch"
    default_message = "the presented ID number is not the card holder's"


class ProxyIsHolderError(DomainError):
    code = "proxy_is_holder"
    default_message = "a proxy must be someone other than the card holder"


class AuthorisationRequiredError(DomainError):
    code = "authorisation_required"
    default_message = "a proxy needs the holder's authorisation letter"


class ProductionInProgressError(DomainError):
    code = "production_in_progress"
    default_message = "another application's card is being produced or awaits pickup"


# --- state ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NoCard:
    """Issuance knows no card of this citizen."""


@dataclass(frozen=True, slots=True)
class Active:
    """The citizen holds `card_no`; `done` are the applications whose cards were collected."""

    card_no: str
    done: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class InProduction:
    application_id: str
    pickup_bureau: str
    ready_by: datetime
    old_card_no: str | None
    done: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Ready:
    """The new card waits at `pickup_bureau`; the old one is already invalid."""

    application_id: str
    pickup_bureau: str
    card_no: str
    done: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class Erased:
    """The citizen's record is closed (SubjectErased)."""


CardState = NoCard | Active | InProduction | Ready | Erased

INITIAL: CardState = NoCard()


def is_erased(state: CardState) -> bool:
    return isinstance(state, Erased)


def _done(state: CardState) -> frozenset[str]:
    match state:
        case NoCard() | Erased():
            return frozenset()
        case Active(done=done) | InProduction(done=done) | Ready(done=done):
            return done
        case _:
            assert_never(state)


def current_card(state: CardState) -> str | None:
    """The card number the citizen holds (or will hold, once collected)."""
    match state:
        case NoCard() | Erased():
            return None
        case Active(card_no=card_no) | Ready(card_no=card_no):
            return card_no
        case InProduction(old_card_no=old):
            return old
        case _:
            assert_never(state)


def evolve(state: CardState, event: IssuanceEvent) -> CardState:
    match event:
        case CardIssued(card_no=card_no):
            return Active(card_no=card_no, done=_done(state))
        case CardProductionStarted():
            return InProduction(
                application_id=event.application_id,
                pickup_bureau=event.pickup_bureau,
                ready_by=event.ready_by,
                old_card_no=current_card(state),
                done=_done(state),
            )
        case CardReissued():
            # The old card is void from here on; the new one is made but not yet at the bureau.
            if isinstance(state, InProduction):
                return replace(state, old_card_no=None)
            return state
        case CardReadyForPickup():
            return Ready(application_id=event.application_id, pickup_bureau=event.pickup_bureau,
                         card_no=event.card_no, done=_done(state))
        case CardCollected():
            return Active(card_no=event.card_no, done=_done(state) | {event.application_id})
        case SubjectErased():
            return Erased()
        case _:
            assert_never(event)


# --- commands (what the handlers decide with) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class PresentedId:
    """An ID number as the domain sees it: whether the checksum holds, and whose it is."""

    valid: bool
    citizen_ref: str | None


@dataclass(frozen=True, slots=True)
class RecordImportedCard:
    card_no: str


@dataclass(frozen=True, slots=True)
class StartProduction:
    application_id: str
    pickup_bureau: str
    # The card the review saw the citizen holding; adopted if issuance never knew it.
    old_card_no: str | None


@dataclass(frozen=True, slots=True)
class FinishProduction:
    application_id: str
    # Drawn from the schema's card number sequence before deciding (the decider makes none).
    new_card_no: str


@dataclass(frozen=True, slots=True)
class ProxyCredentials:
    presented: PresentedId
    authorisation_ref: str
    # enc:v1: ciphertext under the holder's data key
    id_number_enc: str
    name_enc: str


@dataclass(frozen=True, slots=True)
class HandOverCard:
    application_id: str
    bureau_id: str
    holder_ref: str
    presented: PresentedId
    proxy: ProxyCredentials | None = None
    # The bureaus the handing-over channel serves (`Channel.bureaus`; empty: every bureau).
    bureaus: tuple[str, ...] = ()


IssuanceCommand = RecordImportedCard | StartProduction | FinishProduction | HandOverCard


@dataclass(frozen=True, slots=True)
class DecisionContext(Context):
    """What the decider knows besides the stream: the time, and how long a card takes to make
    (the region's setting)."""

    production_time: timedelta


def require_valid(presented: PresentedId) -> str:
    """The citizen_ref of a presented ID number whose checksum holds."""
    if not presented.valid or presented.citizen_ref is None:
        raise InvalidIdNumberError
    return presented.citizen_ref


def decide(
    command: IssuanceCommand, state: CardState, context: DecisionContext
) -> list[IssuanceEvent]:
    if isinstance(state, Erased):
        raise SubjectErasedError
    match command:
        case RecordImportedCard():
            return _import(command, state)
        case StartProduction():
            return _start_production(command, state, context)
        case FinishProduction():
            return _finish_production(command, state)
        case HandOverCard():
            return _hand_over(command, state)
        case _:
            assert_never(command)


def decide_all(
    commands: Sequence[IssuanceCommand], state: CardState, context: DecisionContext
) -> list[IssuanceEvent]:
    """Decide several commands in turn, each against the state the previous ones left."""
    events: list[IssuanceEvent] = []
    for command in commands:
        decided = decide(command, state, context)
        state = DECIDER.fold(decided, state)
        events.extend(decided)
    return events


def _import(command: RecordImportedCard, state: CardState) -> list[IssuanceEvent]:
    held = current_card(state)
    if held == command.card_no:
        return []
    if isinstance(state, NoCard):
        return [CardIssued(card_no=command.card_no, imported=True)]
    raise CardExistsError


def _known_applications(state: CardState) -> frozenset[str]:
    match state:
        case InProduction(application_id=app) | Ready(application_id=app):
            return _done(state) | {app}
        case NoCard() | Active() | Erased():
            return _done(state)
        case _:
            assert_never(state)


def _start_production(
    command: StartProduction, state: CardState, context: DecisionContext
) -> list[IssuanceEvent]:
    if command.application_id in _known_applications(state):
        return []  # the same approval again: production already started
    started = CardProductionStarted(application_id=command.application_id,
                                    pickup_bureau=command.pickup_bureau,
                                    ready_by=context.now + context.production_time)
    match state:
        case NoCard() if command.old_card_no is not None:
            # A legacy card never imported: record it, so the reissue can invalidate it.
            return [CardIssued(card_no=command.old_card_no, imported=True), started]
        case NoCard() | Active():
            return [started]
        case InProduction() | Ready():
            raise ProductionInProgressError
        case Erased():
            raise SubjectErasedError
        case _:
            assert_never(state)


def _finish_production(command: FinishProduction, state: CardState) -> list[IssuanceEvent]:
    match state:
        case InProduction(application_id=app) if app == command.application_id:
            return [
                CardReissued(application_id=app, new_card_no=command.new_card_no,
                             old_card_no=state.old_card_no),
                CardReadyForPickup(application_id=app, pickup_bureau=state.pickup_bureau,
                                   card_no=command.new_card_no),
            ]
        case NoCard() | Active() | InProduction() | Ready() | Erased():
            return []  # a stale timer: this production is finished or was never started
        case _:
            assert_never(state)


def _hand_over(command: HandOverCard, state: CardState) -> list[IssuanceEvent]:
    _require_served(command, state)
    ready = _ready_card(command.application_id, state)
    if command.bureau_id != ready.pickup_bureau:
        raise WrongBureauError
    if command.proxy is not None:
        _require_proxy(command.proxy, command.holder_ref)
    if require_valid(command.presented) != command.holder_ref:
        raise IdMismatchError
    return [_collected(command, ready)]


def _require_served(command: HandOverCard, state: CardState) -> None:
    """A channel acts only at the bureaus it serves, and learns nothing of another's cards."""
    if not bureau_served(command.bureaus, command.bureau_id):
        raise BureauNotServedError
    match state:
        case InProduction(application_id=known) | Ready(application_id=known) if (
                known == command.application_id):
            if not bureau_served(command.bureaus, state.pickup_bureau):
                raise BureauNotServedError
        case NoCard() | Active() | InProduction() | Ready() | Erased():
            pass
        case _:
            assert_never(state)


def _ready_card(application_id: str, state: CardState) -> Ready:
    """The card of `application_id` waiting for pickup, or why there is none to hand over."""
    if application_id in _done(state):
        raise AlreadyCollectedError
    match state:
        case Ready(application_id=ready_app) if ready_app == application_id:
            return state
        case InProduction(application_id=producing) if producing == application_id:
            raise NotReadyForPickupError
        case NoCard() | Active() | InProduction() | Ready() | Erased():
            raise UnknownApplicationError
        case _:
            assert_never(state)


def _require_proxy(proxy: ProxyCredentials, holder_ref: str) -> None:
    """A proxy is someone else, with a valid ID number and the holder's authorisation."""
    if require_valid(proxy.presented) == holder_ref:
        raise ProxyIsHolderError
    if not proxy.authorisation_ref.strip():
        raise AuthorisationRequiredError


def _collected(command: HandOverCard, ready: Ready) -> CardCollected:
    proxy = command.proxy
    return CardCollected(
        application_id=ready.application_id,
        bureau_id=command.bureau_id,
        card_no=ready.card_no,
        by_proxy=proxy is not None,
        collected_by="proxy" if proxy is not None else "holder",
        proxy_id_number=proxy.id_number_enc if proxy else None,
        proxy_name=proxy.name_enc if proxy else None,
        authorisation_ref=proxy.authorisation_ref.strip() if proxy else None,
    )


decode: EventDecoder[IssuanceEvent] = decoders.ISSUANCE

DECIDER: Decider[IssuanceCommand, CardState, IssuanceEvent, DecisionContext] = Decider(
    initial=INITIAL, evolve=evolve, decide=decide, decode=decode, stream_id=stream_id,
    is_erased=is_erased)
