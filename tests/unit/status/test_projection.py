"""Given events, when projected, then the card_status row and the timeline are as DESIGN says."""

from __future__ import annotations

import random
import re
from datetime import timedelta
from typing import get_args

import pytest

from services.status.projection import ERASED, CardStatus, ECardStatus, StatusEvent, project
from services.status.timeline import (
    DESCRIBERS,
    as_seen_after_erasure,
    describe,
    timeline_entry,
)
from shared.contracts import auth, issuance, loss, review
from shared.envelope import EventEnvelope
from tests.unit.status.events import (
    BUREAU,
    NEW_CARD,
    OLD_CARD,
    T0,
    Streams,
    applied,
    erased,
    fold,
    formal_loss,
    interleave,
    temporary_loss,
    whole_journey,
)

ID_NUMBER_LIKE = re.compile(r"\d{17}[\dXx]")


def given_a_card_holder(s: Streams, *, authorised: bool = True) -> list[EventEnvelope]:
    events = [s.emit("issuance.events", issuance.CardIssued(card_no=OLD_CARD))]
    if authorised:
        events.append(s.emit("auth.events", auth.ElectronicCardAuthorized(
            session_id="s1", channel="wechat-oa")))
    return events


def given_an_approved_application(s: Streams) -> list[EventEnvelope]:
    return [
        *given_a_card_holder(s),
        s.emit("loss.events", formal_loss()),
        s.emit("review.events", applied("app-1")),
        s.emit("review.events", review.ReviewApproved(
            application_id="app-1", reviewer_id="r1", pickup_bureau=BUREAU,
            old_card_no=OLD_CARD)),
    ]


# --- every status value ---------------------------------------------------------------------


def test_an_issued_card_is_active_with_its_number_masked_and_no_e_card_until_authorised() -> None:
    s = Streams()
    row = fold(given_a_card_holder(s, authorised=False))
    assert row.status is CardStatus.ACTIVE
    assert row.e_card_status is ECardStatus.UNAVAILABLE
    assert row.card_no_masked == "*****4567"
    assert row.citizen_ref == s.citizen_ref


def test_an_authorised_electronic_card_is_active() -> None:
    row = fold(given_a_card_holder(Streams()))
    assert (row.status, row.e_card_status) == (CardStatus.ACTIVE, ECardStatus.ACTIVE)


def test_a_temporary_loss_shows_temp_lost_with_its_expiry_and_restricts_the_e_card() -> None:
    s = Streams()
    row = fold([*given_a_card_holder(s), s.emit("loss.events", temporary_loss())])
    assert (row.status, row.e_card_status) == (CardStatus.TEMP_LOST, ECardStatus.RESTRICTED)
    assert row.loss_kind == "temporary"
    assert row.loss_expires_at == T0 + timedelta(days=15)


def test_a_formal_loss_shows_lost_and_makes_the_e_card_unavailable() -> None:
    s = Streams()
    row = fold([*given_a_card_holder(s), s.emit("loss.events", formal_loss())])
    assert (row.status, row.e_card_status) == (CardStatus.LOST, ECardStatus.UNAVAILABLE)
    assert row.loss_kind == "formal"
    assert row.loss_expires_at is None


def test_a_pending_application_shows_reissue_applied_with_its_bureau() -> None:
    s = Streams()
    row = fold([*given_a_card_holder(s), s.emit("loss.events", formal_loss()),
                s.emit("review.events", applied("app-1"))])
    assert (row.status, row.e_card_status) == (CardStatus.REISSUE_APPLIED,
                                               ECardStatus.UNAVAILABLE)
    assert (row.application_id, row.application_status) == ("app-1", "pending")
    assert row.pickup_bureau == BUREAU


def test_an_approved_application_still_shows_reissue_applied() -> None:
    row = fold(given_an_approved_application(Streams()))
    assert row.status is CardStatus.REISSUE_APPLIED
    assert row.application_status == "approved"


