"""The fault run's verdicts (bench/fault_checks.py): each must catch what it is there for."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.fault_checks import (
    DeadLetter,
    LoggedEvent,
    Sent,
    card_violations,
    dlq_verdict,
    effect_findings,
    mask_ref,
    open_formal_losses,
    status_violations,
    timeline_findings,
    verify_verdict,
)
from bench.faults import Findings

T0 = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)
REF = "a1b2c3d4e5f60718"


def event(type_: str, *, cause: str = "r", version: int = 1, at: float = 0.0,
          stream: str = f"loss-{REF}", event_id: str | None = None, ref: str = REF,
          **data: Any) -> LoggedEvent:
    return LoggedEvent(event_id or f"{type_}-{cause}-{version}", type_, ref, stream, version,
                       cause, T0 + timedelta(seconds=at), data)


def sent(command: str, request_id: str = "r", outcome: str = "accepted") -> Sent:
    return Sent(request_id, command, "loss", REF, outcome, outcome)  # type: ignore[arg-type]


def kinds(findings: list[Any]) -> list[str]:
    return [f.kind for f in findings]


def test_an_accepted_command_with_its_one_effect_is_fine() -> None:
    assert effect_findings([sent("ReportLoss")], [event("LossReported")]) == []
    assert effect_findings([sent("StartSession")],
                           [event("SessionStarted"), event("IdentityVerified")]) == []


def test_an_accepted_command_without_its_effect_is_a_lost_effect() -> None:
    assert kinds(effect_findings([sent("ReportLoss")], [])) == ["lost"]
    # Half of what StartSession records is lost too.
    assert kinds(effect_findings([sent("StartSession")], [event("SessionStarted")])) == ["lost"]


def test_two_effects_of_one_request_are_a_duplicate_but_a_redelivery_is_not() -> None:
    twice = [event("LossReported", event_id="e1"), event("LossReported", event_id="e2")]
    assert kinds(effect_findings([sent("ReportLoss")], twice)) == ["duplicated"]
    redelivered = [event("LossReported", event_id="e1"), event("LossReported", event_id="e1")]
    assert effect_findings([sent("ReportLoss")], redelivered) == []


def test_an_effect_of_a_refused_or_unanswered_request_is_unacknowledged() -> None:
    for outcome in ("rejected", "no_reply"):
        found = effect_findings([sent("ReportLoss", outcome=outcome)], [event("LossReported")])
        assert kinds(found) == ["unacknowledged"]
    # A refused portrait attempt keeps its failure record: that is not an effect.
    refused = effect_findings([sent("VerifyPortrait", outcome="rejected")],
                              [event("IdentityVerificationFailed")])
    assert refused == []


def test_a_decision_has_either_effect() -> None:
    assert effect_findings([sent("DecideReview")], [event("ReviewRejected")]) == []
    both = [event("ReviewApproved"), event("ReviewRejected")]
    assert kinds(effect_findings([sent("DecideReview")], both)) == ["lost"]


def test_findings_name_citizens_only_by_a_masked_reference() -> None:
    [finding] = effect_findings([sent("ReportLoss")], [])
    assert REF not in finding.describe()
    assert mask_ref(REF) in finding.describe()


def reissue(at: float, old: str = "L0001", new: str = "S0002") -> LoggedEvent:
    return event("CardReissued", at=at, stream=f"card-{REF}", old_card_no=old, new_card_no=new,
                 cause="approval")


def test_a_loss_of_the_card_in_hand_before_its_reissue_is_the_normal_journey() -> None:
    events = [event("LossReported", at=0, card_no="L0001", kind="formal"), reissue(at=5),
              event("LossClosed", version=2, at=6, new_card_no="S0002"),
              event("LossReported", version=3, at=9, card_no="S0002", kind="formal")]
    assert card_violations(events) == []


def test_a_loss_recorded_against_a_card_already_invalidated_is_a_violation() -> None:
    # Issue 9's timeline: the loss closed, then a new loss named the invalidated card.
    events = [event("LossReported", at=0, card_no="L0001", kind="formal"), reissue(at=5),
              event("LossClosed", version=2, at=6, new_card_no="S0002"),
              event("LossReported", version=3, at=6.1, card_no="L0001", kind="formal")]
    [violation] = card_violations(events)
    assert "v3" in violation and "…0001" in violation and "L0001" not in violation


def test_the_stream_order_catches_a_violation_even_when_clocks_disagree() -> None:
    events = [reissue(at=10), event("LossClosed", version=2, at=1, new_card_no="S0002"),
              event("LossReported", version=3, at=2, card_no="L0001", kind="formal")]
    assert len(card_violations(events)) == 1


def test_a_formal_loss_in_force_must_show_lost_or_a_reissue_status() -> None:
    other = "f" * 16
    events = [event("LossReported", card_no="L1", kind="formal"),
              event("LossReported", ref=other, stream=f"loss-{other}", card_no="L9",
                    kind="formal"),
              event("LossCancelled", ref=other, stream=f"loss-{other}", version=2)]
    assert open_formal_losses(events) == {REF}
    assert status_violations({REF}, {REF: "LOST"}) == []
    assert status_violations({REF}, {REF: "READY_FOR_PICKUP"}) == []
    assert len(status_violations({REF}, {REF: "ACTIVE"})) == 1
    assert len(status_violations({REF}, {})) == 1  # no row at all


def test_the_timeline_must_hold_each_effect_once_and_nothing_the_log_lacks() -> None:
    effect = event("LossReported", event_id="e1")
    good: Mapping[str, list[dict[str, Any]]] = {REF: [{"event_id": "e1"}]}
    assert timeline_findings([effect], good, {"e1"}) == []
    assert len(timeline_findings([effect], {REF: []}, {"e1"})) == 1
    assert len(timeline_findings([effect], {REF: [{"event_id": "e1"}] * 2}, {"e1"})) == 1
    phantom = {REF: [{"event_id": "e1"}, {"event_id": "ghost"}]}
    assert len(timeline_findings([effect], phantom, {"e1"})) == 1


def test_verify_failures_at_planted_poison_are_expected_and_must_all_be_there() -> None:
    planted = [("loss.events", 1, 5), ("loss.events", 2, 7)]
    failures = [(("loss.events", 1, 5), "poison"), (("loss.events", 2, 7), "poison")]
    assert verify_verdict(failures, planted, must_flag=planted).clean
    broken = verify_verdict([*failures, (("loss.events", 0, 3), "chain broken")], planted)
    assert broken.unexpected == ["chain broken"] and not broken.clean
    missed = verify_verdict(failures[:1], planted, must_flag=planted)
    assert missed.unflagged_poison == [("loss.events", 2, 7)] and not missed.clean


def test_verify_failures_at_records_older_than_the_run_are_counted_apart_not_blamed_on_it(
) -> None:
    """A reused log keeps other runs' and other tests' hostile records; the run answers for
    what it appended, from the end offsets it saw when it started."""
    failures = [(("issuance.events", 1, 240), "unparseable: not JSON"),
                (("issuance.events", 1, 255), "card-x v1: expected version 6"),
                (("issuance.events", 2, 3), "card-y v2: prev_hash does not link")]
    since = {("issuance.events", 1): 300, ("issuance.events", 2): 0}
    verdict = verify_verdict(failures, [], since=since)
    assert verdict.earlier == 2
    assert verdict.unexpected == ["card-y v2: prev_hash does not link"] and not verdict.clean
    assert verify_verdict(failures[:2], [], since=since).clean
    assert verify_verdict(failures[:2], []).unexpected == [d for _, d in failures[:2]]


def test_a_real_message_in_a_dlq_and_poison_that_never_landed_are_both_findings() -> None:
    poison = {b"poison:1": "loss.commands unsigned", b"poison:2": "loss.events not JSON"}
    letters = [DeadLetter("loss.commands.dlq", b"poison:1", "bad_signature"),
               DeadLetter("loss.events.dlq", b"poison:2", "malformed_json"),
               DeadLetter("loss.events.dlq", b"poison:2", "malformed_json")]
    verdict = dlq_verdict(letters, poison)
    assert verdict.clean
    assert verdict.by_reason[("loss.events.dlq", "malformed_json")] == 2
    real = dlq_verdict([*letters, DeadLetter("loss.commands.dlq", b"session-1",
                                             "processing_failed"),
                        DeadLetter("review.events.dlq", b"ref", "broken_chain",
                                   "review-ab v3: the previous version was never seen")],
                       poison)
    assert real.unexpected == [
        "loss.commands.dlq: processing_failed",
        "review.events.dlq: broken_chain (review-ab v3: the previous version was never seen)"]
    lost = dlq_verdict(letters[1:], poison)
    assert lost.poison_not_dead_lettered and not lost.clean


def test_only_readable_envelopes_are_taken_from_the_log() -> None:
    body = {"event_id": "e", "type": "LossReported", "citizen_ref": REF, "stream_id": "s",
            "causation_id": "r", "version": 1, "occurred_at": T0.isoformat(), "data": {}}
    assert LoggedEvent.parse(body) is not None
    for hostile in ([1], "x", {**body, "version": "1"}, {**body, "version": True},
                    {**body, "occurred_at": "yesterday"}, {**body, "data": []},
                    {k: v for k, v in body.items() if k != "causation_id"}):
        assert LoggedEvent.parse(hostile) is None


def test_a_signed_poison_message_without_a_reply_is_a_miss() -> None:
    found = Findings(completed=1, drained_after_s=1.0, poison_replies=Counter({
        "signed malformed JSON: rejected: malformed_json": 4,
        "signed huge value: no reply": 2}))
    assert found.missed() == ["2 signed poison message(s) got no reply"]
    found.poison_replies["signed huge value: no reply"] = 0
    assert found.missed() == []
