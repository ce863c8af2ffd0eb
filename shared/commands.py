"""Commands from channels: signature check, envelope, routing, idempotent replies.

Every outcome gets a reply on `channel.replies`, queued through the outbox in the same
transaction as the command's events, so a reply never announces an effect that was lost.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

import asyncpg
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.consumer import DeadLetters, Inbound, describe_validation_error, with_retries
from shared.errors import DomainError
from shared.logging import bind_message_context
from shared.outbox import OutboxMessage, enqueue
from shared.sealing import FieldOpener, SealedFieldError
from shared.settings import CardDeskSettings
from shared.topics import REPLIES_TOPIC

log = structlog.get_logger()



class Channel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    channel_id: str
    secret: str
    bureau: bool = False


class ChannelRegistry:
    """Channel secrets from the `CARDDESK_CHANNELS_FILE` JSON file."""

    def __init__(self, channels: Mapping[str, Channel]) -> None:
        self._channels = dict(channels)

    @classmethod
    def from_file(cls, path: Path) -> ChannelRegistry:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls({cid: Channel(channel_id=cid, **spec) for cid, spec in raw.items()})

    def get(self, channel_id: str) -> Channel | None:
        return self._channels.get(channel_id)


def sign(secret: str, value: bytes) -> str:
    return hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()


class CommandEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: UUID
    channel: str
    issued_at: datetime
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
    """Who asked, when, and under which ids: what deciders get instead of a clock."""

    request_id: str
    channel: Channel
    issued_at: datetime
    received_at: datetime

    @property
    def correlation_id(self) -> str:
        return self.request_id

    @property
    def causation_id(self) -> str:
        return self.request_id


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


class CommandIntake:
    """The one pipeline every `<service>.commands` subscriber calls."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        channels: ChannelRegistry,
        routes: Mapping[str, CommandRoute],
        dead_letters: DeadLetters,
        clock: Callable[[], datetime],
        *,
        max_attempts: int = 5,
        opener: FieldOpener | None = None,
    ) -> None:
        self.opener = opener or FieldOpener(
            CardDeskSettings().command_sealing_key.get_secret_value())
        self.pool = pool
        self.schema = schema
        self.channels = channels
        self.routes = dict(routes)
        self.dead_letters = dead_letters
        self.clock = clock
        self.max_attempts = max_attempts

    async def handle(self, msg: Inbound) -> None:
        bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)
        await with_retries(msg, lambda: self._process(msg), self.dead_letters,
                           max_attempts=self.max_attempts)

    async def _process(self, msg: Inbound) -> None:
        request_id = _request_id_of(msg)
        channel = self.channels.get(msg.header("x-channel-id") or "")
        if channel is None:
            return await self._refuse(msg, request_id, "unknown_channel",
                                      "the x-channel-id header names no known channel")
        signature = msg.headers.get("x-signature", b"")  # bytes: it may be anything at all
        if not hmac.compare_digest(signature, sign(channel.secret, msg.value).encode()):
            return await self._refuse(msg, request_id, "bad_signature",
                                      "x-signature does not match the message")
        try:
            command = CommandEnvelope.model_validate_json(msg.value)
        except ValidationError as exc:
            return await self._refuse(msg, request_id, "malformed_command",
                                      describe_validation_error(exc))
        if command.channel != channel.channel_id:
            return await self._refuse(msg, request_id, "channel_mismatch",
                                      "the envelope's channel differs from x-channel-id")
        route = self.routes.get(command.type)
        if route is None:
            return await self._refuse(msg, request_id, "unknown_command_type",
                                      f"unknown command type {command.type!r}")
        try:
            opened = self.opener.open_payload(command.type, command.payload)
        except SealedFieldError as exc:
            return await self._refuse(msg, request_id, exc.code, str(exc))
        try:
            payload = route.payload_model.model_validate(opened)
        except ValidationError as exc:
            return await self._refuse(msg, request_id, "invalid_payload",
                                      describe_validation_error(exc))
        bind_message_context(command_type=command.type, correlation_id=request_id,
                             causation_id=request_id, channel=channel.channel_id)
        context = CommandContext(request_id, channel, command.issued_at, self.clock())
        await self._execute(route, context, payload)
        return None

    async def _execute(self, route: CommandRoute, context: CommandContext, payload: Any) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            stored = await conn.fetchval(
                f"SELECT reply FROM {self.schema}.replies WHERE request_id = $1",
                context.request_id,
            )
            if stored is not None:
                log.info("command.repeated")
                await self._send_reply(conn, Reply.model_validate_json(stored), store=False)
                return
            if route.bureau_only and not context.channel.bureau:
                reply = _rejected(context.request_id, "bureau_only",
                                  "only a bureau channel may send this command")
            else:
                try:
                    async with conn.transaction():  # savepoint: a refusal undoes partial writes
                        outcome = await route.handler(conn, context, payload)
                    if isinstance(outcome, Refusal):
                        reply = _rejected(context.request_id, outcome.code, outcome.message)
                    else:
                        reply = Reply(request_id=context.request_id, status="accepted",
                                      code="accepted", message=route.accepted_message,
                                      data=outcome or {})
                except DomainError as exc:
                    reply = _rejected(context.request_id, exc.code, exc.message)
            log.info("command.replied", status=reply.status, code=reply.code)
            await self._send_reply(conn, reply, store=True)

    async def _send_reply(self, conn: asyncpg.Connection, reply: Reply, *, store: bool) -> None:
        if store:
            await conn.execute(
                f"INSERT INTO {self.schema}.replies (request_id, reply) VALUES ($1, $2)",
                reply.request_id,
                reply.model_dump_json(),
            )
        await enqueue(conn, self.schema, [reply_message(reply)])

    async def _refuse(self, msg: Inbound, request_id: str, code: str, reason: str) -> None:
        """Unauthenticated or unreadable: reply, park the raw message on the DLQ, store nothing."""
        reply = _rejected(request_id, code, reason)
        await self.dead_letters.producer.send_and_wait(
            REPLIES_TOPIC, value=reply.to_bytes(), key=request_id.encode()
        )
        await self.dead_letters.send(msg, code, reason)


def reply_message(reply: Reply) -> OutboxMessage:
    return OutboxMessage(topic=REPLIES_TOPIC, key=reply.request_id.encode(), value=reply.to_bytes())


def _rejected(request_id: str, code: str, message: str) -> Reply:
    return Reply(request_id=request_id, status="rejected", code=code, message=message)


def _request_id_of(msg: Inbound) -> str:
    """The request id of a message that may be unreadable: from the body, else the key."""
    try:
        body = json.loads(msg.value)
        if isinstance(body, dict) and isinstance(body.get("request_id"), str):
            return str(body["request_id"])[:100]
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    return (msg.key or b"").decode("utf-8", "replace")[:100]