def test_a_rejected_application_under_a_formal_loss_shows_reissue_rejected() -> None:
    s = Streams()
    row = fold([*given_a_card_holder(s), s.emit("loss.events", formal_loss()),
                s.emit("review.events", applied("app-1")),
                s.emit("review.events", review.ReviewRejected(
                    application_id="app-1", reviewer_id="r1", reason="photo unclear"))])
    assert (row.status, row.e_card_status) == (CardStatus.REISSUE_REJECTED,
                                               ECardStatus.UNAVAILABLE)
    assert row.application_status == "rejected"


def test_production_then_ready_then_collected_walks_the_card_back_to_active() -> None:
    s = Streams()
    events = given_an_approved_application(s)
    started = s.emit("issuance.events", issuance.CardProductionStarted(
        application_id="app-1", pickup_bureau=BUREAU, ready_by=T0 + timedelta(days=7)))
    reissued = s.emit("issuance.events", issuance.CardReissued(
        application_id="app-1", new_card_no=NEW_CARD, old_card_no=OLD_CARD))
    ready = s.emit("issuance.events", issuance.CardReadyForPickup(
        application_id="app-1", pickup_bureau=BUREAU, card_no=NEW_CARD))
    collected = s.emit("issuance.events", issuance.CardCollected(
        application_id="app-1", bureau_id=BUREAU, card_no=NEW_CARD, by_proxy=False,
        collected_by="holder"))

    in_production = fold([*events, started])
    assert (in_production.status, in_production.e_card_status) == (
        CardStatus.IN_PRODUCTION, ECardStatus.UNAVAILABLE)
    assert in_production.card_no_masked == "*****4567"

    after_reissue = fold([*events, started, reissued])
    assert after_reissue.status is CardStatus.IN_PRODUCTION
    assert after_reissue.card_no_masked == "*****3210"

    waiting = fold([*events, started, reissued, ready])
    assert (waiting.status, waiting.pickup_bureau) == (CardStatus.READY_FOR_PICKUP, BUREAU)

    done = fold([*events, started, reissued, ready, collected])
    assert (done.status, done.e_card_status) == (CardStatus.ACTIVE, ECardStatus.ACTIVE)
    assert done.card_no_masked == "*****3210"


def test_a_subject_erased_on_any_topic_cancels_the_record() -> None:
    s = Streams()
    row = fold([*given_an_approved_application(s), s.emit("auth.events", erased())])
    assert (row.status, row.e_card_status) == (CardStatus.CANCELLED, ECardStatus.UNAVAILABLE)


# --- clearing sub-states --------------------------------------------------------------------


def test_an_expired_temporary_loss_restores_card_and_e_card() -> None:
    s = Streams()
    row = fold([*given_a_card_holder(s), s.emit("loss.events", temporary_loss()),
                s.emit("loss.events", loss.TemporaryLossExpired(loss_id="loss-1"))])
    assert (row.status, row.e_card_status) == (CardStatus.ACTIVE, ECardStatus.ACTIVE)
    assert (row.loss_kind, row.loss_expires_at) == (None, None)


def test_a_cancelled_loss_after_a_rejection_and_withdrawal_is_active_again() -> None:
    s = Streams()
    row = fold([*given_a_card_holder(s), s.emit("loss.events", formal_loss()),
                s.emit("review.events", applied("app-1")),
                s.emit("review.events", review.ReviewRejected(
                    application_id="app-1", reviewer_id="r1", reason="blurred")),
                s.emit("review.events", review.ApplicationWithdrawn(
                    application_id="app-1", reason="loss cancelled")),
                s.emit("loss.events", loss.LossCancelled(loss_id="loss-1"))])
    assert (row.status, row.e_card_status) == (CardStatus.ACTIVE, ECardStatus.ACTIVE)
    assert (row.application_id, row.application_status) == (None, None)


