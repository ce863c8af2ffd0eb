"""issuance.commands payloads and issuance.events."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal

from pydantic import Field, TypeAdapter, model_validator

from shared.contracts.common import SubjectErased, type_names
from shared.events import Command, DomainEvent


class ProxyPresenter(Command):
    id_number: str = Field(min_length=1, max_length=32)
    name: str = Field(min_length=1, max_length=100)
    authorisation_ref: str = Field(min_length=1, max_length=200)


class CollectCard(Command):
    application_id: str = Field(min_length=1, max_length=64)
    bureau_id: str = Field(min_length=1, max_length=64)
    presented_id_number: str = Field(min_length=1, max_length=32)
    proxy: ProxyPresenter | None = None


class ImportCard(Command):
    """Initial cards from the legacy card system (used by `cardctl seed`; bureau only)."""

    id_number: str = Field(min_length=1, max_length=32)
    card_no: str = Field(min_length=4, max_length=32)


class CardIssued(DomainEvent):
    type: Literal["CardIssued"] = "CardIssued"
    card_no: str
    imported: bool = True


class CardProductionStarted(DomainEvent):
    type: Literal["CardProductionStarted"] = "CardProductionStarted"
    application_id: str
    pickup_bureau: str
    ready_by: datetime


class CardReissued(DomainEvent):
    type: Literal["CardReissued"] = "CardReissued"
    application_id: str
    new_card_no: str
    old_card_no: str | None


class CardReadyForPickup(DomainEvent):
    type: Literal["CardReadyForPickup"] = "CardReadyForPickup"
    application_id: str
    pickup_bureau: str
    card_no: str


class CardCollected(DomainEvent):
    """v2 adds `collected_by`; v1 events are upcast on read (shared/contracts/upcasters.py)."""

    schema_version: ClassVar[int] = 2

    type: Literal["CardCollected"] = "CardCollected"
    application_id: str
    bureau_id: str
    card_no: str
    by_proxy: bool  # kept for v1 readers; always agrees with collected_by
    collected_by: Literal["holder", "proxy"]
    # enc:v1: ciphertext of the proxy's ID number and name, when a proxy collected
    proxy_id_number: str | None = None
    proxy_name: str | None = None
    authorisation_ref: str | None = None

    @model_validator(mode="after")
    def _who_agrees_with_by_proxy(self) -> CardCollected:
        if (self.collected_by == "proxy") != self.by_proxy:
            raise ValueError("collected_by and by_proxy disagree")
        return self


IssuanceEvent = Annotated[
    CardIssued
    | CardProductionStarted
    | CardReissued
    | CardReadyForPickup
    | CardCollected
    | SubjectErased,
    Field(discriminator="type"),
]
ISSUANCE_EVENTS: TypeAdapter[IssuanceEvent] = TypeAdapter(IssuanceEvent)
EVENT_TYPES = type_names(CardIssued, CardProductionStarted, CardReissued, CardReadyForPickup,
                         CardCollected, SubjectErased)
