"""Typed domain events and their passage to and from the stored envelope (with upcasting)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict, TypeAdapter

from shared.envelope import EventEnvelope, PendingEvent


class DomainEvent(BaseModel):
    """Base of every event model: frozen, strict shape, a `type` literal in each subclass."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: ClassVar[int] = 1


class Command(BaseModel):
    """Base of every command payload model."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True, slots=True)
class EventMeta:
    """What the application adds to a decided event: whose, when, and why."""

    citizen_ref: str
    occurred_at: datetime
    correlation_id: str
    causation_id: str


def to_pending(event: DomainEvent, meta: EventMeta, event_id: UUID) -> PendingEvent:
    data = event.model_dump(mode="json")
    event_type = data.pop("type")
    return PendingEvent(
        event_id=event_id,
        type=event_type,
        schema_version=type(event).schema_version,
        citizen_ref=meta.citizen_ref,
        occurred_at=meta.occurred_at,
        correlation_id=meta.correlation_id,
        causation_id=meta.causation_id,
        data=data,
    )


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
E = TypeVar("E")


class EventDecoder(Generic[E]):
    """Turns envelopes into typed events, upcasting old schema versions on read.

    `upcasters[(type, version)]` turns version N's data into version N+1's.
    """

    def __init__(
        self,
        adapter: TypeAdapter[E],
        upcasters: Mapping[tuple[str, int], Upcaster] | None = None,
    ) -> None:
        self.adapter = adapter
        self.upcasters = dict(upcasters or {})

    def upcast(self, event_type: str, schema_version: int, data: dict[str, Any]) -> dict[str, Any]:
        while (event_type, schema_version) in self.upcasters:
            data = self.upcasters[(event_type, schema_version)](data)
            schema_version += 1
        return data

    def __call__(self, envelope: EventEnvelope) -> E:
        data = self.upcast(envelope.type, envelope.schema_version, dict(envelope.data))
        return self.adapter.validate_python({"type": envelope.type, **data})
