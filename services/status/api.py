"""The query API (DESIGN section 7): card status, timeline, health and the AsyncAPI docs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import asyncpg
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.status.adapters import fetch_card, fetch_timeline
from services.status.asyncapi import ASYNCAPI_STATIC_PATH, asyncapi_html, asyncapi_json
from services.status.settings import StatusSettings

log = structlog.get_logger()

STATIC_DIR = Path(__file__).resolve().parent / "static"

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


class QueryBackend:
    """What the routes need from the running service: its pool and a Kafka probe."""

    def __init__(self, settings: StatusSettings, pool: Callable[[], asyncpg.Pool],
                 kafka_ping: Callable[[float], Awaitable[bool]]) -> None:
        self.settings = settings
        self.pool = pool
        self.kafka_ping = kafka_ping

    async def database_answers(self) -> bool:
        try:
            pool = self.pool()
            value = await asyncio.wait_for(pool.fetchval("SELECT 1"),
                                           self.settings.health_timeout_seconds)
        except (AssertionError, TimeoutError, OSError, asyncpg.PostgresError,
                asyncpg.InterfaceError):
            return False
        return bool(value == 1)

    async def kafka_answers(self) -> bool:
        try:
            return await self.kafka_ping(self.settings.health_timeout_seconds)
        except Exception:  # a probe reports, it never raises
            log.warning("health.kafka_probe_failed", exc_info=True)
            return False


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
        database, kafka = await asyncio.gather(backend.database_answers(), backend.kafka_answers())
        checks: dict[str, Any] = {"database": "ok" if database else "down",
                                  "kafka": "ok" if kafka else "down"}
        if database and kafka:
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
            Mount(ASYNCAPI_STATIC_PATH, StaticFiles(directory=STATIC_DIR / "asyncapi"),
                  name="asyncapi-static"),
        ],
        lifespan=lifespan,
    )
