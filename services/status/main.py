"""The status service, declared: four projections of the contract's event topics, and the
query API served around its runtime. `python -m services.status.main` serves on
`CARDDESK_HTTP_HOST:CARDDESK_HTTP_PORT`; tests `shared.service.bootstrap(SPEC, ...)` and
serve `query_app` of it in-process.

No commands and no decider: one follower per event topic projects into `card_status` and
`card_timeline` (rebuilt out of process by `services/status/rebuild.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import uvloop
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.status.adapters import SERVICE, StatusWriter, status_ddl
from services.status.api import QueryBackend, create_app
from services.status.settings import StatusSettings
from shared.checked import CheckedFollow
from shared.consumer import Inbound
from shared.envelope import EventEnvelope
from shared.logging import configure_logging
from shared.metrics import exposition, projection_applied
from shared.production import UnsafeConfigurationError, exit_refused, refuse_unsafe_configuration
from shared.service import Follow, Kit, Service, ServiceSpec, Wiring, bootstrap
from shared.webapp import runtime_lifespan, serve


def wire(kit: Kit[StatusSettings]) -> Wiring:
    writer = StatusWriter(kit.schema)
    return Wiring(follows=[
        Follow(topic, writer.handler_for(topic), f"Projects {topic} into card_status",
               source=source, batch_handler=writer.batch_handler_for(topic),
               on_applied=projected(kit.schema, topic), log_applied=True,
               checked=CheckedFollow(writer, topic))
        for topic, source in kit.settings.consumed_topics().items()
    ])


def projected(schema: str, topic: str) -> Callable[[Sequence[tuple[Inbound, EventEnvelope]]],
                                                   None]:
    """Projection lag: the newest occurred_at applied from `topic`."""

    def applied(events: Sequence[tuple[Inbound, EventEnvelope]]) -> None:
        newest = max(envelope.occurred_at for _, envelope in events)
        projection_applied(schema, topic, newest.timestamp())

    return applied


def shipped_in_use(settings: StatusSettings) -> list[str]:
    """The status service reads no shared secret; its own are the auditors' API keys."""
    return ["CARDDESK_AUDITOR_API_KEYS"] if settings.shipped_auditor_keys() else []


SPEC = ServiceSpec(
    # /health is served on the query API's port (CARDDESK_HTTP_PORT), not a port of its own.
    name=SERVICE, settings=StatusSettings, wire=wire, health_port=8080, ddl=status_ddl,
    shipped_in_use=shipped_in_use,
)


def query_app(service: Service[StatusSettings]) -> Starlette:
    """The query API (DESIGN section 7) and `/metrics`; its lifespan runs the service."""
    runtime = service.runtime
    backend = QueryBackend(service.kit.settings, service.kit.schema, lambda: runtime.pool,
                           runtime.problems)
    app = create_app(backend, lifespan=runtime_lifespan(runtime))
    app.router.routes.append(Route("/metrics", metrics, methods=["GET"]))
    return app


async def metrics(_request: Request) -> Response:
    """`/metrics`: the process's `carddesk_*` series for Prometheus."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)


def main() -> None:
    settings = StatusSettings()
    try:  # before the query API is made, which reads the channels file for the API keys
        refuse_unsafe_configuration(settings, SPEC.secrets,
                                    shipped_in_use=shipped_in_use(settings))
    except UnsafeConfigurationError as error:
        exit_refused(error)
    service = bootstrap(SPEC, settings, schema=settings.status_schema)
    configure_logging("status", settings.log_level)
    service.runtime.claim_process()
    uvloop.run(serve(query_app(service), settings.http_host, settings.http_port))


if __name__ == "__main__":
    main()
