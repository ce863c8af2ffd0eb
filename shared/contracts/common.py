"""Pieces every contract module uses."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from shared.events import Command, DomainEvent

# A citizen_ref: hex SHA-256 (HMAC) of the normalised ID number.
CITIZEN_REF_PATTERN = r"^[0-9a-f]{64}$"


class EraseSubject(Command):
    """Erase a citizen by crypto-shredding (bureau channels only). Every service that holds
    data of the citizen takes it on its own `<service>.commands` topic."""

    citizen_ref: str = Field(pattern=CITIZEN_REF_PATTERN)
    reason: str = Field(min_length=1, max_length=200)


class SubjectErased(DomainEvent):
    """A citizen's data key was destroyed; their encrypted fields can no longer be read."""

    type: Literal["SubjectErased"] = "SubjectErased"
    reason: str = Field(max_length=200)


def type_names(*models: type[DomainEvent]) -> frozenset[str]:
    return frozenset(get_args(m.model_fields["type"].annotation)[0] for m in models)
