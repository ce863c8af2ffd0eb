"""A citizen's journey as sealed events, and the fold of them, for the status projection's tests."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta

from services.status.projection import CardStatusRow, project
from shared.contracts import auth, issuance, loss, review
from shared.contracts.common import SubjectErased
from shared.envelope import EventEnvelope
from tests.builders import CitizenStreams

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
OLD_CARD = "A01234567"
NEW_CARD = "B76543210"
BUREAU = "bureau-xuhui"


class Streams(CitizenStreams):
    """A citizen's streams for the projection's tests: events a minute apart from `start`."""

    def __init__(self, start: datetime = T0) -> None:
        super().__init__(start=start, step=timedelta(minutes=1))


def fold(envelopes: Iterable[EventEnvelope]) -> CardStatusRow:
    row: CardStatusRow | None = None
    for envelope in envelopes:
        row = project(row, envelope)
    assert row is not None, "no events"
    return row


def whole_journey(s: Streams) -> dict[str, list[EventEnvelope]]:
    """A citizen's full journey, rejected once, per topic in that topic's order."""
    topics: dict[str, list[EventEnvelope]] = {
        "issuance.events": [s.emit("issuance.events", issuance.CardIssued(card_no=OLD_CARD))],
        "auth.events": [
            s.emit("auth.events", auth.SessionStarted(session_id="s1", channel="wechat-oa",
                                                      expires_at=T0 + timedelta(hours=1))),
            s.emit("auth.events", auth.IdentityVerified(method="realname", session_id="s1")),
            s.emit("auth.events", auth.ElectronicCardAuthorized(session_id="s1",
                                                                channel="wechat-oa")),
            s.emit("auth.events", auth.IdentityVerified(method="portrait", session_id="s1",
                                                        similarity=0.93)),
        ],
        "loss.events": [
            s.emit("loss.events", temporary_loss()),
            s.emit("loss.events", formal_loss(supersedes=True)),
        ],
        "review.events": [
            s.emit("review.events", applied("app-1")),
            s.emit("review.events", review.ReviewRejected(application_id="app-1",
                                                          reviewer_id="r1",
                                                          reason="photo unclear")),
            s.emit("review.events", applied("app-2", resubmission_of="app-1")),
            s.emit("review.events", review.ReviewApproved(application_id="app-2",
                                                          reviewer_id="r1",
                                                          pickup_bureau=BUREAU,
                                                          old_card_no=OLD_CARD)),
        ],
    }
    topics["issuance.events"] += [
        s.emit("issuance.events", issuance.CardProductionStarted(
            application_id="app-2", pickup_bureau=BUREAU, ready_by=T0 + timedelta(days=7))),
        s.emit("issuance.events", issuance.CardReissued(
            application_id="app-2", new_card_no=NEW_CARD, old_card_no=OLD_CARD)),
        s.emit("issuance.events", issuance.CardReadyForPickup(
            application_id="app-2", pickup_bureau=BUREAU, card_no=NEW_CARD)),
        s.emit("issuance.events", issuance.CardCollected(
            application_id="app-2", bureau_id=BUREAU, card_no=NEW_CARD, by_proxy=False,
            collected_by="holder")),
    ]
    topics["loss.events"].append(
        s.emit("loss.events", loss.LossClosed(loss_id="loss-1", new_card_no=NEW_CARD)))
    return topics


def temporary_loss(card_no: str | None = OLD_CARD, loss_id: str = "loss-1") -> loss.LossReported:
    return loss.LossReported(loss_id=loss_id, kind="temporary", card_no=card_no,
                             expires_at=T0 + timedelta(days=15), financial_freeze=True,
                             channel="wechat-oa")


def formal_loss(card_no: str | None = OLD_CARD, loss_id: str = "loss-1",
                supersedes: bool = False) -> loss.LossReported:
    return loss.LossReported(loss_id=loss_id, kind="formal", card_no=card_no, expires_at=None,
                             financial_freeze=True, channel="wechat-oa",
                             supersedes_temporary=supersedes)


def applied(application_id: str, resubmission_of: str | None = None) -> review.ReissueApplied:
    return review.ReissueApplied(
        application_id=application_id, loss_id="loss-1", old_card_no=OLD_CARD,
        address="enc:v1:AAAA", phone="enc:v1:BBBB", photo_ref="enc:v1:CCCC",
        pickup_bureau=BUREAU, channel="wechat-oa", resubmission_of=resubmission_of,
    )


def erased() -> SubjectErased:
    return SubjectErased(reason="citizen request")


def interleave(topics: dict[str, list[EventEnvelope]], order: Sequence[str]) -> list[EventEnvelope]:
    """Merge the topics by taking the next event of `order[i]` each step (per-topic order kept);
    a topic named after it ran dry is skipped, leftovers are appended in `order`."""
    queues = {topic: list(events) for topic, events in topics.items()}
    merged: list[EventEnvelope] = []
    for topic in order:
        if queues.get(topic):
            merged.append(queues[topic].pop(0))
    for topic in topics:
        merged.extend(queues[topic])
    return merged
