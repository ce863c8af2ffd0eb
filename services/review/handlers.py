"""Application layer of review: command handlers (run by the intake) and the loss.events
handler (run by the event consumer), each inside the caller's transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import asyncpg
import structlog
from pydantic import ValidationError

from services.review import domain
from services.review.adapters import ReviewTables
from shared.application import handle_command
from shared.commands import CommandContext
from shared.consumer import Rejected, describe_validation_error
from shared.contracts.loss import LOSS_EVENTS, LossEvent
from shared.contracts.review import (
    REVIEW_EVENTS,
    ApplicationWithdrawn,
    DecideReview,
    ReviewApproved,
    ReviewEvent,
    ReviewRejected,
    SubmitReissueApplication,
)
from shared.contracts.upcasters import UPCASTERS
from shared.crypto import DataKeyDestroyedError, Vault
from shared.envelope import EventEnvelope
from shared.erasure import ErasableStreams
from shared.errors import SubjectErasedError
from shared.events import EventDecoder, EventMeta
from shared.eventstore import PostgresEventStore
from shared.locks import citizen_namespace, lock_citizens
from shared.tokens import TokenVerifier

log = structlog.get_logger()

decode_review_event: EventDecoder[ReviewEvent] = EventDecoder(REVIEW_EVENTS, UPCASTERS)
decode_loss_event: EventDecoder[LossEvent] = EventDecoder(LOSS_EVENTS, UPCASTERS)


class ReviewHandlers:
    def __init__(
        self,
        *,
        schema: str,
        events_topic: str,
        verifier: TokenVerifier,
        vault: Vault,
        rule: domain.AutoApprovalRule,
    ) -> None:
        self.schema = schema
        self.events_topic = events_topic
        self.verifier = verifier
        self.vault = vault
        self.rule = rule
        self.tables = ReviewTables(schema)
        self.erasure = ErasableStreams(
            vault=vault, store_for=self._store, stream_id=domain.stream_id,
            decode=decode_review_event, initial=domain.INITIAL, evolve=domain.evolve,
            is_erased=domain.is_erased,
        )

    def _store(self, conn: asyncpg.Connection) -> PostgresEventStore:
        return PostgresEventStore(conn, self.schema, self.events_topic)

    async def _lock(self, conn: asyncpg.Connection, citizen_ref: str) -> None:
        """Before reading the loss facts: the loss.events follower holds the same lock."""
        await lock_citizens(conn, citizen_namespace(self.schema), [citizen_ref])

    async def _run(
        self, conn: asyncpg.Connection, citizen_ref: str, command: domain.ReviewCommand,
        meta: EventMeta,
    ) -> list[ReviewEvent]:
        envelopes = await handle_command(
            self._store(conn),
            domain.stream_id(citizen_ref),
            decode=decode_review_event,
            initial=domain.INITIAL,
            evolve=domain.evolve,
            decide=lambda state: domain.decide(command, state, self.rule),
            meta=meta,
        )
        return [decode_review_event(e) for e in envelopes]

    async def submit(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: SubmitReissueApplication
    ) -> dict[str, Any]:
        claims = self.verifier.verify(payload.session_token, now=ctx.received_at,
                                      channel=ctx.channel.channel_id)
        citizen_ref = claims.citizen_ref
        structlog.contextvars.bind_contextvars(citizen_ref=citizen_ref)
        await self._lock(conn, citizen_ref)
        application_id = str(uuid4())
        try:
            address, phone, photo_ref = await self.vault.encrypt_all(
                conn, citizen_ref, [payload.address, payload.phone, payload.photo_ref])
        except DataKeyDestroyedError as exc:
            raise SubjectErasedError() from exc
        command = domain.SubmitApplication(
            application_id=application_id,
            loss=await self.tables.loss_of(conn, citizen_ref),
            address=address,
            phone=phone,
            photo_ref=photo_ref,
            pickup_bureau=payload.pickup_bureau,
            channel=ctx.channel.channel_id,
        )
        events = await self._run(conn, citizen_ref, command, _command_meta(citizen_ref, ctx))
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
        await self._lock(conn, citizen_ref)
        command = domain.DecideApplication(
            application_id=payload.application_id,
            reviewer_id=payload.reviewer_id,
            decision=payload.decision,
            reason=payload.reason,
            bureaus=ctx.channel.bureaus,
        )
        events = await self._run(conn, citizen_ref, command, _command_meta(citizen_ref, ctx))
        _log_decisions(events)
        return {"application_id": payload.application_id, "decision": payload.decision}

    async def on_loss_event(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
        """Track the citizen's loss case; a cancelled loss withdraws its application."""
        try:
            event = decode_loss_event(envelope)
        except ValidationError as exc:
            raise Rejected("invalid_event", describe_validation_error(exc)) from exc
        citizen_ref = envelope.citizen_ref
        if await self.erasure.erased(conn, citizen_ref):
            log.info("review.ignored_for_erased_subject", event_type=envelope.type)
            return
        current = await self.tables.loss_of(conn, citizen_ref)
        updated = domain.track_loss(current, event)
        if updated is not None and updated != current:
            await self.tables.save_loss(conn, citizen_ref, updated)
            log.info("review.loss_tracked", loss_id=updated.loss_id, kind=updated.kind,
                     in_force=updated.in_force)
        withdrawal = domain.withdrawal_for(event)
        if withdrawal is None:
            return
        meta = EventMeta(citizen_ref=citizen_ref, occurred_at=envelope.occurred_at,
                         correlation_id=envelope.correlation_id,
                         causation_id=str(envelope.event_id))
        for recorded in await self._run(conn, citizen_ref, withdrawal, meta):
            if isinstance(recorded, ApplicationWithdrawn):
                log.info("review.withdrawn", application_id=recorded.application_id,
                         reason=recorded.reason)


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
