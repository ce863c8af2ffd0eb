"""loss.commands payloads and loss.events."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from shared.contracts.common import SubjectErased, type_names
from shared.events import Command, DomainEvent


class ReportLoss(Command):
    session_token: str = Field(min_length=1, max_length=4096)
    kind: Literal["temporary", "formal"]


class CancelLoss(Command):
    session_token: str = Field(min_length=1, max_length=4096)


class LossReported(DomainEvent):
    type: Literal["LossReported"] = "LossReported"
    loss_id: str
    kind: Literal["temporary", "formal"]
    card_no: str | None
    # Null for a formal loss: it stays until the card is replaced or the loss is cancelled.
    expires_at: datetime | None
    financial_freeze: bool
    channel: str
    # A temporary loss made formal keeps its case: this names the one it replaces.
    supersedes_temporary: bool = False


class LossCancelled(DomainEvent):
    type: Literal["LossCancelled"] = "LossCancelled"
    loss_id: str
    financial_freeze: bool = False


class TemporaryLossExpired(DomainEvent):
    type: Literal["TemporaryLossExpired"] = "TemporaryLossExpired"
    loss_id: str
    financial_freeze: bool = False


class LossClosed(DomainEvent):
    """The lost card was replaced by a new one: the case is done (added type, optional)."""

    type: Literal["LossClosed"] = "LossClosed"
    loss_id: str
    new_card_no: str


LossEvent = Annotated[
    LossReported | LossCancelled | TemporaryLossExpired | LossClosed | SubjectErased,
    Field(discriminator="type"),
]
LOSS_EVENTS: TypeAdapter[LossEvent] = TypeAdapter(LossEvent)
EVENT_TYPES = type_names(LossReported, LossCancelled, TemporaryLossExpired, LossClosed,
                         SubjectErased)
