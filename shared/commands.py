"""Commands from channels: authentication, freshness, envelope, routing, idempotent replies.

A message that fails authentication (unknown channel, bad signature) goes to the DLQ only:
its sender is unknown, and a reply would let anyone squat a channel's request id. Every
authenticated command gets a reply on its channel's own topic `channel.replies.<channel>`,
queued through the outbox in the same transaction as the command's events, so a reply never
announces an effect that was lost. `(channel, request_id)` is the idempotency key; stored
replies are encrypted under a key derived from the channel's secret and the request id, and
purged once a repeat would be refused as stale anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import asyncpg
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from opentelemetry import trace
from opentelemetry.trace import Span
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from shared.barrier import FollowerBarrier
from shared.channels import Channel, ChannelRegistry, sign
from shared.consumer import (
    DeadLetters,
    Inbound,
    MessageLimits,
    Rejected,
    describe_validation_error,
    load_json,
    with_retries,
)
from shared.errors import DomainError
from shared.logging import bind_message_context
from shared.metrics import (
    COMMANDS_RECEIVED,
    COMMANDS_REPEATED,
    COMMANDS_REPLIED,
    command_type_label,
    observe_command_latency,
)
from shared.outbox import OutboxMessage, notify_channel, outbox_columns, outbox_insert
from shared.sealing import FieldOpener, SealContext, SealedFieldError
from shared.settings import CardDeskSettings
from shared.topics import REPLY_TOPIC_PREFIX, reply_topic
from shared.tracing import start_span, trace_id_of

log = structlog.get_logger()


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
    # Its span, in the trace the channel sent in `traceparent` (else a new one): current
    # while its handler runs, so the events it appends carry the trace (shared/tracing.py).
    span: Span | None = None


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
        settings: CardDeskSettings,
        barrier: FollowerBarrier | None = None,
    ) -> None:
        self.opener = FieldOpener.from_settings(settings)
        self.limits = MessageLimits.from_settings(settings)
        self.freshness = timedelta(seconds=settings.command_freshness_seconds)
        self.pool = pool
        self.schema = schema
        self.channels = channels
        self.routes = dict(routes)
        self.dead_letters = dead_letters
        self.clock = clock
        self.max_attempts = settings.consumer_max_attempts
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
            channel = self._authenticate(msg)
        except Rejected as exc:  # unknown sender: the DLQ only, no reply anywhere
            COMMANDS_RECEIVED.labels(self.schema, command_type_label(None, ())).inc()
            await self.dead_letters.send(msg, exc.code, exc.reason)
            return None
        try:
            command = self._check(msg, channel)
        except Rejected as exc:
            command_type = self._type_label(msg)
            COMMANDS_RECEIVED.labels(self.schema, command_type).inc()
            await self._refuse(msg, channel, exc.code, exc.reason)
            COMMANDS_REPLIED.labels(self.schema, command_type, "rejected", exc.code).inc()
            observe_command_latency(self.schema, command_type, msg.timestamp_ms)
            return None
        COMMANDS_RECEIVED.labels(self.schema, command.type).inc()
        return command

    def _type_label(self, msg: Inbound) -> str:
        """The `type` label of a refused command: its type if a route knows it."""
        try:
            body = load_json(msg.value, self.limits)
        except Rejected:
            return command_type_label(None, ())
        command_type = body.get("type") if isinstance(body, dict) else None
        return command_type_label(command_type if isinstance(command_type, str) else None,
                                  self.routes)

    def _authenticate(self, msg: Inbound) -> Channel:
        """The channel that signed the message, or `Rejected` if none did."""
        try:
            channel_id = msg.headers.get("x-channel-id", b"").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("unknown_channel", "the x-channel-id header is not UTF-8") from exc
        channel = self.channels.get(channel_id)
        if channel is None:
            raise Rejected("unknown_channel", "the x-channel-id header names no known channel")
        signature = msg.headers.get("x-signature", b"")  # bytes: it may be anything at all
        if not hmac.compare_digest(signature, sign(channel.secret, msg.value).encode()):
            raise Rejected("bad_signature", "x-signature does not match the message")
        return channel

    def _check(self, msg: Inbound, channel: Channel) -> CheckedCommand:
        """Whether an authenticated message is well-formed, fresh and routable: the command
        ready to run. Raises `Rejected` with the code its refusal carries."""
        body = load_json(msg.value, self.limits)
        try:
            command = CommandEnvelope.model_validate(body)
        except ValidationError as exc:
            raise Rejected("malformed_command", describe_validation_error(exc)) from exc
        if command.channel != channel.channel_id:
            raise Rejected("channel_mismatch", "the envelope's channel differs from x-channel-id")
        received_at = self.clock()
        if abs(received_at - command.issued_at) > self.freshness:
            raise Rejected("stale_command", "issued_at lies outside the accepted window of"
                           f" {int(self.freshness.total_seconds())} s around the receiver's clock")
        route = self.routes.get(command.type)
        if route is None:
            raise Rejected("unknown_command_type", f"unknown command type {command.type[:100]!r}")
        try:
            opened = self.opener.open_payload(
                SealContext(channel.channel_id, command.type, str(command.request_id)),
                command.payload)
        except SealedFieldError as exc:
            raise Rejected(exc.code, str(exc)) from exc
        try:
            payload = route.payload_model.model_validate(opened)
        except ValidationError as exc:
            raise Rejected("invalid_payload", describe_validation_error(exc)) from exc
        # The request id as the channel spelled it, which its reply must carry back.
        request_id = str(body["request_id"])
        context = CommandContext(request_id, channel, command.issued_at, received_at)
        span = start_span(f"{command.type} process", msg.headers, {
            "messaging.system": "kafka", "messaging.destination.name": msg.topic,
            "carddesk.command.type": command.type, "carddesk.channel": channel.channel_id},
            new_trace=True)
        return CheckedCommand(msg, command.type, route, context, payload, span)

    async def _execute(self, commands: Sequence[CheckedCommand]) -> None:
        """Run commands in one transaction; a repeated request id gets its stored reply.

        The first pass takes no savepoints (two round trips per command saved). A command
        refused by a `DomainError` must leave no writes, so such a pass is undone as a whole
        and run again with a savepoint per command; nothing of the first pass was visible."""
        try:
            consistent = self.barrier is None or await self.barrier.caught_up()
            try:
                outcomes = await self._run(commands, savepoints=False, consistent=consistent)
            except _UndoAll:
                outcomes = await self._run(commands, savepoints=True, consistent=consistent)
            for command, reply, repeated in outcomes:
                _bind_command(command)
                if repeated:
                    COMMANDS_REPEATED.labels(self.schema, command.type).inc()
                else:
                    COMMANDS_REPLIED.labels(self.schema, command.type, reply.status,
                                            reply.code).inc()
                    observe_command_latency(self.schema, command.type, command.msg.timestamp_ms)
                if command.span is not None:
                    command.span.set_attribute("carddesk.reply.code", reply.code)
                log.info("command.repeated" if repeated else "command.replied",
                         status=reply.status, code=reply.code)
        finally:
            for command in commands:
                if command.span is not None:
                    command.span.end()

    async def _run(self, commands: Sequence[CheckedCommand], *, savepoints: bool,
                   consistent: bool) -> list[tuple[CheckedCommand, Reply, bool]]:
        outcomes: list[tuple[CheckedCommand, Reply, bool]] = []
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT channel, request_id, reply FROM {self.schema}.stored_replies"
                " WHERE (channel, request_id) IN"
                "  (SELECT * FROM unnest($1::text[], $2::text[]))",
                [c.context.channel.channel_id for c in commands],
                [c.context.request_id for c in commands])
            stored = {(r["channel"], r["request_id"]): r["reply"] for r in rows}
            new: list[tuple[Channel, Reply]] = []
            for command in commands:
                channel, request_id = command.context.channel, command.context.request_id
                _bind_command(command)
                sealed = stored.get((channel.channel_id, request_id))
                if sealed is not None:
                    repeated = open_reply(channel, request_id, bytes(sealed))
                    outcomes.append((command, repeated, True))
                    continue
                if not consistent:  # not stored: a repeat of the request is decided afresh
                    outcomes.append((command, _rejected(
                        request_id, "not_yet_consistent",
                        "this service has not yet applied every event it follows; retry"),
                        False))
                    continue
                with trace.use_span(command.span or trace.INVALID_SPAN, end_on_exit=False,
                                    record_exception=False, set_status_on_exception=False):
                    reply = await self._decide(conn, command, savepoints=savepoints)
                stored[(channel.channel_id, request_id)] = seal_reply(channel, reply)
                new.append((channel, reply))
                outcomes.append((command, reply, False))
            await conn.execute(
                f"WITH stored AS (INSERT INTO {self.schema}.stored_replies"
                "  (channel, request_id, reply)"
                "  SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])),"
                f" queued AS ({outbox_insert(self.schema, 4)})"
                f" SELECT pg_notify('{notify_channel(self.schema)}', '')",
                [c.channel_id for c, _ in new], [r.request_id for _, r in new],
                [stored[(c.channel_id, r.request_id)] for c, r in new],
                *outbox_columns([reply_message(c.context.channel.channel_id, reply)
                                 for c, reply, _ in outcomes]),
            )
        return outcomes

    async def purge_stored_replies(self, batch: int = 5000) -> int:
        """Delete stored replies older than twice the freshness window (a repeat that old is
        refused as stale before its reply is looked up), and the outbox rows of replies sent
        that long ago (they hold captcha codes and session tokens in clear), a bounded batch
        at a time; returns how many stored replies went."""
        purged = 0
        while True:
            deleted: int = await self.pool.fetchval(
                f"WITH gone AS (DELETE FROM {self.schema}.stored_replies WHERE ctid IN"
                f"  (SELECT ctid FROM {self.schema}.stored_replies"
                "   WHERE created_at < now() - $1::interval LIMIT $2) RETURNING 1)"
                " SELECT count(*) FROM gone", 2 * self.freshness, batch)
            purged += deleted
            if deleted < batch:
                break
        while True:
            sent: int = await self.pool.fetchval(
                f"WITH gone AS (DELETE FROM {self.schema}.outbox WHERE position IN"
                f"  (SELECT position FROM {self.schema}.outbox"
                f"   WHERE topic LIKE '{REPLY_TOPIC_PREFIX}%' AND sent_at < now() - $1::interval"
                "   ORDER BY position LIMIT $2) RETURNING 1)"
                " SELECT count(*) FROM gone", 2 * self.freshness, batch)
            if sent < batch:
                break
        if purged:
            log.info("command.replies_purged", count=purged)
        return purged

    async def purge_loop(self) -> None:
        """`purge_stored_replies` every half window (at most every minute), for ever."""
        interval = min(60.0, self.freshness.total_seconds() / 2)
        while True:
            await self.purge_stored_replies()
            await asyncio.sleep(interval)

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

    async def _refuse(self, msg: Inbound, channel: Channel, code: str, reason: str) -> None:
        """Authenticated but unusable: reply on the channel's topic, park the raw message on
        the DLQ, store nothing."""
        reply = _rejected(_request_id_of(msg, self.limits), code, reason)
        await self.dead_letters.producer.send_and_wait(
            reply_topic(channel.channel_id), value=reply.to_bytes(),
            key=reply.request_id.encode(),
        )
        await self.dead_letters.send(msg, code, reason)


class _UndoAll(Exception):  # noqa: N818 - control flow inside `_execute`, never escapes it
    """A pass without savepoints met a refusal: undo the pass, run again with them."""


def _bind_command(command: CheckedCommand) -> None:
    context = command.context
    bind_message_context(topic=command.msg.topic, partition=command.msg.partition,
                         offset=command.msg.offset, command_type=command.type,
                         correlation_id=context.request_id, causation_id=context.request_id,
                         channel=context.channel.channel_id, trace_id=trace_id_of(command.span))


def reply_message(channel_id: str, reply: Reply) -> OutboxMessage:
    """A reply on its channel's own topic, keyed by request id."""
    return OutboxMessage(topic=reply_topic(channel_id), key=reply.request_id.encode(),
                         value=reply.to_bytes())


