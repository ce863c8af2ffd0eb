"""The pure timeline: one short, masked line per event, as a citizen sees it on inquiry.

No names, ID numbers, addresses or phones; card numbers masked; free text (reasons)
passed through `mask_text`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NamedTuple, assert_never

from pydantic import BaseModel, ConfigDict

from services.status.projection import StatusEvent, decode_known
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


def describe(event: StatusEvent) -> str:
    match event:
        case SessionStarted(channel=channel):
            return f"Signed in through {channel}"
        case IdentityVerified(method="realname"):
            return "Real-name identity verified"
        case IdentityVerified(method="portrait"):
            return "Portrait verification passed"
        case IdentityVerified():
            return "Identity verified"
        case IdentityVerificationFailed(reason=reason, failures_in_window=failures):
            return f"Portrait verification failed ({reason.replace('_', ' ')}), attempt {failures}"
        case IdentityLocked(locked_until=until):
            return f"Portrait verification locked until {until.isoformat()}"
        case ElectronicCardAuthorized():
            return "Electronic social security card authorised"
        case LossReported(kind=kind, card_no=card_no, expires_at=expires_at,
                          financial_freeze=freeze):
            text = f"{kind.capitalize()} loss reported for {_card(card_no)}"
            if expires_at is not None:
                text += f", expires {_day(expires_at)}"
            return text + ("; financial functions frozen" if freeze else "")
        case LossCancelled():
            return "Loss report cancelled; card active again"
        case TemporaryLossExpired():
            return "Temporary loss expired; card active again"
        case LossClosed(new_card_no=new_card_no):
            return f"Loss case closed: replaced by {_card(new_card_no)}"
        case ReissueApplied(application_id=application_id, pickup_bureau=bureau):
            return f"Reissue application {application_id} submitted, pickup at bureau {bureau}"
        case ReviewApproved(application_id=application_id, automatic=automatic):
            how = " automatically" if automatic else ""
            return f"Reissue application {application_id} approved{how}"
        case ReviewRejected(application_id=application_id, reason=reason):
            text = f"Reissue application {application_id} rejected"
            return f"{text}: {mask_text(reason)}" if reason else text
        case ApplicationWithdrawn(application_id=application_id):
            return f"Reissue application {application_id} withdrawn"
        case CardIssued(card_no=card_no):
            return f"{_card(card_no).capitalize()} issued"
        case CardProductionStarted(ready_by=ready_by):
            return f"New card in production, expected by {_day(ready_by)}"
        case CardReissued(new_card_no=new_card_no, old_card_no=old_card_no):
            text = f"New {_card(new_card_no)} assigned"
            return f"{text}; {_card(old_card_no)} invalidated" if old_card_no else text
        case CardReadyForPickup(card_no=card_no, pickup_bureau=bureau):
            return f"{_card(card_no).capitalize()} ready for pickup at bureau {bureau}"
        case CardCollected(card_no=card_no, bureau_id=bureau, collected_by=collected_by):
            who = " by an authorised proxy" if collected_by == "proxy" else ""
            return f"{_card(card_no).capitalize()} collected at bureau {bureau}{who}"
        case SubjectErased():
            return "Personal data erased; record closed"
        case _:
            assert_never(event)


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
