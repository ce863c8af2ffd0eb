"""Pieces every contract module uses."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field

from shared.events import DomainEvent


class SubjectErased(DomainEvent):
    """A citizen's data key was destroyed; their encrypted fields can no longer be read."""

    type: Literal["SubjectErased"] = "SubjectErased"
    reason: str = Field(max_length=200)


def type_names(*models: type[DomainEvent]) -> frozenset[str]:
    return frozenset(get_args(m.model_fields["type"].annotation)[0] for m in models)