def _reply_key(channel: Channel, request_id: str) -> AESGCM:
    """The key a stored reply is sealed under: derived from the channel's secret and the
    request id, so the table alone reveals no captcha code or session token."""
    material = f"carddesk stored reply v1\x00{request_id}".encode()
    return AESGCM(hmac.new(channel.secret.encode(), material, hashlib.sha256).digest())


def seal_reply(channel: Channel, reply: Reply) -> bytes:
    nonce = os.urandom(12)
    aad = f"{channel.channel_id}\x00{reply.request_id}".encode()
    return nonce + _reply_key(channel, reply.request_id).encrypt(nonce, reply.to_bytes(), aad)


def open_reply(channel: Channel, request_id: str, sealed: bytes) -> Reply:
    aad = f"{channel.channel_id}\x00{request_id}".encode()
    plain = _reply_key(channel, request_id).decrypt(sealed[:12], sealed[12:], aad)
    return Reply.model_validate_json(plain)


def _rejected(request_id: str, code: str, message: str) -> Reply:
    return Reply(request_id=request_id, status="rejected", code=code, message=message)


def _request_id_of(msg: Inbound, limits: MessageLimits) -> str:
    """The request id of a message that may be unreadable: from the body, else the key."""
    try:
        body = load_json(msg.value, limits)
    except Rejected:
        body = None
    if isinstance(body, dict) and isinstance(body.get("request_id"), str):
        return str(body["request_id"])[:100]
    return (msg.key or b"").decode("utf-8", "replace")[:100]
