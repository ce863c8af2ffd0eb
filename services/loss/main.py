"""Wiring of the loss service: routes, subscriptions, the expiry loop.

`python -m services.loss.main` runs it; `build(settings)` gives the runtime to run in-process.
"""

from __future__ import annotations

from datetime import UTC, datetime

from services.loss.adapters import loss_ddl
from services.loss.handlers import LossHandlers
from services.loss.settings import LossSettings
from shared.channels import ChannelRegistry
from shared.commands import CommandIntake, CommandRoute
from shared.consumer import BatchConsumer, EventConsumer
from shared.contracts import KNOWN_EVENT_TYPES
from shared.contracts.loss import CancelLoss, ReportLoss
from shared.erasure import erase_route
from shared.production import MASTER_KEY, SEALING_KEY, SESSION_PUBLIC_KEY
from shared.runtime import ServiceRuntime, run_service
from shared.topics import command_topic

SERVICE = "loss"
ISSUANCE_EVENTS = "issuance.events"
REVIEW_EVENTS = "review.events"


# The secret settings this service reads; production refuses their shipped values.
SECRETS = (MASTER_KEY, SESSION_PUBLIC_KEY, SEALING_KEY)

def now() -> datetime:
    return datetime.now(UTC)


def routes(handlers: LossHandlers) -> dict[str, CommandRoute]:
    return {
        "ReportLoss": CommandRoute(ReportLoss, handlers.report_loss,
                                   accepted_message="loss reported; the card is frozen"),
        "CancelLoss": CommandRoute(CancelLoss, handlers.cancel_loss,
                                   accepted_message="loss cancelled; the card works again"),
        "EraseSubject": erase_route(handlers.erasure),
    }


class _Wired:
    """What exists only once the runtime has a pool and a producer."""

    intake: CommandIntake
    issuance: EventConsumer
    review: EventConsumer


def build(
    settings: LossSettings | None = None,
    *,
    schema: str = SERVICE,
    consumer_group: str | None = None,
) -> ServiceRuntime:
    """The loss runtime. Tests pass their own `schema` and `consumer_group` to stay isolated."""
    settings = settings or LossSettings()
    runtime = ServiceRuntime(SERVICE, settings, extra_ddl=loss_ddl(schema), secrets=SECRETS)
    runtime.schema = schema
    handlers = LossHandlers(settings, schema, runtime.events_topic, now)
    barrier = runtime.barrier([ISSUANCE_EVENTS, REVIEW_EVENTS], group=consumer_group)
    wired = _Wired()

    async def wire() -> None:
        wired.intake = CommandIntake(
            runtime.pool, schema, ChannelRegistry.from_file(settings.channels_file),
            routes(handlers), runtime.dead_letters, now, settings=settings, barrier=barrier,
        )
        wired.issuance = EventConsumer(
            runtime.pool, schema, f"{SERVICE}:{ISSUANCE_EVENTS}", handlers.on_issuance_event,
            runtime.dead_letters, known_types=KNOWN_EVENT_TYPES[ISSUANCE_EVENTS],
            settings=settings,
        )
        wired.review = EventConsumer(
            runtime.pool, schema, f"{SERVICE}:{REVIEW_EVENTS}", handlers.on_review_event,
            runtime.dead_letters, known_types=KNOWN_EVENT_TYPES[REVIEW_EVENTS],
            settings=settings,
        )

    async def expiry_loop() -> None:
        await handlers.expiry_loop(runtime.pool)

    def on_commands() -> BatchConsumer:
        return wired.intake

    def on_issuance() -> BatchConsumer:
        return wired.issuance

    def on_review() -> BatchConsumer:
        return wired.review

    async def purge_stored_replies() -> None:
        await wired.intake.purge_loop()

    runtime.on_ready(wire)
    runtime.background(expiry_loop)
    runtime.background(purge_stored_replies)
    runtime.subscribe(command_topic(SERVICE), on_commands, group=consumer_group,
                      description="ReportLoss, CancelLoss; EraseSubject (bureau only)")
    runtime.subscribe(ISSUANCE_EVENTS, on_issuance, group=consumer_group,
                      description="which card each citizen holds; a reissue closes the loss")
    runtime.subscribe(REVIEW_EVENTS, on_review, group=consumer_group,
                      description="reissue applications: a pending one blocks cancellation")
    return runtime


if __name__ == "__main__":
    run_service(build(), default_health_port=8082)
