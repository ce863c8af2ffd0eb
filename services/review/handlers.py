"""The review application layer: channel commands (run by the intake) and what review learns
from loss.events (run by its follower). Each runs in the caller's transaction: lock the
citizen, read what review knows of their loss, decide, append."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import structlog

from services.review import domain
from services.review.adapters import LockedLosses, ReviewTables
from services.review.settings import ReviewSettings
from shared.application import Streams
from shared.commands import CommandContext
from shared.consumer import decode_followed
from shared.contracts import decoders
from shared.contracts.review import (
    ApplicationWithdrawn,
    DecideReview,
    ReissueApplied,
    ReviewApproved,
    ReviewEvent,
    ReviewRejected,
    SubmitReissueApplication,
)
from shared.crypto import DataKeyDestroyedError, MasterKeys, Vault
from shared.envelope import EventEnvelope
from shared.erasure import Erasure
from shared.errors import SubjectErasedError
from shared.events import EventMeta
from shared.intake.prepare import prepared, session_citizen
from shared.locks import citizen_namespace
from shared.service import Kit
from shared.tokens import TokenVerifier

log = structlog.get_logger()



class ReviewHandlers:
    def __init__(self, kit: Kit[ReviewSettings]) -> None:
        settings = kit.settings
        self.schema = kit.schema
        self.ids = kit.ids
        self.verifier = TokenVerifier.from_settings(settings)
        # Whose stream a command decides on, before it runs (`CommandRoute.citizen`).
        self.citizen = session_citizen(self.verifier)
        self.vault = Vault(kit.schema, MasterKeys.from_settings(settings))
        self.rule = settings.auto_approval_rule()
        self.tables = ReviewTables(kit.schema)
        self.streams = Streams(domain.DECIDER, kit.schema, kit.events_topic)
        self.erasure = Erasure(self.streams, self.vault)

    # ------------------------------------------------------------------------- commands

    async def submit(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: SubmitReissueApplication
    ) -> dict[str, Any]:
        claims = self.verifier.verify(payload.session_token, now=ctx.received_at,
                                      channel=ctx.channel.channel_id)
        citizen_ref = claims.citizen_ref
        structlog.contextvars.bind_contextvars(citizen_ref=citizen_ref)
        try:
            address, phone, photo_ref = await self.vault.encrypt_all(
                conn, citizen_ref, [payload.address, payload.phone, payload.photo_ref])
        except DataKeyDestroyedError as exc:
            raise SubjectErasedError() from exc
        command = domain.SubmitApplication(
            address=address,
            phone=phone,
            photo_ref=photo_ref,
            pickup_bureau=payload.pickup_bureau,
            channel=ctx.channel.channel_id,
        )
        events = await self._run(conn, command, _command_meta(citizen_ref, ctx), ctx.received_at)
        application_id = next(e for e in events if isinstance(e, ReissueApplied)).application_id
        await self.tables.record_application(conn, application_id, citizen_ref)
        log.info("review.applied", application_id=application_id,
                 pickup_bureau=payload.pickup_bureau)
        _log_decisions(events)
        return {"application_id": application_id}

    async def decide(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: DecideReview
    ) -> dict[str, Any]:
        citizen_ref = await self.tables.citizen_of(conn, payload.application_id)
        if citizen_ref is None:
            raise domain.UnknownApplicationError()
        structlog.contextvars.bind_contextvars(citizen_ref=citizen_ref)
        command = domain.DecideApplication(
            application_id=payload.application_id,
            reviewer_id=payload.reviewer_id,
            decision=payload.decision,
            reason=payload.reason,
            bureaus=ctx.channel.bureaus,
        )
        events = await self._run(conn, command, _command_meta(citizen_ref, ctx), ctx.received_at)
        _log_decisions(events)
        return {"application_id": payload.application_id, "decision": payload.decision}

    # ------------------------------------------------------------------------- followers

    async def on_loss_event(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
        """Track the citizen's loss case; a cancelled loss withdraws its application."""
        await self.on_loss_events(conn, [envelope])

    async def on_loss_events(self, conn: asyncpg.Connection,
                             envelopes: Sequence[EventEnvelope]) -> None:
        """`on_loss_event` for a partition's batch, in order: the citizens' loss cases read
        in one statement and the changed ones written in one at the end; a withdrawal
        decides on the case as the batch left it, under the follower's lock."""
        events = [(envelope, decode_followed(decoders.LOSS, envelope)) for envelope in envelopes]
        cases = await self.tables.losses_of(conn, {envelope.citizen_ref for envelope in envelopes})
        changed: dict[str, domain.LossView] = {}
        for envelope, event in events:
            citizen_ref = envelope.citizen_ref
            current = cases.get(citizen_ref)
            updated = domain.track_loss(current, event)
            if updated is not None and updated != current:
                cases[citizen_ref] = changed[citizen_ref] = updated
                log.info("review.loss_tracked", citizen_ref=citizen_ref, loss_id=updated.loss_id,
                         kind=updated.kind, in_force=updated.in_force)
            withdrawal = domain.withdrawal_for(event)
            if withdrawal is None:
                continue
            meta = EventMeta(citizen_ref=citizen_ref, occurred_at=envelope.occurred_at,
                             correlation_id=envelope.correlation_id,
                             causation_id=str(envelope.event_id))
            for recorded in await self._decide(conn, withdrawal, meta, envelope.occurred_at,
                                               cases.get(citizen_ref)):
                if isinstance(recorded, ApplicationWithdrawn):
                    log.info("review.withdrawn", citizen_ref=citizen_ref,
                             application_id=recorded.application_id, reason=recorded.reason)
        await self.tables.save_losses(conn, changed)

    # ------------------------------------------------------------------------- the one path

    async def _run(
        self, conn: asyncpg.Connection, command: domain.ReviewCommand, meta: EventMeta,
        now: datetime,
    ) -> list[ReviewEvent]:
        """Lock the citizen, read their loss case, decide, append.

        The lock comes first (one round trip with the read): the loss.events follower holds
        it too, so the case read is the one its latest applied event left."""
        batch = prepared(conn)
        loss = (batch.cases.get(meta.citizen_ref)
                if isinstance(batch, LockedLosses) and batch.covers(meta.citizen_ref)
                else await self.tables.locked_loss_of(conn, citizen_namespace(self.schema),
                                                      meta.citizen_ref))
        return await self._decide(conn, command, meta, now, loss)

    async def prepare(self, conn: asyncpg.Connection,
                      citizen_refs: Collection[str]) -> LockedLosses:
        """A command batch's citizens locked and their loss cases read in one statement,
        then their streams read in one more (`shared.intake.prepare`); `_run` takes them."""
        losses = await self.tables.locked_losses_of(conn, citizen_namespace(self.schema),
                                                    citizen_refs)
        await self.streams.warm(conn, citizen_refs)
        return losses

    async def _decide(
        self, conn: asyncpg.Connection, command: domain.ReviewCommand, meta: EventMeta,
        now: datetime, loss: domain.LossView | None,
    ) -> list[ReviewEvent]:
        """Decide on the citizen's loss case `loss`, read under their lock, and append."""
        context = domain.DecisionContext(now=now, new_id=self.ids, loss=loss, rule=self.rule)
        sealed = await self.streams.decide(conn, command, context, meta)
        return [domain.decode(e) for e in sealed]


def _command_meta(citizen_ref: str, ctx: CommandContext) -> EventMeta:
    return EventMeta(citizen_ref=citizen_ref, occurred_at=ctx.received_at,
                     correlation_id=ctx.correlation_id, causation_id=ctx.causation_id)


def _log_decisions(events: Sequence[ReviewEvent]) -> None:
    for event in events:
        if isinstance(event, ReviewApproved):
            log.info("review.approved", application_id=event.application_id,
                     reviewer_id=event.reviewer_id, automatic=event.automatic)
        elif isinstance(event, ReviewRejected):
            log.info("review.rejected", application_id=event.application_id,
                     reviewer_id=event.reviewer_id)
