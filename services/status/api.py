"""The query API (DESIGN section 7): card status, timeline, health and the AsyncAPI docs.

The citizen routes need `Authorization: Bearer <api_key>` of a channel or an auditor (401
otherwise), a well-formed citizen_ref (400) and a caller within its rate limit (429);
`/health` and the docs are open.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import asyncpg
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from services.status.adapters import fetch_card, fetch_timeline
from services.status.asyncapi import ASYNCAPI_STATIC_PATH, asyncapi_html, asyncapi_json
from services.status.callers import ApiKeys, Caller
from services.status.settings import StatusSettings
from shared.channels import ChannelRegistry
from shared.contracts.common import CITIZEN_REF_PATTERN
from shared.health import summarise
from shared.ratelimit import RateLimiter
from shared.webapp import Lifespan

log = structlog.get_logger()

STATIC_DIR = Path(__file__).resolve().parent / "static"

Endpoint = Callable[[Request, Caller, str], Awaitable[Response]]

# A citizen_ref is HMAC-SHA256 in lower-case hex (shared/identity.py).
CITIZEN_REF = re.compile(CITIZEN_REF_PATTERN)


class QueryBackend:
    """What the routes need from the running service: the schema of its read models, its
    pool and its health checks (database, Kafka and every consumer, each None when fine)."""

    def __init__(self, settings: StatusSettings, schema: str, pool: Callable[[], asyncpg.Pool],
                 problems: Callable[[], Awaitable[Mapping[str, str | None]]], *,
                 keys: ApiKeys | None = None, limiter: RateLimiter | None = None) -> None:
        self.settings = settings
        self.schema = schema
        self.pool = pool
        self.problems = problems
        self.keys = keys or ApiKeys.of(
            ChannelRegistry.from_file(settings.channels_file),
            {auditor: key.get_secret_value()
             for auditor, key in settings.auditor_api_keys.items()})
        self.limiter = limiter or RateLimiter(settings.api_rate_limit_per_second,
                                              settings.api_rate_limit_burst)


def _error(status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


def guarded(backend: QueryBackend, endpoint: Endpoint) -> Callable[[Request], Awaitable[Response]]:
    """A citizen route behind the three checks, in this order: who calls (401), whether they
    may call now (429), whether they asked for a citizen_ref at all (400)."""

    async def route(request: Request) -> Response:
        caller = backend.keys.caller(request.headers.get("authorization"))
        if caller is None:
            log.warning("api.unauthenticated", route=request.url.path.rsplit("/", 1)[-1])
            return _error(401, "unauthenticated", "a channel's or an auditor's API key is"
                          " required: Authorization: Bearer <api_key>",
                          {"WWW-Authenticate": 'Bearer realm="carddesk"'})
        wait = backend.limiter.allow(caller.caller_id)
        if wait is not None:
            log.warning("api.rate_limited", caller=caller.caller_id)
            return _error(429, "rate_limited", "too many requests from this caller",
                          {"Retry-After": str(max(1, math.ceil(wait)))})
        citizen_ref = request.path_params["citizen_ref"]
        if not CITIZEN_REF.fullmatch(citizen_ref):
            return _error(400, "malformed_citizen_ref",
                          "a citizen_ref is 64 lower-case hexadecimal characters")
        return await endpoint(request, caller, citizen_ref)

    return route


def create_app(backend: QueryBackend, lifespan: Lifespan | None = None) -> Starlette:
    settings, schema = backend.settings, backend.schema

    async def card(_request: Request, _caller: Caller, citizen_ref: str) -> Response:
        row = await fetch_card(backend.pool(), schema, citizen_ref)
        if row is None:
            return _error(404, "not_found", "no card status for this citizen")
        return JSONResponse(row)

    async def timeline(_request: Request, _caller: Caller, citizen_ref: str) -> Response:
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
            Route("/v1/citizens/{citizen_ref}/card", guarded(backend, card), methods=["GET"]),
            Route("/v1/citizens/{citizen_ref}/timeline", guarded(backend, timeline),
                  methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/docs/asyncapi", docs_html, methods=["GET"]),
            Route("/docs/asyncapi.json", docs_json, methods=["GET"]),
            Mount(ASYNCAPI_STATIC_PATH, StaticFiles(directory=STATIC_DIR / "asyncapi"),
                  name="asyncapi-static"),
        ],
        lifespan=lifespan,
    )