def test_a_rejection_whose_loss_was_cancelled_no_longer_shows_reissue_rejected() -> None:
    s = Streams()
    row = fold([*given_a_card_holder(s), s.emit("loss.events", formal_loss()),
                s.emit("review.events", applied("app-1")),
                s.emit("review.events", review.ReviewRejected(
                    application_id="app-1", reviewer_id="r1", reason="blurred")),
                s.emit("loss.events", loss.LossCancelled(loss_id="loss-1"))])
    assert row.status is CardStatus.ACTIVE


def test_a_new_loss_of_the_collected_card_shows_again_after_the_old_case() -> None:
    s = Streams()
    topics = whole_journey(s)
    journey = interleave(topics, [])
    row = fold([*journey, s.emit("loss.events", temporary_loss(NEW_CARD, loss_id="loss-2"))])
    assert (row.status, row.e_card_status) == (CardStatus.TEMP_LOST, ECardStatus.RESTRICTED)


def test_a_collected_card_stays_active_while_the_old_loss_is_not_yet_closed() -> None:
    s = Streams()
    topics = whole_journey(s)
    without_close = {**topics, "loss.events": topics["loss.events"][:-1]}
    row = fold(interleave(without_close, []))
    assert (row.status, row.e_card_status) == (CardStatus.ACTIVE, ECardStatus.ACTIVE)
    assert row.loss_kind is None


# --- convergence ----------------------------------------------------------------------------


def test_the_whole_journey_ends_active_with_the_new_card() -> None:
    s = Streams()
    topics = whole_journey(s)
    everything = sorted((e for events in topics.values() for e in events),
                        key=lambda e: e.occurred_at)
    row = fold(everything)
    assert (row.status, row.e_card_status) == (CardStatus.ACTIVE, ECardStatus.ACTIVE)
    assert row.card_no_masked == "*****3210"
    assert (row.application_id, row.application_status) == ("app-2", "approved")
    assert row.updated_at == everything[-1].occurred_at
    assert row.last_event_id == str(everything[-1].event_id)


def test_two_cross_topic_orders_of_the_same_events_give_the_same_row() -> None:
    topics = whole_journey(Streams())
    topic_by_topic = interleave(topics, [])
    reversed_topics = interleave(dict(reversed(list(topics.items()))), [])
    assert topic_by_topic != reversed_topics
    assert fold(topic_by_topic) == fold(reversed_topics)


@pytest.mark.parametrize("seed", range(20))
def test_any_interleaving_keeping_per_topic_order_converges(seed: int) -> None:
    topics = whole_journey(Streams())
    baseline = fold(interleave(topics, []))
    picks = [t for t, events in topics.items() for _ in events]
    random.Random(seed).shuffle(picks)
    assert fold(interleave(topics, picks)) == baseline


def test_updated_at_follows_the_latest_event_not_the_last_to_arrive() -> None:
    s = Streams()
    early = s.emit("issuance.events", issuance.CardIssued(card_no=OLD_CARD))
    late = s.emit("auth.events", auth.ElectronicCardAuthorized(session_id="s",
                                                               channel="wechat-oa"))
    row = project(project(None, late), early)
    assert (row.updated_at, row.last_event_id) == (late.occurred_at, str(late.event_id))


# --- timeline -------------------------------------------------------------------------------


def test_every_event_type_has_a_description() -> None:
    union = get_args(get_args(StatusEvent)[0])
    described = {m.model_fields["type"].default for m in union}
    topics = whole_journey(Streams())
    seen = {e.type for events in topics.values() for e in events}
    assert seen <= described
    assert len(described) == 19
    assert set(DESCRIBERS) == described


