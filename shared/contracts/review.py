"""review.commands payloads and review.events."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from shared.contracts.common import SubjectErased, type_names
from shared.events import Command, DomainEvent


class SubmitReissueApplication(Command):
    session_token: str = Field(min_length=1, max_length=4096)
    address: str = Field(min_length=1, max_length=500)
    phone: str = Field(min_length=5, max_length=32)
    photo_ref: str = Field(min_length=1, max_length=500)
    pickup_bureau: str = Field(min_length=1, max_length=64)


class DecideReview(Command):
    application_id: str = Field(min_length=1, max_length=64)
    reviewer_id: str = Field(min_length=1, max_length=64)
    decision: Literal["approve", "reject"]
    reason: str = Field(default="", max_length=500)


class ReissueApplied(DomainEvent):
    type: Literal["ReissueApplied"] = "ReissueApplied"
    application_id: str
    loss_id: str
    old_card_no: str | None
    # enc:v1: ciphertext under the citizen's data key
    address: str
    phone: str
    photo_ref: str
    pickup_bureau: str
    channel: str
    resubmission_of: str | None = None


class ReviewApproved(DomainEvent):
    type: Literal["ReviewApproved"] = "ReviewApproved"
    application_id: str
    reviewer_id: str
    automatic: bool = False
    pickup_bureau: str
    old_card_no: str | None


class ReviewRejected(DomainEvent):
    type: Literal["ReviewRejected"] = "ReviewRejected"
    application_id: str
    reviewer_id: str
    reason: str


class ApplicationWithdrawn(DomainEvent):
    type: Literal["ApplicationWithdrawn"] = "ApplicationWithdrawn"
    application_id: str
    reason: str


ReviewEvent = Annotated[
    ReissueApplied | ReviewApproved | ReviewRejected | ApplicationWithdrawn | SubjectErased,
    Field(discriminator="type"),
]
REVIEW_EVENTS: TypeAdapter[ReviewEvent] = TypeAdapter(ReviewEvent)
EVENT_TYPES = type_names(ReissueApplied, ReviewApproved, ReviewRejected, ApplicationWithdrawn,
                         SubjectErased)
