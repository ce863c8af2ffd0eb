"""Commands from channels: signature check, envelope, routing, idempotent replies.

Every outcome gets a reply on `channel.replies`, queued through the outbox in the same
transaction as the command's events, so a reply never announces an effect that was lost.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import asyncpg
import structlog
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.barrier import FollowerBarrier
from shared.channels import Channel, ChannelRegistry, sign
from shared.consumer import (
    DeadLetters,
    Inbound,
    Rejected,
    describe_validation_error,
    with_retries,
)
from shared.errors import DomainError
from shared.logging import bind_message_context
from shared.outbox import OutboxMessage, notify_channel, outbox_columns, outbox_insert
from shared.sealing import FieldOpener, SealedFieldError
from shared.settings import CardDeskSettings
from shared.topics import REPLIES_TOPIC

log = structlog.get_logger()


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


@dataclass(frozen=True, slots=True)
class CheckedCommand:
    """A command that passed every check, ready to run."""

    msg: Inbound
    type: str
    route: CommandRoute
    context: CommandContext
    payload: Any


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
        barrier: FollowerBarrier | None = None,
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
        self.barrier = barrier

    async def handle(self, msg: Inbound) -> None:
        bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)

        async def process() -> None:
            command = await self._checked(msg)
            if command is not None:
                await self._execute([command])

        await with_retries(msg, process, self.dead_letters, max_attempts=self.max_attempts)

    async def handle_batch(self, messages: Sequence[Inbound]) -> None:
        """One partition's commands, in order, in one transaction: the stored replies read
        in one query, the new replies and every reply's outbox row written in one statement,
        one commit. If the transaction fails as a whole, each command goes through `handle`
        alone (its own transaction, retries, DLQ) instead."""
        commands: list[CheckedCommand] = []
        for msg in messages:
            bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)

            async def check(msg: Inbound = msg) -> None:
                command = await self._checked(msg)
                if command is not None:
                    commands.append(command)

            await with_retries(msg, check, self.dead_letters, max_attempts=self.max_attempts)
        if not commands:
            return
        try:
            await self._execute(commands)
        except Exception as exc:
            log.info("batch.replayed_one_by_one", error=type(exc).__name__, size=len(commands))
            for command in commands:
                await self.handle(command.msg)

    async def _checked(self, msg: Inbound) -> CheckedCommand | None:
        """The command ready to run, or None once it has been refused."""
        try:
            return self._check(msg)
        except Rejected as exc:
            await self._refuse(msg, _request_id_of(msg), exc.code, exc.reason)
            return None

    def _check(self, msg: Inbound) -> CheckedCommand:
        """Who sent it, whether it is intact and well-formed: the command ready to run.
        Raises `Rejected` with the code its refusal carries."""
        channel = self.channels.get(msg.header("x-channel-id") or "")
        if channel is None:
            raise Rejected("unknown_channel", "the x-channel-id header names no known channel")
        signature = msg.headers.get("x-signature", b"")  # bytes: it may be anything at all
        if not hmac.compare_digest(signature, sign(channel.secret, msg.value).encode()):
            raise Rejected("bad_signature", "x-signature does not match the message")
        try:
            command = CommandEnvelope.model_validate_json(msg.value)
        except ValidationError as exc:
            raise Rejected("malformed_command", describe_validation_error(exc)) from exc
        if command.channel != channel.channel_id:
            raise Rejected("channel_mismatch", "the envelope's channel differs from x-channel-id")
        route = self.routes.get(command.type)
        if route is None:
            raise Rejected("unknown_command_type", f"unknown command type {command.type!r}")
        try:
            opened = self.opener.open_payload(command.type, command.payload)
        except SealedFieldError as exc:
            raise Rejected(exc.code, str(exc)) from exc
        try:
            payload = route.payload_model.model_validate(opened)
        except ValidationError as exc:
            raise Rejected("invalid_payload", describe_validation_error(exc)) from exc
        # The request id as the channel spelled it, which its reply must carry back.
        context = CommandContext(_request_id_of(msg), channel, command.issued_at, self.clock())
        return CheckedCommand(msg, command.type, route, context, payload)

    async def _execute(self, commands: Sequence[CheckedCommand]) -> None:
        """Run commands in one transaction; a repeated request id gets its stored reply.

        The first pass takes no savepoints (two round trips per command saved). A command
        refused by a `DomainError` must leave no writes, so such a pass is undone as a whole
        and run again with a savepoint per command; nothing of the first pass was visible."""
        consistent = self.barrier is None or await self.barrier.caught_up()
        try:
            outcomes = await self._run(commands, savepoints=False, consistent=consistent)
        except _UndoAll:
            outcomes = await self._run(commands, savepoints=True, consistent=consistent)
        for command, reply, repeated in outcomes:
            _bind_command(command)
            log.info("command.repeated" if repeated else "command.replied",
                     status=reply.status, code=reply.code)

    async def _run(self, commands: Sequence[CheckedCommand], *, savepoints: bool,
                   consistent: bool) -> list[tuple[CheckedCommand, Reply, bool]]:
        outcomes: list[tuple[CheckedCommand, Reply, bool]] = []
        async with self.pool.acquire() as conn, conn.transaction():
            stored: dict[str, str] = dict(await conn.fetch(
                f"SELECT request_id, reply FROM {self.schema}.replies"
                " WHERE request_id = ANY($1::text[])",
                [c.context.request_id for c in commands]))
            new: list[Reply] = []
            for command in commands:
                request_id = command.context.request_id
                _bind_command(command)
                if request_id in stored:
                    outcomes.append((command, Reply.model_validate_json(stored[request_id]), True))
                    continue
                if not consistent:  # not stored: a repeat of the request is decided afresh
                    outcomes.append((command, _rejected(
                        request_id, "not_yet_consistent",
                        "this service has not yet applied every event it follows; retry"),
                        False))
                    continue
                reply = await self._decide(conn, command, savepoints=savepoints)
                stored[request_id] = reply.model_dump_json()  # a copy later repeats it
                new.append(reply)
                outcomes.append((command, reply, False))
            await conn.execute(
                f"WITH stored AS (INSERT INTO {self.schema}.replies (request_id, reply)"
                "  SELECT * FROM unnest($1::text[], $2::text[])),"
                f" queued AS ({outbox_insert(self.schema, 3)})"
                f" SELECT pg_notify('{notify_channel(self.schema)}', '')",
                [r.request_id for r in new], [stored[r.request_id] for r in new],
                *outbox_columns([reply_message(reply) for _, reply, _ in outcomes]),
            )
        return outcomes

    async def _decide(self, conn: asyncpg.Connection, command: CheckedCommand, *,
                      savepoints: bool) -> Reply:
        context, route = command.context, command.route
        if route.bureau_only and not context.channel.bureau:
            return _rejected(context.request_id, "bureau_only",
                             "only a bureau channel may send this command")
        try:
            if savepoints:
                async with conn.transaction():  # a refusal undoes its partial writes
                    outcome = await route.handler(conn, context, command.payload)
            else:
                outcome = await route.handler(conn, context, command.payload)
        except DomainError as exc:
            if not savepoints:
                raise _UndoAll from exc
            return _rejected(context.request_id, exc.code, exc.message)
        if isinstance(outcome, Refusal):
            return _rejected(context.request_id, outcome.code, outcome.message)
        return Reply(request_id=context.request_id, status="accepted", code="accepted",
                     message=route.accepted_message, data=outcome or {})

    async def _refuse(self, msg: Inbound, request_id: str, code: str, reason: str) -> None:
        """Unauthenticated or unreadable: reply, park the raw message on the DLQ, store nothing."""
        reply = _rejected(request_id, code, reason)
        await self.dead_letters.producer.send_and_wait(
            REPLIES_TOPIC, value=reply.to_bytes(), key=request_id.encode()
        )
        await self.dead_letters.send(msg, code, reason)


class _UndoAll(Exception):  # noqa: N818 - control flow inside `_execute`, never escapes it
    """A pass without savepoints met a refusal: undo the pass, run again with them."""


def _bind_command(command: CheckedCommand) -> None:
    context = command.context
    bind_message_context(topic=command.msg.topic, partition=command.msg.partition,
                         offset=command.msg.offset, command_type=command.type,
                         correlation_id=context.request_id, causation_id=context.request_id,
                         channel=context.channel.channel_id)


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
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        pass  # RecursionError: nested too deeply; the key names the request then
    return (msg.key or b"").decode("utf-8", "replace")[:100]
