"""The loss application layer: channel commands, the expiry timer, and what loss learns from
issuance and review. Each runs in one transaction: read tables, decide, append, timers."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, TypeVar, assert_never

import asyncpg
import structlog

from services.loss import domain
from services.loss.adapters import Facts, expiry_timers
from services.loss.settings import LossSettings
from shared.application import Streams
from shared.commands import CommandContext
from shared.consumer import decode_followed
from shared.contracts import decoders, issuance, review
from shared.contracts import loss as contract
from shared.contracts.common import SubjectErased
from shared.crypto import MasterKeys, Vault
from shared.envelope import EventEnvelope
from shared.erasure import Erasure
from shared.events import DomainEvent, EventMeta
from shared.intake.prepare import prepared, session_citizen
from shared.locks import citizen_namespace
from shared.service import Kit
from shared.timers import Timer
from shared.tokens import TokenVerifier

log = structlog.get_logger()

E = TypeVar("E")



class LossHandlers:
    def __init__(self, kit: Kit[LossSettings]) -> None:
        settings = kit.settings
        self.schema = kit.schema
        self.clock = kit.clock
        self.ids = kit.ids
        self.verifier = TokenVerifier.from_settings(settings)
        # Whose stream a command decides on, before it runs (`CommandRoute.citizen`).
        self.citizen = session_citizen(self.verifier)
        self.policy = domain.LossPolicy(
            temporary_period=settings.loss_temporary_period,
            portrait_max_age=settings.loss_portrait_max_age,
            financial_freeze=settings.loss_financial_freeze,
        )
        self.batch_size = settings.loss_expiry_batch_size
        self.scan_interval = settings.loss_expiry_scan_interval.total_seconds()
        self.timers = expiry_timers(kit.schema)
        self.streams = Streams(domain.DECIDER, kit.schema, kit.events_topic)
        self.erasure = Erasure(
            self.streams, Vault(kit.schema, MasterKeys.from_settings(settings)),
            on_erased=self.timers.disarm_all,  # a pending expiry of an erased case is void
        )

    # ------------------------------------------------------------------------- commands

    async def report_loss(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: contract.ReportLoss
    ) -> dict[str, Any]:
        claims = self.verifier.verify(payload.session_token, now=ctx.received_at,
                                      channel=ctx.channel.channel_id)
        structlog.contextvars.bind_contextvars(citizen_ref=claims.citizen_ref)
        command = domain.ReportLoss(
            kind=payload.kind,
            channel=ctx.channel.channel_id,
            verification=domain.Verification(claims.level, claims.portrait_verified_at),
        )
        meta = EventMeta(claims.citizen_ref, ctx.received_at, ctx.correlation_id, ctx.causation_id)
        events = await self._run(conn, command, meta, ctx.received_at)
        reported = next(e for e in events if isinstance(e, contract.LossReported))
        log.info("loss.reported", kind=reported.kind, loss_id=reported.loss_id,
                 supersedes_temporary=reported.supersedes_temporary)
        return {
            "loss_id": reported.loss_id,
            "kind": reported.kind,
            "expires_at": reported.expires_at.isoformat() if reported.expires_at else None,
            "financial_freeze": reported.financial_freeze,
        }

    async def cancel_loss(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: contract.CancelLoss
    ) -> dict[str, Any]:
        claims = self.verifier.verify(payload.session_token, now=ctx.received_at,
                                      channel=ctx.channel.channel_id)
        structlog.contextvars.bind_contextvars(citizen_ref=claims.citizen_ref)
        meta = EventMeta(claims.citizen_ref, ctx.received_at, ctx.correlation_id, ctx.causation_id)
        events = await self._run(conn, domain.CancelLoss(), meta, ctx.received_at)
        cancelled = next(e for e in events if isinstance(e, contract.LossCancelled))
        log.info("loss.cancelled", loss_id=cancelled.loss_id)
        return {"loss_id": cancelled.loss_id}

    async def prepare(self, conn: asyncpg.Connection, citizen_refs: Collection[str]) -> Facts:
        """A command batch's citizens locked and their facts read in one statement, then
        their streams read in one more (`shared.intake.prepare`); `_run` takes the facts."""
        facts = await Facts.locked(conn, self.schema, citizen_namespace(self.schema),
                                   citizen_refs)
        await self.streams.warm(conn, citizen_refs)
        return facts

    # ------------------------------------------------------------------------- expiry

    async def expire_due(self, pool: asyncpg.Pool) -> int:
        """Expire one batch of due timers; returns how many timers it took."""
        now = self.clock()
        async with pool.acquire() as conn, conn.transaction():
            due = await self.timers.claim_due(conn, now, self.batch_size)
            for timer in due:
                try:
                    async with conn.transaction():  # savepoint: one bad timer spoils no other
                        await self._expire(conn, timer, now)
                except Exception:
                    log.exception("loss.expiry_failed", citizen_ref=timer.citizen_ref,
                                  loss_id=timer.key)
        return len(due)

    async def expiry_loop(self, pool: asyncpg.Pool) -> None:
        """Durable: timers live in the database, so a restart loses none."""
        while True:
            if await self.expire_due(pool) < self.batch_size:
                await asyncio.sleep(self.scan_interval)

    async def _expire(self, conn: asyncpg.Connection, timer: Timer, now: datetime) -> None:
        loss_id = timer.key
        meta = EventMeta(timer.citizen_ref, now, timer.correlation_id, timer.causation_id)
        events = await self._run(conn, domain.ExpireTemporaryLoss(loss_id), meta, now)
        await self.timers.disarm(conn, loss_id)
        if events:
            log.info("loss.expired", citizen_ref=timer.citizen_ref, loss_id=loss_id)
        else:
            log.info("loss.expiry_void", citizen_ref=timer.citizen_ref, loss_id=loss_id)

    # ------------------------------------------------------------------------- followers

    async def on_issuance_event(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
        await self.on_issuance_events(conn, [envelope])

    async def on_issuance_events(self, conn: asyncpg.Connection,
                                 envelopes: Sequence[EventEnvelope]) -> None:
        """A partition's batch, in order, under the citizens' lock (the follower's): their
        facts read in one statement and what changed written at the end; a reissue closes
        the loss on the facts as the batch left them."""
        facts = await Facts.read(conn, self.schema, {e.citizen_ref for e in envelopes})
        for envelope in envelopes:
            event = decode_followed(decoders.ISSUANCE, envelope)
            citizen_ref = envelope.citizen_ref
            match event:
                case issuance.CardIssued(card_no=card_no):
                    facts.hold(citizen_ref, card_no)
                case issuance.CardReissued(new_card_no=new_card_no,
                                           application_id=application_id):
                    facts.hold(citizen_ref, new_card_no)
                    facts.decided(citizen_ref, application_id, "completed")
                    now = self.clock()
                    meta = EventMeta(citizen_ref, now, envelope.correlation_id,
                                     str(envelope.event_id))
                    if await self._run(conn, domain.CloseLoss(new_card_no), meta, now,
                                       facts=facts):
                        log.info("loss.closed")
                case (issuance.CardProductionStarted() | issuance.CardReadyForPickup()
                      | issuance.CardCollected() | SubjectErased()):
                    pass
                case _:
                    assert_never(event)
        await facts.save(conn)

    async def on_review_event(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
        await self.on_review_events(conn, [envelope])

    async def on_review_events(self, conn: asyncpg.Connection,
                               envelopes: Sequence[EventEnvelope]) -> None:
        """A partition's batch, in order: the citizens' applications read in one statement
        and the changed ones written in one."""
        facts = await Facts.read(conn, self.schema, {e.citizen_ref for e in envelopes})
        for envelope in envelopes:
            event = decode_followed(decoders.REVIEW, envelope)
            citizen_ref = envelope.citizen_ref
            match event:
                case review.ReissueApplied(application_id=application_id):
                    facts.applied(citizen_ref, application_id)
                case review.ReviewApproved(application_id=application_id):
                    facts.decided(citizen_ref, application_id, "approved")
                case review.ReviewRejected(application_id=application_id):
                    facts.decided(citizen_ref, application_id, "rejected")
                case review.ApplicationWithdrawn(application_id=application_id):
                    facts.decided(citizen_ref, application_id, "none")
                case SubjectErased():
                    pass
                case _:
                    assert_never(event)
        await facts.save(conn)

    # ------------------------------------------------------------------------- the one path

    async def _run(
        self, conn: asyncpg.Connection, command: domain.LossCommand, meta: EventMeta,
        now: datetime, *, facts: Facts | None = None,
    ) -> list[contract.LossEvent]:
        """Load the citizen's case, decide, append, and keep the expiry timers in step.

        The citizen's lock comes first: a follower applying issuance or review facts for
        them either committed before (and its facts are read here) or waits for this. A
        follower passes the `facts` it holds under that lock already."""
        if facts is None:
            batch = prepared(conn)
            facts = (batch if isinstance(batch, Facts) and batch.covers(meta.citizen_ref)
                     else await Facts.locked(conn, self.schema, citizen_namespace(self.schema),
                                             [meta.citizen_ref]))
        context = domain.DecisionContext(
            now=now,
            new_id=self.ids,
            card_no=facts.card_no(meta.citizen_ref),
            application_status=facts.application_status(meta.citizen_ref),
            policy=self.policy,
        )
        decided_on: list[domain.LossState] = []

        def decide(state: domain.LossState) -> list[DomainEvent]:
            decided_on[:] = [state]  # the last call's, if a conflict made it decide again
            return domain.decide(command, state, context)

        sealed = await self.streams.apply(conn, decide, meta)
        events = [domain.decode(e) for e in sealed]
        clock_running = bool(decided_on) and isinstance(decided_on[0], domain.TemporaryLoss)
        await self._sync_timers(conn, sealed, events, clock_running=clock_running)
        return events

    async def _sync_timers(
        self, conn: asyncpg.Connection, sealed: Sequence[EventEnvelope],
        events: Sequence[contract.LossEvent], *, clock_running: bool,
    ) -> None:
        """Arm a temporary loss's expiry; end the clock when another event ends the
        temporary loss that was in force (`clock_running`: the state decided on was one).
        Without one there is no timer to end (a stray one would be void when due anyway)."""
        for envelope, event in zip(sealed, events, strict=True):
            match event:
                case contract.LossReported(kind="temporary", expires_at=datetime() as due_at):
                    await self.timers.arm(conn, Timer(
                        key=event.loss_id, citizen_ref=envelope.citizen_ref, due_at=due_at,
                        correlation_id=envelope.correlation_id,
                        causation_id=str(envelope.event_id),
                    ))
                case (contract.LossReported() | contract.LossCancelled()
                      | contract.TemporaryLossExpired() | contract.LossClosed()):
                    # At most one loss is in force: anything else ends the temporary one's clock.
                    if clock_running:
                        await self.timers.disarm_all(conn, envelope.citizen_ref)
                case SubjectErased():
                    pass
                case _:
                    assert_never(event)

