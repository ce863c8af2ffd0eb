"""Issuance's application layer: the command handlers, the review.events follower and the
production timer. Each runs in one transaction: read tables, decide, append, timers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import asyncpg
import structlog

from services.issuance import domain
from services.issuance.adapters import Applications, CardNumbers, production_timers
from services.issuance.settings import IssuanceSettings
from shared.application import Streams
from shared.commands import CommandContext
from shared.consumer import Rejected, decode_followed
from shared.contracts import decoders
from shared.contracts.issuance import CardProductionStarted, CollectCard, ImportCard
from shared.contracts.review import ReviewApproved
from shared.crypto import DataKeyDestroyedError, MasterKeys, Vault
from shared.envelope import EventEnvelope
from shared.erasure import Erasure
from shared.errors import DomainError, SubjectErasedError
from shared.events import EventMeta
from shared.identity import (
    citizen_ref,
    is_valid_id_number,
    normalise_id_number,
    normalise_name,
)
from shared.locks import citizen_namespace
from shared.masking import mask_card_no
from shared.service import Kit
from shared.timers import Timer

log = structlog.get_logger()



class IssuanceHandlers:
    """Everything issuance does in response to a message or a timer, built from its kit."""

    def __init__(self, kit: Kit[IssuanceSettings]) -> None:
        self.settings = kit.settings
        self.schema = kit.schema
        self.clock = kit.clock
        self.ids = kit.ids
        self.applications = Applications(kit.schema)
        self.timers = production_timers(kit.schema)
        self.card_numbers = CardNumbers(kit.schema)
        self.vault = Vault(kit.schema, MasterKeys.from_settings(kit.settings))
        self.streams = Streams(domain.DECIDER, kit.schema, kit.events_topic)
        # A pending production timer of an erased citizen is voided when it fires.
        self.erasure = Erasure(self.streams, self.vault)

    # --- commands --------------------------------------------------------------------------

    async def import_card(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: ImportCard
    ) -> dict[str, object]:
        ref = domain.require_valid(self.present(payload.id_number))
        structlog.contextvars.bind_contextvars(citizen_ref=ref)
        meta = EventMeta(ref, ctx.received_at, ctx.correlation_id, ctx.causation_id)
        stored = await self._decide(conn, [domain.RecordImportedCard(payload.card_no)], meta)
        return {"citizen_ref": ref, "already_imported": not stored}

    async def collect_card(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: CollectCard
    ) -> dict[str, object]:
        # The review.events follower holds the holder's lock while it starts production.
        ref = await self.applications.locked_holder_of(conn, citizen_namespace(self.schema),
                                                       payload.application_id)
        if ref is None:
            raise domain.UnknownApplicationError
        structlog.contextvars.bind_contextvars(citizen_ref=ref)
        command = domain.HandOverCard(
            application_id=payload.application_id,
            bureau_id=payload.bureau_id,
            holder_ref=ref,
            presented=self.present(payload.presented_id_number),
            proxy=await self._proxy(conn, ref, payload),
            bureaus=ctx.channel.bureaus,
        )
        meta = EventMeta(ref, ctx.received_at, ctx.correlation_id, ctx.causation_id)
        stored = await self._decide(conn, [command], meta)
        card_no = stored[-1].data["card_no"] if stored else None
        return {"application_id": payload.application_id, "card_no": card_no}

    def present(self, id_number: str) -> domain.PresentedId:
        """What the domain may know of an ID number: valid or not, and whose."""
        if not is_valid_id_number(id_number):
            return domain.PresentedId(valid=False, citizen_ref=None)
        pepper = self.settings.citizen_ref_pepper.get_secret_value()
        return domain.PresentedId(valid=True, citizen_ref=citizen_ref(pepper, id_number))

    async def _proxy(self, conn: asyncpg.Connection, holder_ref: str,
                     payload: CollectCard) -> domain.ProxyCredentials | None:
        """The proxy's particulars, encrypted under the holder's key: erasing the holder
        erases their proxy's record too."""
        if payload.proxy is None:
            return None
        try:
            id_number_enc, name_enc = await self.vault.encrypt_all(conn, holder_ref, [
                normalise_id_number(payload.proxy.id_number),
                normalise_name(payload.proxy.name)])
        except DataKeyDestroyedError as exc:
            raise SubjectErasedError from exc
        return domain.ProxyCredentials(
            presented=self.present(payload.proxy.id_number),
            authorisation_ref=payload.proxy.authorisation_ref,
            id_number_enc=id_number_enc,
            name_enc=name_enc,
        )

    # --- review.events ---------------------------------------------------------------------

    async def on_review_event(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
        await self.on_review_events(conn, [envelope])

    async def on_review_events(self, conn: asyncpg.Connection,
                               envelopes: Sequence[EventEnvelope]) -> None:
        """Approvals start production (other review events change nothing here), a
        partition's batch at once: the applications recorded in one statement and, with no
        production time, the new card numbers drawn in one more."""
        approvals = [(envelope, event) for envelope in envelopes
                     if isinstance(event := decode_followed(decoders.REVIEW, envelope),
                                   ReviewApproved)]
        if not approvals:
            return
        holders = await self.applications.record(
            conn, [(approved.application_id, envelope.citizen_ref)
                   for envelope, approved in approvals])
        card_nos = ([self._card_no(n) for n in await self.card_numbers.take(conn, len(approvals))]
                    if not self.settings.production_time else [None] * len(approvals))
        for (envelope, approved), card_no in zip(approvals, card_nos, strict=True):
            if holders[approved.application_id] != envelope.citizen_ref:
                raise Rejected("application_conflict",
                               f"application {approved.application_id} belongs to another"
                               " citizen")
            try:
                await self.start_production(conn, envelope, approved, card_no)
            except DomainError as exc:
                raise Rejected(exc.code, exc.message) from exc

    async def start_production(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, approved: ReviewApproved,
        card_no: str | None,
    ) -> None:
        """With `card_no` (no production time) the card is ready in the approval's own
        transaction; else a timer falls due when the decider says it is ready."""
        ref = envelope.citizen_ref
        commands: list[domain.IssuanceCommand] = [domain.StartProduction(
            application_id=approved.application_id, pickup_bureau=approved.pickup_bureau,
            old_card_no=approved.old_card_no)]
        if card_no is not None:
            commands.append(domain.FinishProduction(approved.application_id, card_no))
        meta = EventMeta(ref, self.clock(), envelope.correlation_id, str(envelope.event_id))
        for stored in await self._decide(conn, commands, meta):
            event = domain.decode(stored)
            if isinstance(event, CardProductionStarted) and self.settings.production_time:
                # The card is ready when the decider says; the timer falls due then.
                await self.timers.arm(conn, Timer(
                    key=event.application_id, citizen_ref=ref,
                    due_at=event.ready_by, correlation_id=stored.correlation_id,
                    causation_id=str(stored.event_id)))

    # --- the production timer --------------------------------------------------------------

    async def production_timer(self, pool: asyncpg.Pool) -> None:
        """Durable: timers live in the database, so a restart loses none."""
        while True:
            if not await self.finish_due_productions(pool, self.clock()):
                await asyncio.sleep(self.settings.issuance_timer_scan_seconds)

    async def finish_due_productions(self, pool: asyncpg.Pool, now: datetime) -> int:
        """Finish every production due by `now`; returns how many timers fired."""
        fired = 0
        while True:
            async with pool.acquire() as conn, conn.transaction():
                claimed = await self.timers.claim_due(conn, now, 1)
                if not claimed:
                    return fired
                [timer] = claimed
                structlog.contextvars.bind_contextvars(
                    citizen_ref=timer.citizen_ref, correlation_id=timer.correlation_id,
                    causation_id=timer.causation_id)
                try:
                    async with conn.transaction():
                        await self._finish(conn, timer)
                except Exception:
                    # Keep the timer (durable) but let the others run first.
                    log.exception("issuance.production_timer_failed",
                                  application_id=timer.key)
                    await self.timers.postpone(conn, timer.key,
                                               now + self.settings.timer_retry_delay)
                    continue
                await self.timers.disarm(conn, timer.key)
                fired += 1

    async def _finish(self, conn: asyncpg.Connection, timer: Timer) -> None:
        application_id = timer.key
        if await self.streams.erased(conn, timer.citizen_ref):
            log.info("issuance.production_void_erased", application_id=application_id)
            return  # the card of an erased citizen is never finished; the timer goes
        command = domain.FinishProduction(application_id, await self._new_card_no(conn))
        meta = EventMeta(timer.citizen_ref, self.clock(), timer.correlation_id,
                         timer.causation_id)
        await self._decide(conn, [command], meta)

    # --- the one path ----------------------------------------------------------------------

    async def _decide(
        self, conn: asyncpg.Connection, commands: Sequence[domain.IssuanceCommand],
        meta: EventMeta,
    ) -> list[EventEnvelope]:
        """Decide `commands` in turn for `meta.citizen_ref`, append, and log what happened."""
        context = domain.DecisionContext(now=meta.occurred_at, new_id=self.ids,
                                         production_time=self.settings.production_time)
        stored = await self.streams.apply(
            conn, lambda state: domain.decide_all(commands, state, context), meta)
        _log_outcome(stored)
        return stored

    async def _new_card_no(self, conn: asyncpg.Connection) -> str:
        [number] = await self.card_numbers.take(conn, 1)
        return self._card_no(number)

    def _card_no(self, number: int) -> str:
        s = self.settings
        return domain.format_card_no(s.issuance_card_no_prefix, s.issuance_region_code,
                                     number, s.issuance_card_no_digits)


def _log_outcome(envelopes: Sequence[EventEnvelope]) -> None:
    for e in envelopes:
        match e.type:
            case "CardIssued":
                log.info("issuance.card_issued", card_no=mask_card_no(e.data["card_no"]))
            case "CardProductionStarted":
                log.info("issuance.production_started",
                         application_id=e.data["application_id"], ready_by=e.data["ready_by"])
            case "CardReissued":
                log.info("issuance.reissued", application_id=e.data["application_id"],
                         new_card_no=mask_card_no(e.data["new_card_no"]))
            case "CardReadyForPickup":
                log.info("issuance.ready_for_pickup", application_id=e.data["application_id"],
                         pickup_bureau=e.data["pickup_bureau"])
            case "CardCollected":
                log.info("issuance.collected", application_id=e.data["application_id"],
                         bureau_id=e.data["bureau_id"], by_proxy=e.data["by_proxy"])
