"""The one pipeline every `<service>.commands` subscriber runs: authenticate, check, execute.

A message that fails authentication (unknown channel, bad signature) goes to the DLQ only:
its sender is unknown, and a reply would let anyone squat a channel's request id. Every
authenticated command gets a reply on its channel's own topic `channel.replies.<channel>`:
a refused one at once (and its raw message on the DLQ), a checked one queued through the
outbox in the same transaction as its events, so a reply never announces an effect that was
lost. `(channel, request_id)` is the idempotency key (`shared.idempotency`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

import asyncpg
import structlog

from shared.barrier import FollowerBarrier
from shared.channels import Channel, ChannelRegistry
from shared.consumer import DeadLetters, Inbound, MessageLimits, Rejected, with_retries
from shared.decider import new_uuid
from shared.idempotency import StoredReplies
from shared.intake.auth import authenticate
from shared.intake.execute import CommandExecutor
from shared.intake.messages import CommandRoute, rejected
from shared.intake.parse import CheckedCommand, CommandChecks, request_id_of
from shared.intake.prepare import BatchPrepare
from shared.logging import bind_message_context
from shared.metrics import (
    COMMANDS_RECEIVED,
    COMMANDS_REPLIED,
    command_type_label,
    observe_command_latency,
)
from shared.sealing import FieldOpener
from shared.settings import CardDeskSettings
from shared.topics import reply_topic

log = structlog.get_logger()


class CommandIntake:
    """A service's commands, from the Kafka record to the reply (a `BatchConsumer`)."""

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
        ids: Callable[[], str] = new_uuid,
        prepare: BatchPrepare | None = None,
    ) -> None:
        """`ids` gives the new ids handlers ask their context for (`CommandContext.new_id`);
        `prepare` reads for a batch's citizens at once (`shared.intake.prepare`)."""
        self.pool = pool
        self.schema = schema
        self.channels = channels
        self.dead_letters = dead_letters
        self.max_attempts = settings.consumer_max_attempts
        self.freshness = timedelta(seconds=settings.command_freshness_seconds)
        self.checks = CommandChecks(dict(routes), FieldOpener.from_settings(settings),
                                    MessageLimits.from_settings(settings), self.freshness,
                                    clock, ids)
        self.replies = StoredReplies(schema)
        self.executor = CommandExecutor(pool, schema, self.replies, barrier, prepare)

    async def handle(self, msg: Inbound) -> None:
        bind_message_context(topic=msg.topic, partition=msg.partition, offset=msg.offset)

        async def process() -> None:
            command = await self._checked(msg)
            if command is not None:
                await self.executor.execute([command])

        await with_retries(msg, process, self.dead_letters, max_attempts=self.max_attempts)

    async def handle_batch(self, messages: Sequence[Inbound]) -> None:
        """A fetch's commands, each partition's in order, in one transaction: the stored
        replies read in one query, the new replies and every reply's outbox row written in
        one statement, one commit. If the transaction fails as a whole, each command goes
        through `handle` alone (its own transaction, retries, DLQ) instead."""
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
            await self.executor.execute(commands)
        except Exception as exc:
            log.info("batch.replayed_one_by_one", error=type(exc).__name__, size=len(commands))
            for command in commands:
                await self.handle(command.msg)

    async def _checked(self, msg: Inbound) -> CheckedCommand | None:
        """The command ready to run, or None once it has been refused."""
        try:
            channel = authenticate(msg, self.channels)
        except Rejected as exc:  # unknown sender: the DLQ only, no reply anywhere
            COMMANDS_RECEIVED.labels(self.schema, command_type_label(None, ())).inc()
            await self.dead_letters.send(msg, exc.code, exc.reason)
            return None
        try:
            command = self.checks.check(msg, channel)
        except Rejected as exc:
            command_type = self.checks.type_label(msg)
            COMMANDS_RECEIVED.labels(self.schema, command_type).inc()
            await self._refuse(msg, channel, exc.code, exc.reason)
            COMMANDS_REPLIED.labels(self.schema, command_type, "rejected", exc.code).inc()
            observe_command_latency(self.schema, command_type, msg.timestamp_ms)
            return None
        COMMANDS_RECEIVED.labels(self.schema, command.type).inc()
        return command

    async def _refuse(self, msg: Inbound, channel: Channel, code: str, reason: str) -> None:
        """Authenticated but unusable: reply on the channel's topic, park the raw message on
        the DLQ, store nothing."""
        reply = rejected(request_id_of(msg, self.checks.limits), code, reason)
        await self.dead_letters.producer.send_and_wait(
            reply_topic(channel.channel_id), value=reply.to_bytes(),
            key=reply.request_id.encode(),
        )
        await self.dead_letters.send(msg, code, reason)

    async def purge_stored_replies(self, batch: int = 5000) -> int:
        """Forget replies older than twice the freshness window (a repeat that old is refused
        as stale before its reply is looked up); returns how many went."""
        purged = await self.replies.purge(self.pool, 2 * self.freshness, batch)
        if purged:
            log.info("command.replies_purged", count=purged)
        return purged

    async def purge_loop(self) -> None:
        """`purge_stored_replies` every half window (at most every minute), for ever."""
        interval = min(60.0, self.freshness.total_seconds() / 2)
        while True:
            await self.purge_stored_replies()
            await asyncio.sleep(interval)
