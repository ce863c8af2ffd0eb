"""The pure timeline: one short, masked line per event, as a citizen sees it on inquiry.

No names, ID numbers, addresses or phones; card numbers masked; free text (reasons)
passed through `mask_text`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ConfigDict

from services.status.projection import StatusEvent, decode_known
from shared.contracts import auth, issuance, loss, review
from shared.contracts.common import SubjectErased
from shared.envelope import EventEnvelope
from shared.masking import mask_card_no, mask_text


class TimelineEntry(BaseModel):
    """A `card_timeline` row."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    citizen_ref: str
    event_id: str
    type: str
    occurred_at: datetime
    description: str
    topic: str
    stream_id: str
    version: int


def _day(moment: datetime) -> str:
    return moment.date().isoformat()


def _card(card_no: str | None) -> str:
    return f"card {mask_card_no(card_no)}" if card_no else "the card"


def _identity_verified(event: auth.IdentityVerified) -> str:
    if event.method == "realname":
        return "Real-name identity verified"
    return "Portrait verification passed"


def _loss_reported(event: loss.LossReported) -> str:
    text = f"{event.kind.capitalize()} loss reported for {_card(event.card_no)}"
    if event.expires_at is not None:
        text += f", expires {_day(event.expires_at)}"
    return text + ("; financial functions frozen" if event.financial_freeze else "")


def _review_rejected(event: review.ReviewRejected) -> str:
    text = f"Reissue application {event.application_id} rejected"
    return f"{text}: {mask_text(event.reason)}" if event.reason else text


def _card_reissued(event: issuance.CardReissued) -> str:
    text = f"New {_card(event.new_card_no)} assigned"
    return f"{text}; {_card(event.old_card_no)} invalidated" if event.old_card_no else text


def _card_collected(event: issuance.CardCollected) -> str:
    who = " by an authorised proxy" if event.collected_by == "proxy" else ""
    return f"{_card(event.card_no).capitalize()} collected at bureau {event.bureau_id}{who}"


_E = TypeVar("_E", bound=BaseModel)
Describer = Callable[[Any], str]


def _line(kind: type[_E], describer: Callable[[_E], str]) -> tuple[str, Describer]:
    """A row of `DESCRIBERS`, typed: `describer` takes the event `kind` it is filed under."""
    return kind.model_fields["type"].default, describer


# Event type → its line, one row per type of `StatusEvent`.
DESCRIBERS: Mapping[str, Describer] = MappingProxyType(dict([
    # auth.events
    _line(auth.SessionStarted, lambda e: f"Signed in through {e.channel}"),
    _line(auth.IdentityVerified, _identity_verified),
    _line(auth.IdentityVerificationFailed, lambda e: (
        f"Portrait verification failed ({e.reason.replace('_', ' ')}),"
        f" attempt {e.failures_in_window}")),
    _line(auth.IdentityLocked,
          lambda e: f"Portrait verification locked until {e.locked_until.isoformat()}"),
    _line(auth.ElectronicCardAuthorized, lambda _: "Electronic social security card authorised"),
    # loss.events
    _line(loss.LossReported, _loss_reported),
    _line(loss.LossCancelled, lambda _: "Loss report cancelled; card active again"),
    _line(loss.TemporaryLossExpired, lambda _: "Temporary loss expired; card active again"),
    _line(loss.LossClosed, lambda e: f"Loss case closed: replaced by {_card(e.new_card_no)}"),
    # review.events
    _line(review.ReissueApplied, lambda e: (
        f"Reissue application {e.application_id} submitted,"
        f" pickup at bureau {e.pickup_bureau}")),
    _line(review.ReviewApproved, lambda e: (
        f"Reissue application {e.application_id} approved"
        + (" automatically" if e.automatic else ""))),
    _line(review.ReviewRejected, _review_rejected),
    _line(review.ApplicationWithdrawn,
          lambda e: f"Reissue application {e.application_id} withdrawn"),
    # issuance.events
    _line(issuance.CardIssued, lambda e: f"{_card(e.card_no).capitalize()} issued"),
    _line(issuance.CardProductionStarted,
          lambda e: f"New card in production, expected by {_day(e.ready_by)}"),
    _line(issuance.CardReissued, _card_reissued),
    _line(issuance.CardReadyForPickup, lambda e: (
        f"{_card(e.card_no).capitalize()} ready for pickup at bureau {e.pickup_bureau}")),
    _line(issuance.CardCollected, _card_collected),
    # any topic
    _line(SubjectErased, lambda _: "Personal data erased; record closed"),
]))


def describe(event: StatusEvent) -> str:
    """The citizen's line for one event."""
    return DESCRIBERS[event.type](event)


# After an erasure, the lines of events that carried the citizen's encrypted data (or the
# pickup details, shown as erased in the row) say so instead. Applied when the timeline is
# read, so the stored rows stay a pure function of each event and a rebuild gives the same.
ERASED_DESCRIPTIONS: Mapping[str, str] = MappingProxyType({
    "ReissueApplied": "Reissue application submitted; its personal data was erased",
    "CardReadyForPickup": "New card ready for pickup; the pickup details were erased",
    "CardCollected": "New card collected; the personal data of the collection was erased",
})


def as_seen_after_erasure(event_type: str, stored: str) -> str:
    """The line an erased citizen's timeline shows for an entry."""
    return ERASED_DESCRIPTIONS.get(event_type, stored)


class ListedEntry(NamedTuple):
    """A stored timeline row, as far as the listing shows it."""

    event_id: str
    type: str
    occurred_at: datetime
    description: str


def listed_timeline(entries: Iterable[ListedEntry], *, erased: bool) -> list[dict[str, Any]]:
    """The timeline as the query API shows it and `cardctl audit replay` rebuilds it (one code
    path, so the two agree): entries already in `(occurred_at, stream_id, version)` order,
    numbered from 1, and for an erased citizen the lines of `ERASED_DESCRIPTIONS` replaced."""
    return [
        {"seq": seq, "event_id": e.event_id, "type": e.type,
         "occurred_at": e.occurred_at.astimezone(UTC).isoformat(),
         "description": as_seen_after_erasure(e.type, e.description) if erased
         else e.description}
        for seq, e in enumerate(entries, start=1)
    ]


def description(envelope: EventEnvelope, event: StatusEvent | None) -> str:
    """The line of an event; a type added to a contract later is only named."""
    return describe(event) if event is not None else f"{envelope.type} recorded"


def timeline_entry(envelope: EventEnvelope, topic: str) -> TimelineEntry:
    return TimelineEntry(
        citizen_ref=envelope.citizen_ref,
        event_id=str(envelope.event_id),
        type=envelope.type,
        occurred_at=envelope.occurred_at,
        description=description(envelope, decode_known(envelope)),
        topic=topic,
        stream_id=envelope.stream_id,
        version=envelope.version,
    )
