"""Wiring of the status service: four event consumers and the query API in one process.

`python -m services.status.main` serves on `CARDDESK_HTTP_HOST:CARDDESK_HTTP_PORT`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import structlog
import uvicorn
import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.status.adapters import StatusWriter, status_ddl
from services.status.api import QueryBackend, create_app
from services.status.settings import StatusSettings
from shared.consumer import BatchConsumer, EventConsumer, Inbound
from shared.contracts import KNOWN_EVENT_TYPES
from shared.envelope import EventEnvelope
from shared.logging import configure_logging
from shared.metrics import exposition, projection_applied
from shared.production import UnsafeConfigurationError, exit_refused, refuse_unsafe_configuration
from shared.runtime import (
    STOP_STEP_TIMEOUT_S,
    ServiceRuntime,
    stop_step,
    supervise,
)

log = structlog.get_logger()


def shipped_in_use(settings: StatusSettings) -> list[str]:
    """The status service reads no shared secret; its own are the auditors' API keys."""
    return ["CARDDESK_AUDITOR_API_KEYS"] if settings.shipped_auditor_keys() else []


class StatusService:
    """The runtime (pool, producer, DLQ, broker) and the ASGI app that serves the queries."""

    def __init__(self, settings: StatusSettings) -> None:
        self.settings = settings
        schema = settings.status_schema
        self.runtime = ServiceRuntime("status", settings, extra_ddl=status_ddl(schema),
                                      shipped_in_use=shipped_in_use(settings))
        # The read models live in their own schema; tests use a throwaway one.
        self.runtime.schema = schema
        self.writer = StatusWriter(schema)
        self.consumers: dict[str, EventConsumer] = {}
        self._broker_task: asyncio.Task[None] | None = None
        self.runtime.on_ready(self._build_consumers)
        for contract_topic, topic in settings.consumed_topics().items():
            self.runtime.subscribe(topic, self._handler(topic),
                                   group=settings.status_consumer_group,
                                   title=f"{topic}:status",
                                   description=f"Projects {contract_topic} into card_status")
        backend = QueryBackend(settings, lambda: self.runtime.pool, self.runtime.problems)
        self.app: Starlette = create_app(backend, lifespan=self._lifespan)
        self.app.router.routes.append(Route("/metrics", metrics, methods=["GET"]))

    async def _build_consumers(self) -> None:
        for contract_topic, topic in self.settings.consumed_topics().items():
            self.consumers[topic] = EventConsumer(
                self.runtime.pool,
                self.settings.status_schema,
                self.settings.status_consumer_group,
                self.writer.handler_for(contract_topic),
                self.runtime.dead_letters,
                known_types=KNOWN_EVENT_TYPES[contract_topic],
                settings=self.settings,
                batch_handler=self.writer.batch_handler_for(contract_topic),
                on_applied=self._projected(contract_topic),
                log_applied=True,
            )

    def _projected(self, topic: str) -> Callable[[Sequence[tuple[Inbound, EventEnvelope]]], None]:
        """Projection lag: the newest occurred_at applied from `topic`."""
        schema = self.settings.status_schema

        def applied(events: Sequence[tuple[Inbound, EventEnvelope]]) -> None:
            newest = max(envelope.occurred_at for _, envelope in events)
            projection_applied(schema, topic, newest.timestamp())

        return applied

    def _handler(self, topic: str) -> Callable[[], BatchConsumer]:
        def current() -> BatchConsumer:
            return self.consumers[topic]

        return current

    async def start(self) -> None:
        """Pool, schema, producer and DLQ first; the consumers then join their group in the
        background, so the read model is served (and /health says 503) while Kafka is slow."""
        await self.runtime.start()
        self._broker_task = asyncio.create_task(
            supervise("status.broker", self.runtime.broker.start))

    async def stop(self) -> None:
        if self._broker_task is not None:
            self._broker_task.cancel()
            await asyncio.wait({self._broker_task}, timeout=STOP_STEP_TIMEOUT_S)
            self._broker_task = None
        # A consumer stuck retrying a dead database must not hold the stop for ever.
        await stop_step("broker", self.runtime.broker.stop(), 2 * STOP_STEP_TIMEOUT_S)
        await self.runtime.stop()

    @asynccontextmanager
    async def _lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def serve(self) -> None:
        config = uvicorn.Config(self.app, host=self.settings.http_host,
                                port=self.settings.http_port, log_config=None)
        await uvicorn.Server(config).serve()


async def metrics(_request: Request) -> Response:
    """`/metrics`: the process's `carddesk_*` series for Prometheus."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)


def build(settings: StatusSettings | None = None) -> StatusService:
    return StatusService(settings or StatusSettings())


def main() -> None:
    settings = StatusSettings()
    try:  # before build(), which reads the channels file for the API keys
        refuse_unsafe_configuration(settings, (), shipped_in_use=shipped_in_use(settings))
    except UnsafeConfigurationError as error:
        exit_refused(error)
    service = build(settings)
    configure_logging("status", service.settings.log_level)
    service.runtime.arm_watchdog()
    uvloop.run(service.serve())


if __name__ == "__main__":
    main()
