"""Running checked commands: one transaction for a partition's batch, each command's reply
stored and queued on the outbox with its events, a repeated request answered from its stored
reply, a command refused while the service's followers lag (`not_yet_consistent`)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import structlog
from opentelemetry import trace

from shared.barrier import FollowerBarrier
from shared.errors import DomainError
from shared.eventstore import HeldAppends, HeldAppendsConflictError, holding_appends
from shared.idempotency import ReplyKey, StoredReplies
from shared.intake.messages import Refusal, Reply, rejected, reply_message
from shared.intake.parse import CheckedCommand
from shared.intake.prepare import BatchPrepare, preparing
from shared.logging import bind_message_context
from shared.metrics import COMMANDS_REPEATED, COMMANDS_REPLIED, observe_command_latency
from shared.tracing import trace_id_of

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Outcome:
    command: CheckedCommand
    reply: Reply
    repeated: bool = False  # answered from the stored reply
    # Stored for a repeat to get; `not_yet_consistent` is not, the repeat is decided afresh.
    kept: bool = True


class CommandExecutor:
    def __init__(self, pool: asyncpg.Pool, schema: str, replies: StoredReplies,
                 barrier: FollowerBarrier | None, prepare: BatchPrepare | None = None) -> None:
        self.pool = pool
        self.schema = schema
        self.replies = replies
        self.barrier = barrier
        self.prepare = prepare

    async def execute(self, commands: Sequence[CheckedCommand]) -> None:
        """Run commands in one transaction, then count and log their replies.

        The first pass takes no savepoints (two round trips per command saved) and holds
        the commands' appends for one statement before the replies (`HeldAppends`). A
        command refused by a `DomainError` must leave no writes, so such a pass is rolled
        back as a whole and run again with a savepoint per command; nothing of the first was
        visible. Held appends that meet another writer, or a cached state from a rolled-back
        write, roll the pass back too, and it runs again appending command by command, which
        reads each such stream's head afresh."""
        try:
            consistent = self.barrier is None or await self.barrier.caught_up()
            try:
                outcomes = await self._pass(commands, savepoints=False, consistent=consistent,
                                            hold_appends=True)
            except HeldAppendsConflictError:
                log.info("batch.appends_conflicted", size=len(commands))
                outcomes = await self._pass(commands, savepoints=False, consistent=consistent)
            if outcomes is None:
                outcomes = await self._pass(commands, savepoints=True, consistent=consistent)
                assert outcomes is not None, "with savepoints every refusal is a reply"
            for outcome in outcomes:
                self._report(outcome)
        finally:
            for command in commands:
                if command.span is not None:
                    command.span.end()

    async def _pass(self, commands: Sequence[CheckedCommand], *, savepoints: bool,
                    consistent: bool, hold_appends: bool = False) -> list[Outcome] | None:
        """Every command's outcome, committed; None, rolled back, when a command run
        without a savepoint was refused."""
        async with self.pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                with (holding_appends(conn, self.schema) if hold_appends
                      else contextlib.nullcontext()) as held:
                    outcomes = await self._outcomes(conn, commands, savepoints=savepoints,
                                                    consistent=consistent, held=held)
            except BaseException:
                await transaction.rollback()
                raise
            if outcomes is None:
                await transaction.rollback()
            else:
                await transaction.commit()
            return outcomes

    async def _outcomes(self, conn: asyncpg.Connection, commands: Sequence[CheckedCommand], *,
                        savepoints: bool, consistent: bool,
                        held: HeldAppends | None) -> list[Outcome] | None:
        stored = await self.replies.lookup(
            conn, [(c.context.channel, c.context.request_id) for c in commands])
        with preparing(conn, await self._prepared(conn, [
                c for c in commands
                if consistent and (c.context.channel.channel_id, c.context.request_id)
                not in stored])):
            outcomes = await self._decided(conn, commands, stored, savepoints=savepoints,
                                           consistent=consistent)
        if outcomes is None:
            return None
        new = [(o.command.context.channel, o.reply) for o in outcomes
               if o.kept and not o.repeated]
        queued = [reply_message(o.command.context.channel.channel_id, o.reply)
                  for o in outcomes]
        if held is not None:  # one statement; the events' outbox rows before the replies'
            await held.flush(also=self.replies.written_with(new, queued))
        else:
            await self.replies.record(conn, new, queued)
        return outcomes

    async def _prepared(self, conn: asyncpg.Connection,
                        new: Sequence[CheckedCommand]) -> object | None:
        """What the service reads at once for the citizens the new commands decide on."""
        if self.prepare is None:
            return None
        citizens = {citizen for command in new
                    if (citizen := citizen_of(command)) is not None}
        return await self.prepare(conn, citizens) if citizens else None

    async def _decided(self, conn: asyncpg.Connection, commands: Sequence[CheckedCommand],
                       stored: dict[ReplyKey, Reply], *, savepoints: bool,
                       consistent: bool) -> list[Outcome] | None:
        outcomes: list[Outcome] = []
        for command in commands:
            bind_command(command)
            key: ReplyKey = (command.context.channel.channel_id, command.context.request_id)
            if key in stored:
                outcomes.append(Outcome(command, stored[key], repeated=True))
            elif not consistent:
                outcomes.append(Outcome(command, unsettled(command), kept=False))
            elif (reply := await self._reply(conn, command, savepoints=savepoints)) is None:
                return None
            else:
                stored[key] = reply  # the same request again later in the batch is a repeat
                outcomes.append(Outcome(command, reply))
        return outcomes

    async def _reply(self, conn: asyncpg.Connection, command: CheckedCommand, *,
                     savepoints: bool) -> Reply | None:
        """A new command's reply; None if it was refused where no savepoint can undo it."""
        context, route = command.context, command.route
        if route.bureau_only and not context.channel.bureau:
            return rejected(context.request_id, "bureau_only",
                            "only a bureau channel may send this command")
        with trace.use_span(command.span or trace.INVALID_SPAN, end_on_exit=False,
                            record_exception=False, set_status_on_exception=False):
            try:
                if savepoints:
                    async with conn.transaction():  # a refusal undoes its partial writes
                        outcome = await route.handler(conn, context, command.payload)
                else:
                    outcome = await route.handler(conn, context, command.payload)
            except DomainError as exc:
                return rejected(context.request_id, exc.code, exc.message) if savepoints else None
        if isinstance(outcome, Refusal):
            return rejected(context.request_id, outcome.code, outcome.message)
        return Reply(request_id=context.request_id, status="accepted", code="accepted",
                     message=route.accepted_message, data=outcome or {})

    def _report(self, outcome: Outcome) -> None:
        command, reply = outcome.command, outcome.reply
        bind_command(command)
        if outcome.repeated:
            COMMANDS_REPEATED.labels(self.schema, command.type).inc()
        else:
            COMMANDS_REPLIED.labels(self.schema, command.type, reply.status, reply.code).inc()
            observe_command_latency(self.schema, command.type, command.msg.timestamp_ms)
        if command.span is not None:
            command.span.set_attribute("carddesk.reply.code", reply.code)
        log.info("command.repeated" if outcome.repeated else "command.replied",
                 status=reply.status, code=reply.code)


def citizen_of(command: CheckedCommand) -> str | None:
    """Whose stream `command` decides on, if its route can tell before it runs; a command
    its route cannot read (a bad token) is left to its handler, which refuses it."""
    if command.route.citizen is None:
        return None
    try:
        return command.route.citizen(command.context, command.payload)
    except DomainError:
        return None


def unsettled(command: CheckedCommand) -> Reply:
    """The reply while the service's followers lag behind the events it follows."""
    return rejected(command.context.request_id, "not_yet_consistent",
                    "this service has not yet applied every event it follows; retry")


def bind_command(command: CheckedCommand) -> None:
    context = command.context
    bind_message_context(topic=command.msg.topic, partition=command.msg.partition,
                         offset=command.msg.offset, command_type=command.type,
                         correlation_id=context.request_id, causation_id=context.request_id,
                         channel=context.channel.channel_id, trace_id=trace_id_of(command.span))

