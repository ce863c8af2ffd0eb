"""Issuance's application layer: the command handlers, the review.events follower and the
production timer. Each loads the card stream, decides in the domain and appends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import datetime

import asyncpg
import structlog
from pydantic import ValidationError

from services.issuance import adapters, domain
from services.issuance.settings import IssuanceSettings
from shared.application import handle_command
from shared.commands import CommandContext
from shared.consumer import Rejected, describe_validation_error
from shared.contracts.issuance import ISSUANCE_EVENTS, CollectCard, ImportCard
from shared.contracts.review import REVIEW_EVENTS, ReviewApproved, ReviewEvent
from shared.contracts.upcasters import UPCASTERS
from shared.crypto import DataKeyDestroyedError, Vault
from shared.envelope import EventEnvelope
from shared.erasure import ErasableStreams
from shared.errors import DomainError, SubjectErasedError
from shared.events import EventDecoder, EventMeta
from shared.eventstore import PostgresEventStore
from shared.identity import (
    citizen_ref,
    is_valid_id_number,
    normalise_id_number,
    normalise_name,
)
from shared.locks import citizen_namespace, lock_citizens
from shared.masking import mask_card_no

log = structlog.get_logger()

decode_issuance: EventDecoder[domain.IssuanceEvent] = EventDecoder(ISSUANCE_EVENTS, UPCASTERS)
decode_review: EventDecoder[ReviewEvent] = EventDecoder(REVIEW_EVENTS, UPCASTERS)

Clock = Callable[[], datetime]


class IssuanceHandlers:
    """Everything issuance does in response to a message or a timer, bound to its settings."""

    def __init__(self, settings: IssuanceSettings, vault: Vault, clock: Clock) -> None:
        self.settings = settings
        self.schema = settings.issuance_schema
        self.events_topic = settings.issuance_events_topic
        self.vault = vault
        self.clock = clock
        self.erasure = ErasableStreams(
            vault=vault, store_for=self._store, stream_id=domain.stream_id,
            decode=decode_issuance, initial=domain.INITIAL, evolve=domain.evolve,
            is_erased=domain.is_erased,
        )

    # --- helpers ---------------------------------------------------------------------------

    def present(self, id_number: str) -> domain.PresentedId:
        """What the domain may know of an ID number: valid or not, and whose."""
        if not is_valid_id_number(id_number):
            return domain.PresentedId(valid=False, citizen_ref=None)
        pepper = self.settings.citizen_ref_pepper.get_secret_value()
        return domain.PresentedId(valid=True, citizen_ref=citizen_ref(pepper, id_number))

    def _store(self, conn: asyncpg.Connection) -> PostgresEventStore:
        return PostgresEventStore(conn, self.schema, self.events_topic)

    async def _decide(
        self,
        conn: asyncpg.Connection,
        ref: str,
        commands: Sequence[domain.IssuanceCommand],
        meta: EventMeta,
    ) -> list[EventEnvelope]:
        return await handle_command(
            self._store(conn),
            domain.stream_id(ref),
            decode=decode_issuance,
            initial=domain.INITIAL,
            evolve=domain.evolve,
            decide=lambda state: domain.decide_all(commands, state),
            meta=meta,
        )

    async def _new_card_no(self, conn: asyncpg.Connection) -> str:
        number = await adapters.next_card_number(conn, self.schema)
        s = self.settings
        return domain.format_card_no(s.issuance_card_no_prefix, s.issuance_region_code, number,
                                     s.issuance_card_no_digits)

    def _log_outcome(self, envelopes: Sequence[EventEnvelope]) -> None:
        for e in envelopes:
            match e.type:
                case "CardIssued":
                    log.info("issuance.card_issued", card_no=mask_card_no(e.data["card_no"]))
                case "CardProductionStarted":
                    log.info("issuance.production_started",
                             application_id=e.data["application_id"],
                             ready_by=e.data["ready_by"])
                case "CardReissued":
                    log.info("issuance.reissued", application_id=e.data["application_id"],
                             new_card_no=mask_card_no(e.data["new_card_no"]))
                case "CardReadyForPickup":
                    log.info("issuance.ready_for_pickup",
                             application_id=e.data["application_id"],
                             pickup_bureau=e.data["pickup_bureau"])
                case "CardCollected":
                    log.info("issuance.collected", application_id=e.data["application_id"],
                             bureau_id=e.data["bureau_id"], by_proxy=e.data["by_proxy"])

    # --- commands --------------------------------------------------------------------------

    async def import_card(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: ImportCard
    ) -> dict[str, object]:
        ref = domain.require_valid(self.present(payload.id_number))
        structlog.contextvars.bind_contextvars(citizen_ref=ref)
        meta = EventMeta(ref, ctx.received_at, ctx.correlation_id, ctx.causation_id)
        stored = await self._decide(conn, ref, [domain.RecordImportedCard(payload.card_no)], meta)
        self._log_outcome(stored)
        return {"citizen_ref": ref, "already_imported": not stored}

    async def collect_card(
        self, conn: asyncpg.Connection, ctx: CommandContext, payload: CollectCard
    ) -> dict[str, object]:
        ref = await adapters.holder_of(conn, self.schema, payload.application_id)
        if ref is None:
            raise domain.UnknownApplicationError
        structlog.contextvars.bind_contextvars(citizen_ref=ref)
        # The review.events follower holds the same lock while it starts production.
        await lock_citizens(conn, citizen_namespace(self.schema), [ref])
        proxy = None
        if payload.proxy is not None:
            try:  # under the holder's key: erasing the holder erases their proxy's record too
                id_number_enc, name_enc = await self.vault.encrypt_all(conn, ref, [
                    normalise_id_number(payload.proxy.id_number),
                    normalise_name(payload.proxy.name)])
                proxy = domain.ProxyCredentials(
                    presented=self.present(payload.proxy.id_number),
                    authorisation_ref=payload.proxy.authorisation_ref,
                    id_number_enc=id_number_enc,
                    name_enc=name_enc,
                )
            except DataKeyDestroyedError as exc:
                raise SubjectErasedError from exc
        command = domain.HandOverCard(
            application_id=payload.application_id,
            bureau_id=payload.bureau_id,
            holder_ref=ref,
            presented=self.present(payload.presented_id_number),
            proxy=proxy,
            bureaus=ctx.channel.bureaus,
        )
        meta = EventMeta(ref, ctx.received_at, ctx.correlation_id, ctx.causation_id)
        stored = await self._decide(conn, ref, [command], meta)
        self._log_outcome(stored)
        card_no = stored[-1].data["card_no"] if stored else None
        return {"application_id": payload.application_id, "card_no": card_no}

    # --- review.events ---------------------------------------------------------------------

    async def on_review_event(self, conn: asyncpg.Connection, envelope: EventEnvelope) -> None:
        try:
            event = decode_review(envelope)
        except ValidationError as exc:
            raise Rejected("malformed_event", describe_validation_error(exc)) from exc
        if not isinstance(event, ReviewApproved):
            return  # only an approval starts anything here
        if await self.erasure.erased(conn, envelope.citizen_ref):
            log.info("issuance.ignored_for_erased_subject", event_type=envelope.type)
            return
        try:
            await self.start_production(conn, envelope, event)
        except DomainError as exc:
            raise Rejected(exc.code, exc.message) from exc

    async def start_production(
        self, conn: asyncpg.Connection, envelope: EventEnvelope, approved: ReviewApproved
    ) -> None:
        ref = envelope.citizen_ref
        holder = await adapters.record_application(conn, self.schema, approved.application_id, ref)
        if holder != ref:
            raise Rejected("application_conflict",
                           f"application {approved.application_id} belongs to another citizen")
        now = self.clock()
        production_time = self.settings.production_time
        commands: list[domain.IssuanceCommand] = [
            domain.StartProduction(
                application_id=approved.application_id,
                pickup_bureau=approved.pickup_bureau,
                old_card_no=approved.old_card_no,
                ready_by=now + production_time,
            )
        ]
        if not production_time:
            commands.append(domain.FinishProduction(approved.application_id,
                                                    await self._new_card_no(conn)))
        meta = EventMeta(ref, now, envelope.correlation_id, str(envelope.event_id))
        stored = await self._decide(conn, ref, commands, meta)
        self._log_outcome(stored)
        started = [e for e in stored if e.type == "CardProductionStarted"]
        if production_time and started:
            await adapters.schedule_production(conn, self.schema, adapters.ProductionTimer(
                application_id=approved.application_id,
                citizen_ref=ref,
                due_at=now + production_time,
                correlation_id=envelope.correlation_id,
                causation_id=str(started[0].event_id),
            ))

    # --- the production timer --------------------------------------------------------------

    async def finish_due_productions(self, pool: asyncpg.Pool, now: datetime) -> int:
        """Finish every production due by `now`; returns how many timers fired."""
        fired = 0
        while True:
            async with pool.acquire() as conn, conn.transaction():
                timer = await adapters.claim_due_timer(conn, self.schema, now)
                if timer is None:
                    return fired
                structlog.contextvars.bind_contextvars(
                    citizen_ref=timer.citizen_ref, correlation_id=timer.correlation_id,
                    causation_id=timer.causation_id)
                try:
                    async with conn.transaction():
                        await self._finish(conn, timer)
                except Exception:
                    # Keep the timer (durable) but let the others run first.
                    log.exception("issuance.production_timer_failed",
                                  application_id=timer.application_id)
                    await adapters.postpone_timer(conn, self.schema, timer.application_id,
                                                  now + self.settings.timer_retry_delay)
                    continue
                await adapters.delete_timer(conn, self.schema, timer.application_id)
                fired += 1

    async def _finish(self, conn: asyncpg.Connection, timer: adapters.ProductionTimer) -> None:
        if await self.erasure.erased(conn, timer.citizen_ref):
            log.info("issuance.production_void_erased", application_id=timer.application_id)
            return  # the card of an erased citizen is never finished; the timer goes
        command = domain.FinishProduction(timer.application_id, await self._new_card_no(conn))
        meta = EventMeta(timer.citizen_ref, self.clock(), timer.correlation_id,
                         timer.causation_id)
        self._log_outcome(await self._decide(conn, timer.citizen_ref, [command], meta))

    async def run_production_timer(self, pool: asyncpg.Pool) -> None:
        while True:
            if not await self.finish_due_productions(pool, self.clock()):
                await asyncio.sleep(self.settings.issuance_timer_scan_seconds)
