"""auth.commands payloads and auth.events."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from shared.contracts.common import SubjectErased, type_names
from shared.events import Command, DomainEvent

# --- commands -----------------------------------------------------------------------------


class IssueCaptcha(Command):
    pass


class StartSession(Command):
    id_number: str = Field(min_length=1, max_length=32)
    name: str = Field(min_length=1, max_length=100)
    captcha_id: str = Field(min_length=1, max_length=64)
    captcha_code: str = Field(min_length=1, max_length=16)


class AuthorizeElectronicCard(Command):
    session_token: str = Field(min_length=1, max_length=4096)


class VerifyPortrait(Command):
    session_token: str = Field(min_length=1, max_length=4096)
    liveness_score: float = Field(ge=0.0, le=1.0)
    face_embedding: list[float] = Field(min_length=1, max_length=4096)


# --- events -------------------------------------------------------------------------------


class SessionStarted(DomainEvent):
    type: Literal["SessionStarted"] = "SessionStarted"
    session_id: str
    channel: str
    expires_at: datetime


class IdentityVerified(DomainEvent):
    type: Literal["IdentityVerified"] = "IdentityVerified"
    method: Literal["realname", "portrait"]
    session_id: str
    similarity: float | None = None


class IdentityVerificationFailed(DomainEvent):
    type: Literal["IdentityVerificationFailed"] = "IdentityVerificationFailed"
    method: Literal["portrait"] = "portrait"
    reason: Literal["low_liveness", "face_mismatch"]
    failures_in_window: int


class IdentityLocked(DomainEvent):
    type: Literal["IdentityLocked"] = "IdentityLocked"
    method: Literal["portrait"] = "portrait"
    locked_until: datetime


class ElectronicCardAuthorized(DomainEvent):
    type: Literal["ElectronicCardAuthorized"] = "ElectronicCardAuthorized"
    session_id: str
    channel: str


AuthEvent = Annotated[
    SessionStarted
    | IdentityVerified
    | IdentityVerificationFailed
    | IdentityLocked
    | ElectronicCardAuthorized
    | SubjectErased,
    Field(discriminator="type"),
]
AUTH_EVENTS: TypeAdapter[AuthEvent] = TypeAdapter(AuthEvent)
EVENT_TYPES = type_names(SessionStarted, IdentityVerified, IdentityVerificationFailed,
                         IdentityLocked, ElectronicCardAuthorized, SubjectErased)
