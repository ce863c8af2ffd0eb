"""The auth decider: pure rules for sessions, portrait verification and the portrait lockout.

No I/O, no clock: the time and new ids arrive in the context, the similarity score in the
command.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal, assert_never

from shared.contracts import decoders
from shared.contracts.auth import (
    AuthEvent,
    ElectronicCardAuthorized,
    IdentityLocked,
    IdentityVerificationFailed,
    IdentityVerified,
    SessionStarted,
)
from shared.contracts.common import SubjectErased
from shared.decider import Context, Decider
from shared.envelope import EventEnvelope
from shared.errors import DomainError, SubjectErasedError
from shared.events import EventDecoder
from shared.identity import is_valid_id_number, normalise_id_number

# --- errors -------------------------------------------------------------------------------


class InvalidIdNumberError(DomainError):
    code = "invalid_id_number"
    default_message = "the ID number is malformed or fails the GB 11643 checksum"


class CaptchaMismatchError(DomainError):
    code = "captcha_mismatch"
    default_message = "the random code is wrong or unknown"


class CaptchaExpiredError(DomainError):
    code = "captcha_expired"
    default_message = "the random code has expired; ask for a new one"


class CaptchaUsedError(DomainError):
    code = "captcha_used"
    default_message = "the random code was already used; ask for a new one"


class IdentityMismatchError(DomainError):
    # One code whether the citizen is unknown or the name differs: nothing to enumerate.
    code = "identity_mismatch"
    default_message = "the ID number and name do not match the population registry"


class TooManyAttemptsError(DomainError):
    code = "too_many_attempts"
    default_message = "too many failed logins; try again later"


class PortraitLockedError(DomainError):
    code = "portrait_locked"
    default_message = "portrait verification is locked after repeated failures; try again later"


class LivenessTooLowError(DomainError):
    code = "liveness_too_low"
    default_message = "the liveness check did not pass"


class FaceMismatchError(DomainError):
    code = "face_mismatch"
    default_message = "the face does not match the enrolled portrait"


# --- pure checks --------------------------------------------------------------------------


def require_valid_id_number(raw: str) -> str:
    """The normalised ID number, if it passes the GB 11643-1999 checksum."""
    if not is_valid_id_number(raw):
        raise InvalidIdNumberError()
    return normalise_id_number(raw)


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    """How many failed logins a window allows, per ID number and per channel."""

    max_failures_per_citizen: int
    max_failures_per_channel: int
    window: timedelta


@dataclass(frozen=True, slots=True)
class LoginFailures:
    """Failed logins within the window before this attempt: of the presented ID number's
    citizen (0 when it names none) and of the sending channel."""

    citizen: int
    channel: int


def check_login_throttle(failures: LoginFailures, policy: LoginPolicy) -> None:
    """Refuse a login once either count has reached its limit; one code for both, so the
    refusal does not tell which."""
    if (failures.citizen >= policy.max_failures_per_citizen
            or failures.channel >= policy.max_failures_per_channel):
        raise TooManyAttemptsError()


@dataclass(frozen=True, slots=True)
class CaptchaRecord:
    """A captcha as it stood before the current attempt (only the code's digest is kept)."""

    captcha_id: str
    code_digest: str
    expires_at: datetime
    used_at: datetime | None


def check_captcha(captcha: CaptchaRecord | None, presented_digest: str, now: datetime) -> None:
    """Unknown or wrong → mismatch; then single use; then expiry."""
    if captcha is None or not hmac.compare_digest(captcha.code_digest, presented_digest):
        raise CaptchaMismatchError()
    if captcha.used_at is not None:
        raise CaptchaUsedError()
    if captcha.expires_at <= now:
        raise CaptchaExpiredError()


def cosine_similarity(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Cosine of the angle between two embeddings; None when they cannot be compared
    (different lengths, a zero vector, or non-finite values)."""
    if len(a) != len(b) or not a:
        return None
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    if norm == 0.0 or not math.isfinite(norm) or not math.isfinite(dot):
        return None
    return dot / norm


# --- state --------------------------------------------------------------------------------


class AuthStatus(StrEnum):
    ACTIVE = "active"
    ERASED = "erased"


@dataclass(frozen=True, slots=True)
class Recorded:
    """A stored auth event with the time it happened: the failure window is counted on it."""

    event: AuthEvent
    at: datetime


@dataclass(frozen=True, slots=True)
class AuthState:
    status: AuthStatus = AuthStatus.ACTIVE
    # Portrait failures since the last lock (a lock wipes the slate).
    failures: tuple[datetime, ...] = ()
    locked_until: datetime | None = None

    def locked_at(self, now: datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now


INITIAL = AuthState()


def is_erased(state: AuthState) -> bool:
    return state.status is AuthStatus.ERASED


def stream_id(citizen_ref: str) -> str:
    return f"auth-{citizen_ref}"


def evolve(state: AuthState, recorded: Recorded) -> AuthState:
    event = recorded.event
    match event:
        case SessionStarted() | IdentityVerified() | ElectronicCardAuthorized():
            return state
        case IdentityVerificationFailed():
            return replace(state, failures=(*state.failures, recorded.at))
        case IdentityLocked():
            return replace(state, failures=(), locked_until=event.locked_until)
        case SubjectErased():
            return replace(state, status=AuthStatus.ERASED)
        case _:
            assert_never(event)


# --- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BeginSession:
    """The citizen passed the captcha and the registry check (done by the handler); the new
    session's id comes from the context."""

    channel: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class AuthorizeCard:
    session_id: str
    channel: str


@dataclass(frozen=True, slots=True)
class AttemptPortrait:
    """A portrait attempt: the handler compared the embedding; only the score comes here."""

    session_id: str
    liveness_score: float
    similarity: float | None


AuthCommand = BeginSession | AuthorizeCard | AttemptPortrait
FailureReason = Literal["low_liveness", "face_mismatch"]


@dataclass(frozen=True, slots=True)
class PortraitPolicy:
    similarity_threshold: float
    liveness_threshold: float
    max_failures: int
    failure_window: timedelta
    lockout: timedelta


@dataclass(frozen=True, slots=True)
class DecisionContext(Context):
    """What the decider knows besides the stream: the time, new ids, the region's policy."""

    policy: PortraitPolicy


def decide(command: AuthCommand, state: AuthState, context: DecisionContext) -> list[AuthEvent]:
    _require_active(state)
    match command:
        case BeginSession():
            session_id = context.new_id()
            return [
                SessionStarted(session_id=session_id, channel=command.channel,
                               expires_at=command.expires_at),
                IdentityVerified(method="realname", session_id=session_id),
            ]
        case AuthorizeCard():
            return [ElectronicCardAuthorized(session_id=command.session_id,
                                             channel=command.channel)]
        case AttemptPortrait():
            return _attempt_portrait(command, state, context.now, context.policy)
        case _:
            assert_never(command)


def _require_active(state: AuthState) -> None:
    match state.status:
        case AuthStatus.ACTIVE:
            return
        case AuthStatus.ERASED:
            raise SubjectErasedError()
        case _:
            assert_never(state.status)


def _attempt_portrait(
    command: AttemptPortrait, state: AuthState, now: datetime, policy: PortraitPolicy
) -> list[AuthEvent]:
    if state.locked_at(now):
        raise PortraitLockedError()
    reason: FailureReason
    if command.liveness_score < policy.liveness_threshold:
        reason = "low_liveness"
    elif command.similarity is None or command.similarity < policy.similarity_threshold:
        reason = "face_mismatch"
    else:
        return [IdentityVerified(method="portrait", session_id=command.session_id,
                                 similarity=round(command.similarity, 4))]
    since = now - policy.failure_window
    failures = sum(1 for at in state.failures if at > since) + 1
    failed = IdentityVerificationFailed(reason=reason, failures_in_window=failures)
    if failures >= policy.max_failures:
        return [failed, IdentityLocked(locked_until=now + policy.lockout)]
    return [failed]


def refusal_for(events: Sequence[AuthEvent]) -> DomainError | None:
    """The refusal a recorded portrait attempt answers with; a lock outranks its cause."""
    if any(isinstance(e, IdentityLocked) for e in events):
        return PortraitLockedError()
    for event in events:
        if isinstance(event, IdentityVerificationFailed):
            match event.reason:
                case "low_liveness":
                    return LivenessTooLowError()
                case "face_mismatch":
                    return FaceMismatchError()
                case _:
                    assert_never(event.reason)
    return None


# --- the decider --------------------------------------------------------------------------

decode_event: EventDecoder[AuthEvent] = decoders.AUTH


def decode(envelope: EventEnvelope) -> Recorded:
    """A stored event with the time it happened, as `evolve` folds it."""
    return Recorded(event=decode_event(envelope), at=envelope.occurred_at)


DECIDER: Decider[AuthCommand, AuthState, Recorded, DecisionContext] = Decider(
    initial=INITIAL, evolve=evolve, decide=decide, decode=decode, stream_id=stream_id,
    is_erased=is_erased)
