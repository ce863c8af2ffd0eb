"""The query API (DESIGN section 7): card status, timeline, health and the AsyncAPI docs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from services.status.adapters import fetch_card, fetch_timeline
from services.status.asyncapi import asyncapi_html, asyncapi_json
from services.status.settings import StatusSettings
from shared.health import summarise

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


class QueryBackend:
    """What the routes need from the running service: its pool and its health checks
    (database, Kafka and every consumer, each None when fine)."""

    def __init__(self, settings: StatusSettings, pool: Callable[[], asyncpg.Pool],
                 problems: Callable[[], Awaitable[Mapping[str, str | None]]]) -> None:
        self.settings = settings
        self.pool = pool
        self.problems = problems


def create_app(backend: QueryBackend, lifespan: Lifespan | None = None) -> Starlette:
    settings, schema = backend.settings, backend.settings.status_schema

    async def card(request: Request) -> JSONResponse:
        citizen_ref = request.path_params["citizen_ref"]
        row = await fetch_card(backend.pool(), schema, citizen_ref)
        if row is None:
            return JSONResponse({"code": "not_found", "message": "no card status for this citizen"},
                                status_code=404)
        return JSONResponse(row)

    async def timeline(request: Request) -> JSONResponse:
        citizen_ref = request.path_params["citizen_ref"]
        entries = await fetch_timeline(backend.pool(), schema, citizen_ref)
        return JSONResponse({"citizen_ref": citizen_ref, "entries": entries})

    async def health(_request: Request) -> JSONResponse:
        healthy, checks = summarise(await backend.problems())
        if healthy:
            return JSONResponse({"status": "ok", "checks": checks})
        return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)

    async def docs_html(_request: Request) -> HTMLResponse:
        return HTMLResponse(asyncapi_html(settings))

    async def docs_json(_request: Request) -> JSONResponse:
        return JSONResponse(asyncapi_json(settings))

    return Starlette(
        routes=[
            Route("/v1/citizens/{citizen_ref}/card", card, methods=["GET"]),
            Route("/v1/citizens/{citizen_ref}/timeline", timeline, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/docs/asyncapi", docs_html, methods=["GET"]),
            Route("/docs/asyncapi.json", docs_json, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