def test_timeline_descriptions_carry_no_id_numbers_and_mask_card_numbers() -> None:
    s = Streams()
    topics = whole_journey(s)
    leaky_reason = review.ReviewRejected(application_id="app-9", reviewer_id="r1",
                                         reason="ID 11010519491231002X does not match; call"
                                                " 13812345678")
    events = [*interleave(topics, []), s.emit("review.events", leaky_reason),
              s.emit("auth.events", auth.IdentityVerificationFailed(
                  reason="face_mismatch", failures_in_window=1)),
              s.emit("auth.events", auth.IdentityLocked(locked_until=T0 + timedelta(days=1))),
              s.emit("auth.events", erased())]
    entries = [timeline_entry(e, "some.events") for e in events]
    for entry in entries:
        assert entry.description
        assert not ID_NUMBER_LIKE.search(entry.description), entry.description
        assert OLD_CARD not in entry.description
        assert NEW_CARD not in entry.description
        assert "13812345678" not in entry.description
        assert "enc:v1:" not in entry.description
    reissued = next(e for e in entries if e.type == "CardReissued")
    assert "*****3210" in reissued.description
    assert "*****4567" in reissued.description


def test_a_reissue_application_is_described_without_its_encrypted_fields() -> None:
    text = describe(applied("app-7"))
    assert "app-7" in text
    assert BUREAU in text
    assert "enc:v1" not in text


def test_an_event_type_added_to_a_contract_later_is_recorded_without_changing_the_status() -> None:
    s = Streams()
    holder = given_a_card_holder(s)
    newer = s.emit("auth.events", auth.SessionStarted(session_id="s9", channel="app",
                                                      expires_at=T0))
    unknown = EventEnvelope.model_validate(newer.to_json_dict() | {"type": "ChannelLinked",
                                                                   "data": {"x": 1}})
    before = fold(holder)
    after = project(before, unknown)
    assert after.sub_states == before.sub_states
    assert after.status is CardStatus.ACTIVE
    assert after.last_event_id == str(unknown.event_id)
    assert timeline_entry(unknown, "auth.events").description == "ChannelLinked recorded"


# --- erasure --------------------------------------------------------------------------------


def test_an_erased_citizens_row_shows_the_card_and_bureau_as_erased() -> None:
    s = Streams()
    row = fold([*given_an_approved_application(s), s.emit("review.events", erased())])
    assert row.status is CardStatus.CANCELLED
    assert (row.card_no_masked, row.pickup_bureau) == (ERASED, ERASED)
    public = row.public()
    assert BUREAU not in str(public)
    assert OLD_CARD[-4:] not in str(public)


@pytest.mark.parametrize("seed", range(10))
def test_an_erasure_on_every_topic_gives_the_same_row_in_any_interleaving(seed: int) -> None:
    s = Streams()
    topics = whole_journey(s)
    for topic in topics:
        topics[topic].append(s.emit(topic, erased()))
    baseline = fold(interleave(topics, []))
    picks = [t for t, events in topics.items() for _ in events]
    random.Random(seed).shuffle(picks)
    assert fold(interleave(topics, picks)) == baseline
    assert baseline.status is CardStatus.CANCELLED


def test_after_an_erasure_lines_of_events_with_personal_data_say_it_was_erased() -> None:
    s = Streams()
    reissue = s.emit("review.events", applied("app-1"))
    collected = s.emit("issuance.events", issuance.CardCollected(
        application_id="app-1", bureau_id=BUREAU, card_no=NEW_CARD, by_proxy=True,
        collected_by="proxy", proxy_id_number="enc:v1:AAAA", proxy_name="enc:v1:BBBB",
        authorisation_ref="letter-1"))
    issued = s.emit("issuance.events", issuance.CardIssued(card_no=OLD_CARD))
    for envelope in (reissue, collected):
        stored = timeline_entry(envelope, "some.events").description
        shown = as_seen_after_erasure(envelope.type, stored)
        assert "erased" in shown
        assert BUREAU not in shown
    stored = timeline_entry(issued, "issuance.events").description
    assert as_seen_after_erasure(issued.type, stored) == stored
