"""What the intake reads and writes: the command envelope, replies, a handler's context and
its route."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg
from pydantic import AwareDatetime, BaseModel, ConfigDict

from shared.channels import Channel
from shared.decider import new_uuid
from shared.outbox import OutboxMessage
from shared.topics import reply_topic


class CommandEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: UUID
    channel: str
    issued_at: AwareDatetime
    type: str
    payload: dict[str, Any]


class Reply(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    status: Literal["accepted", "rejected"]
    code: str
    message: str
    data: dict[str, Any] = {}

    def to_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Who asked, when, and under which ids: what deciders get instead of a clock and
    `uuid7()`."""

    request_id: str
    channel: Channel
    issued_at: datetime
    received_at: datetime
    ids: Callable[[], str] = field(default=new_uuid, repr=False, compare=False)

    @property
    def correlation_id(self) -> str:
        return self.request_id

    @property
    def causation_id(self) -> str:
        return self.request_id

    def new_id(self) -> str:
        """A fresh id for whatever the command creates (an application, a captcha)."""
        return self.ids()


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal whose events are still recorded (a failed portrait attempt counts towards a
    lockout). Raising a DomainError instead undoes everything the handler wrote."""

    code: str
    message: str


# A command handler runs inside the intake's transaction and returns the reply data.
CommandHandler = Callable[
    [asyncpg.Connection, CommandContext, Any], Awaitable[dict[str, Any] | Refusal | None]
]


@dataclass(frozen=True, slots=True)
class CommandRoute:
    payload_model: type[BaseModel]
    handler: CommandHandler
    bureau_only: bool = False
    accepted_message: str = "accepted"
    # Whose stream the command decides on, when that can be told before it runs (None when
    # not: the handler then refuses it or reads for itself); see `shared.intake.prepare`.
    citizen: Callable[[CommandContext, Any], str | None] | None = None


def rejected(request_id: str, code: str, message: str) -> Reply:
    return Reply(request_id=request_id, status="rejected", code=code, message=message)


def reply_message(channel_id: str, reply: Reply) -> OutboxMessage:
    """A reply on its channel's own topic, keyed by request id."""
    return OutboxMessage(topic=reply_topic(channel_id), key=reply.request_id.encode(),
                         value=reply.to_bytes())
