"""Wiring of the review service: `python -m services.review.main`."""

from __future__ import annotations

from datetime import UTC, datetime

from services.review.adapters import review_ddl
from services.review.handlers import ReviewHandlers
from services.review.settings import ReviewSettings
from shared.channels import ChannelRegistry
from shared.commands import CommandIntake, CommandRoute
from shared.consumer import BatchConsumer, EventConsumer
from shared.contracts import KNOWN_EVENT_TYPES
from shared.contracts.review import DecideReview, SubmitReissueApplication
from shared.crypto import MasterKeys, Vault
from shared.erasure import erase_route
from shared.production import MASTER_KEY, SEALING_KEY, SESSION_PUBLIC_KEY
from shared.runtime import ServiceRuntime, run_service
from shared.tokens import TokenVerifier
from shared.topics import command_topic

SERVICE = "review"
LOSS_CONSUMER = "review.loss-events"


# The secret settings this service reads; production refuses their shipped values.
SECRETS = (MASTER_KEY, SESSION_PUBLIC_KEY, SEALING_KEY)

def _now() -> datetime:
    return datetime.now(UTC)


def build(settings: ReviewSettings | None = None, *, group: str | None = None) -> ServiceRuntime:
    """The review service, ready to start; `group` overrides the Kafka consumer group (tests)."""
    settings = settings or ReviewSettings()
    runtime = ServiceRuntime(SERVICE, settings, extra_ddl=review_ddl(SERVICE),
                             secrets=SECRETS)
    wired: dict[str, BatchConsumer] = {}
    barrier = runtime.barrier([settings.event_topic("loss")], group=group)
    intakes: list[CommandIntake] = []

    async def wire() -> None:
        handlers = ReviewHandlers(
            schema=runtime.schema,
            events_topic=runtime.events_topic,
            verifier=TokenVerifier.from_settings(settings),
            vault=Vault(runtime.schema, MasterKeys.from_settings(settings)),
            rule=settings.auto_approval_rule(),
        )
        routes = {
            "SubmitReissueApplication": CommandRoute(
                SubmitReissueApplication, handlers.submit,
                accepted_message="reissue application received",
            ),
            "DecideReview": CommandRoute(
                DecideReview, handlers.decide, bureau_only=True,
                accepted_message="review decision recorded",
            ),
            "EraseSubject": erase_route(handlers.erasure),
        }
        intake = CommandIntake(
            runtime.pool, runtime.schema, ChannelRegistry.from_file(settings.channels_file),
            routes, runtime.dead_letters, _now, settings=settings, barrier=barrier,
        )
        loss_events = EventConsumer(
            runtime.pool, runtime.schema, LOSS_CONSUMER, handlers.on_loss_event,
            runtime.dead_letters,
            known_types=KNOWN_EVENT_TYPES[settings.event_topic("loss")],
            settings=settings,
        )
        intakes.append(intake)
        wired["commands"] = intake
        wired["loss.events"] = loss_events

    async def purge_stored_replies() -> None:
        await intakes[0].purge_loop()

    runtime.on_ready(wire)
    runtime.background(purge_stored_replies)
    runtime.subscribe(
        command_topic(SERVICE), lambda: wired["commands"], group=group,
        description="SubmitReissueApplication; DecideReview and EraseSubject (bureau only)",
    )
    runtime.subscribe(
        settings.event_topic("loss"), lambda: wired["loss.events"], group=group,
        description="Loss cases: whether a formal loss is in force; cancellation withdraws",
    )
    return runtime


if __name__ == "__main__":
    run_service(build(), default_health_port=8083)
