"""Issuance service entry point: `python -m services.issuance.main`.

Wires the routes table (issuance.commands), the review.events follower and the durable
production timer onto a ServiceRuntime.
"""

from __future__ import annotations

from datetime import UTC, datetime

from services.issuance import adapters
from services.issuance.handlers import IssuanceHandlers
from services.issuance.settings import IssuanceSettings
from shared.channels import ChannelRegistry
from shared.commands import CommandIntake, CommandRoute
from shared.consumer import EventConsumer
from shared.contracts import KNOWN_EVENT_TYPES
from shared.contracts.issuance import CollectCard, ImportCard
from shared.crypto import MasterKeys, Vault
from shared.erasure import erase_route
from shared.production import MASTER_KEY, PEPPER, SEALING_KEY
from shared.runtime import ServiceRuntime, run_service

# The secret settings this service reads; production refuses their shipped values.
SECRETS = (PEPPER, MASTER_KEY, SEALING_KEY)

def clock() -> datetime:
    return datetime.now(UTC)


def routes(handlers: IssuanceHandlers) -> dict[str, CommandRoute]:
    return {
        "ImportCard": CommandRoute(ImportCard, handlers.import_card, bureau_only=True,
                                   accepted_message="card recorded"),
        "CollectCard": CommandRoute(CollectCard, handlers.collect_card, bureau_only=True,
                                    accepted_message="card handed over"),
        "EraseSubject": erase_route(handlers.erasure),
    }


class IssuanceService:
    """Holds what exists only once the runtime has a pool and a producer."""

    def __init__(self, runtime: ServiceRuntime, settings: IssuanceSettings) -> None:
        self.runtime = runtime
        self.barrier = runtime.barrier([settings.issuance_review_events_topic],
                                       group=settings.issuance_consumer_group)
        self.settings = settings
        vault = Vault(settings.issuance_schema, MasterKeys.from_settings(settings))
        self.handlers = IssuanceHandlers(settings, vault, clock)
        self._intake: CommandIntake | None = None
        self._review: EventConsumer | None = None

    @property
    def intake(self) -> CommandIntake:
        assert self._intake is not None, "the runtime has not started"
        return self._intake

    @property
    def review_follower(self) -> EventConsumer:
        assert self._review is not None, "the runtime has not started"
        return self._review

    async def ready(self) -> None:
        rt, s = self.runtime, self.settings
        self._intake = CommandIntake(
            rt.pool, rt.schema, ChannelRegistry.from_file(s.channels_file),
            routes(self.handlers), rt.dead_letters, clock, settings=s, barrier=self.barrier,
        )
        self._review = EventConsumer(
            rt.pool, rt.schema, "review.events", self.handlers.on_review_event,
            rt.dead_letters, known_types=KNOWN_EVENT_TYPES["review.events"], settings=s,
        )

    async def purge_stored_replies(self) -> None:
        await self.intake.purge_loop()

    async def production_timer(self) -> None:
        await self.handlers.run_production_timer(self.runtime.pool)


def build(settings: IssuanceSettings | None = None) -> ServiceRuntime:
    settings = settings or IssuanceSettings()
    runtime = ServiceRuntime("issuance", settings, secrets=SECRETS,
                             extra_ddl=adapters.ddl(settings.issuance_schema))
    runtime.schema = settings.issuance_schema  # "issuance" unless a test isolates itself
    service = IssuanceService(runtime, settings)
    runtime.on_ready(service.ready)
    runtime.subscribe(settings.issuance_commands_topic, lambda: service.intake,
                      group=settings.issuance_consumer_group,
                      description="ImportCard, CollectCard and EraseSubject from bureau channels")
    runtime.subscribe(settings.issuance_review_events_topic,
                      lambda: service.review_follower,
                      group=settings.issuance_consumer_group,
                      description="ReviewApproved starts a card's production")
    runtime.background(service.production_timer)
    runtime.background(service.purge_stored_replies)
    return runtime


if __name__ == "__main__":
    run_service(build(), default_health_port=8084)
