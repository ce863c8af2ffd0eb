"""The auth decider, given/when/then: sessions, portrait verification, the lockout."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.auth import domain
from services.auth.domain import (
    DECIDER,
    AttemptPortrait,
    AuthCommand,
    AuthorizeCard,
    AuthState,
    BeginSession,
    CaptchaExpiredError,
    CaptchaMismatchError,
    CaptchaRecord,
    CaptchaUsedError,
    DecisionContext,
    FaceMismatchError,
    InvalidIdNumberError,
    LivenessTooLowError,
    PortraitLockedError,
    PortraitPolicy,
    Recorded,
    check_captcha,
    cosine_similarity,
    is_erased,
    refusal_for,
    require_valid_id_number,
)
from shared.contracts.auth import (
    AuthEvent,
    ElectronicCardAuthorized,
    IdentityLocked,
    IdentityVerificationFailed,
    IdentityVerified,
    SessionStarted,
)
from shared.contracts.common import SubjectErased
from shared.erasure import decide_erasure
from shared.errors import DomainError, SubjectErasedError
from shared.identity import check_char
from tests.builders import CitizenStreams
from tests.deciders import Given
from tests.deciders import given as spec

NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
DAY = timedelta(hours=24)
POLICY = PortraitPolicy(
    similarity_threshold=0.85,
    liveness_threshold=0.8,
    max_failures=3,
    failure_window=DAY,
    lockout=DAY,
)
LOCKED_UNTIL = NOW + DAY
CONTEXT = DecisionContext(now=NOW, new_id=lambda: "s1", policy=POLICY)


def at(now: datetime) -> DecisionContext:
    """The usual context, at another time."""
    return replace(CONTEXT, now=now)


def given(*history: tuple[datetime, AuthEvent]
          ) -> Given[AuthCommand, AuthState, Recorded, DecisionContext]:
    """Each past event with the time it was recorded: the failure window counts on it."""
    return spec(DECIDER, *(Recorded(event=e, at=t) for t, e in history), context=CONTEXT)


def matching_face(liveness: float = 0.95) -> AttemptPortrait:
    return AttemptPortrait(session_id="s1", liveness_score=liveness, similarity=0.97)


def other_face() -> AttemptPortrait:
    return AttemptPortrait(session_id="s1", liveness_score=0.95, similarity=0.31)


def mismatch(failures: int) -> IdentityVerificationFailed:
    return IdentityVerificationFailed(reason="face_mismatch", failures_in_window=failures)


def three_failures_ending_now() -> Given[AuthCommand, AuthState, Recorded, DecisionContext]:
    return given(
        (NOW - timedelta(minutes=2), mismatch(1)),
        (NOW - timedelta(minutes=1), mismatch(2)),
        (NOW, mismatch(3)),
        (NOW, IdentityLocked(locked_until=LOCKED_UNTIL)),
    )


# --- sessions ------------------------------------------------------------------------------


def test_a_verified_login_starts_a_session_and_records_realname_verification() -> None:
    expires = NOW + timedelta(minutes=30)
    given().when(BeginSession(channel="wechat-oa", expires_at=expires)).then(
        SessionStarted(session_id="s1", channel="wechat-oa", expires_at=expires),
        IdentityVerified(method="realname", session_id="s1"),
    )


def test_a_session_authorises_the_electronic_card() -> None:
    given().when(AuthorizeCard(session_id="s1", channel="mobile-app")).then(
        ElectronicCardAuthorized(session_id="s1", channel="mobile-app"),
    )


def test_an_erased_citizen_can_do_nothing() -> None:
    erased = given((NOW - DAY, SubjectErased(reason="request")))
    erased.when(BeginSession(channel="x", expires_at=NOW)).then_refused(SubjectErasedError)
    erased.when(AuthorizeCard(session_id="s1", channel="x")).then_refused(SubjectErasedError)
    erased.when(matching_face()).then_refused(SubjectErasedError)


# --- portrait ------------------------------------------------------------------------------


def test_a_live_matching_face_verifies_the_portrait_with_its_similarity() -> None:
    given().when(matching_face()).then(
        IdentityVerified(method="portrait", session_id="s1", similarity=0.97),
    )


def test_a_face_below_the_similarity_threshold_is_a_recorded_mismatch() -> None:
    given().when(other_face()).then(mismatch(1))


def test_an_embedding_that_cannot_be_compared_is_a_mismatch() -> None:
    given().when(AttemptPortrait(session_id="s1", liveness_score=0.95, similarity=None)).then(
        mismatch(1))


def test_low_liveness_fails_even_with_the_right_face() -> None:
    given().when(matching_face(liveness=0.5)).then(
        IdentityVerificationFailed(reason="low_liveness", failures_in_window=1),
    )


def test_thresholds_are_inclusive() -> None:
    given().when(AttemptPortrait(session_id="s1", liveness_score=0.8, similarity=0.85)).then(
        IdentityVerified(method="portrait", session_id="s1", similarity=0.85),
    )


def test_the_third_failure_within_the_window_locks_portrait_verification() -> None:
    given(
        (NOW - timedelta(hours=5), mismatch(1)),
        (NOW - timedelta(hours=1), IdentityVerificationFailed(reason="low_liveness",
                                                              failures_in_window=2)),
    ).when(other_face()).then(
        mismatch(3),
        IdentityLocked(locked_until=LOCKED_UNTIL),
    )


def test_a_fourth_attempt_is_refused_even_with_the_right_face() -> None:
    three_failures_ending_now().when(
        matching_face(), at(NOW + timedelta(minutes=5))).then_refused(PortraitLockedError)


def test_the_lock_holds_until_its_last_instant() -> None:
    three_failures_ending_now().when(
        matching_face(), at(LOCKED_UNTIL - timedelta(seconds=1))).then_refused(PortraitLockedError)


def test_the_lock_expires_after_the_lockout_and_the_right_face_passes() -> None:
    three_failures_ending_now().when(matching_face(), at(LOCKED_UNTIL)).then(
        IdentityVerified(method="portrait", session_id="s1", similarity=0.97),
    )


def test_after_a_lock_expires_failures_are_counted_afresh() -> None:
    three_failures_ending_now().when(
        other_face(), at(LOCKED_UNTIL + timedelta(minutes=1))).then(mismatch(1))


def test_failures_older_than_the_window_do_not_count() -> None:
    given(
        (NOW - DAY - timedelta(minutes=1), mismatch(1)),
        (NOW - DAY, mismatch(2)),
    ).when(other_face()).then(mismatch(1))


def test_a_success_between_failures_does_not_reset_the_window() -> None:
    given(
        (NOW - timedelta(hours=3), mismatch(1)),
        (NOW - timedelta(hours=2), IdentityVerified(method="portrait", session_id="s0",
                                                    similarity=0.9)),
        (NOW - timedelta(hours=1), mismatch(2)),
    ).when(other_face()).then(mismatch(3), IdentityLocked(locked_until=LOCKED_UNTIL))


# --- the reply a portrait attempt gets -------------------------------------------------------


def test_a_lock_is_answered_as_portrait_locked_rather_than_its_cause() -> None:
    refusal = refusal_for([mismatch(3), IdentityLocked(locked_until=LOCKED_UNTIL)])
    assert isinstance(refusal, PortraitLockedError)
    assert refusal.code == "portrait_locked"


def test_each_failure_reason_has_its_own_code() -> None:
    low = refusal_for([IdentityVerificationFailed(reason="low_liveness", failures_in_window=1)])
    assert isinstance(low, LivenessTooLowError)
    assert low.code == "liveness_too_low"
    face = refusal_for([mismatch(1)])
    assert isinstance(face, FaceMismatchError)
    assert face.code == "face_mismatch"


def test_a_verified_portrait_is_not_refused() -> None:
    assert refusal_for([IdentityVerified(method="portrait", session_id="s1", similarity=1.0)]) \
        is None


# --- pure checks -----------------------------------------------------------------------------


def valid_id_number(first17: str = "11010519491231002") -> str:
    return first17 + check_char(first17)


def test_an_id_number_with_a_lower_case_x_is_normalised() -> None:
    first17 = next(f"1101051949123100{d}" for d in range(10)
                   if check_char(f"1101051949123100{d}") == "X")
    assert require_valid_id_number(f" {first17}x ") == f"{first17}X"


def test_an_id_number_with_a_wrong_check_character_is_refused() -> None:
    good = valid_id_number()
    wrong = good[:17] + ("0" if good[17] != "0" else "1")
    assert require_valid_id_number(good) == good
    with pytest.raises(InvalidIdNumberError):
        require_valid_id_number(wrong)


def captcha(*, used: bool = False, expires_in: timedelta = timedelta(minutes=5)) -> CaptchaRecord:
    return CaptchaRecord(captcha_id="c1", code_digest="d-right", expires_at=NOW + expires_in,
                         used_at=NOW - timedelta(seconds=1) if used else None)


def test_a_fresh_captcha_with_the_right_code_passes() -> None:
    check_captcha(captcha(), "d-right", NOW)


@pytest.mark.parametrize(
    ("record", "digest", "error"),
    [
        (None, "d-right", CaptchaMismatchError),
        (captcha(), "d-wrong", CaptchaMismatchError),
        (captcha(used=True), "d-right", CaptchaUsedError),
        (captcha(expires_in=timedelta(0)), "d-right", CaptchaExpiredError),
    ],
    ids=["unknown", "wrong-code", "already-used", "expired"],
)
def test_a_captcha_is_refused_when_unknown_wrong_used_or_expired(
    record: CaptchaRecord | None, digest: str, error: type[DomainError]
) -> None:
    with pytest.raises(error):
        check_captcha(record, digest, NOW)


def test_cosine_similarity_compares_directions_not_lengths() -> None:
    assert cosine_similarity([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert cosine_similarity([1.0, 0.0], [0.0, 1.0]) == pytest.approx(0.0)
    assert cosine_similarity([1.0, 0.0], [-1.0, 0.0]) == pytest.approx(-1.0)


def test_embeddings_of_different_lengths_or_zero_vectors_cannot_be_compared() -> None:
    assert cosine_similarity([1.0, 0.0], [1.0, 0.0, 0.0]) is None
    assert cosine_similarity([0.0, 0.0], [1.0, 0.0]) is None


# --- the stored stream --------------------------------------------------------------------


def test_a_stored_event_is_folded_with_the_time_it_was_recorded() -> None:
    envelope = CitizenStreams("ref-1").append(DECIDER.stream_id("ref-1"), mismatch(1))
    assert envelope.stream_id == "auth-ref-1"
    assert DECIDER.decode(envelope) == Recorded(event=mismatch(1), at=envelope.occurred_at)
    assert DECIDER.fold([DECIDER.decode(envelope)]).failures == (envelope.occurred_at,)


# --- erasure (shared.erasure decides with this service's fold) -----------------------------


def test_erasing_records_subject_erased_once_and_a_second_erasure_records_nothing() -> None:
    first = given((NOW - DAY, SessionStarted(session_id="s1", channel="x", expires_at=NOW)))
    assert not is_erased(first.state)
    assert decide_erasure(is_erased(first.state), "request") == [SubjectErased(reason="request")]
    erased = given((NOW - DAY, SubjectErased(reason="request")))
    assert is_erased(erased.state)
    assert decide_erasure(is_erased(erased.state), "request") == []


# --- login throttling ---------------------------------------------------------------------

LOGIN_POLICY = domain.LoginPolicy(max_failures_per_citizen=3, max_failures_per_channel=10,
                                  window=timedelta(minutes=15))


def test_a_login_below_both_limits_may_proceed() -> None:
    domain.check_login_throttle(domain.LoginFailures(citizen=2, channel=9), LOGIN_POLICY)


@pytest.mark.parametrize("failures", [domain.LoginFailures(citizen=3, channel=0),
                                      domain.LoginFailures(citizen=0, channel=10),
                                      domain.LoginFailures(citizen=7, channel=70)])
def test_a_login_at_either_limit_is_refused_as_too_many_attempts(
    failures: domain.LoginFailures,
) -> None:
    with pytest.raises(domain.TooManyAttemptsError) as refused:
        domain.check_login_throttle(failures, LOGIN_POLICY)
    assert refused.value.code == "too_many_attempts"


def test_a_full_width_id_number_is_invalid_even_though_its_checksum_holds() -> None:
    valid = "11010519491231002X"
    full_width = valid[:17].translate(str.maketrans("0123456789", "０１２３４５６７８９")) + "X"
    with pytest.raises(InvalidIdNumberError):
        require_valid_id_number(full_width)
    assert require_valid_id_number(valid.lower()) == valid
