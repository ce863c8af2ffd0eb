"""Who may query the status API: a channel's or an auditor's bearer key (401 otherwise), a
well-formed citizen_ref (400), a rate limit per caller (429); /health and the docs are open."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg
import httpx
import pytest

from services.status.api import QueryBackend, create_app
from services.status.callers import ApiKeys, Caller
from services.status.settings import DEV_AUDITOR_API_KEY, StatusSettings
from shared.channels import ChannelRegistry
from shared.ratelimit import RateLimiter

REF = "ab" * 32
CHANNEL_KEY = "dev-api-key-wechat-oa"  # config/channels.dev.json


class FakePool:
    """Enough of a pool for an empty read model: the access checks come before it."""

    def __init__(self) -> None:
        self.queries = 0

    async def fetch(self, *_args: Any) -> list[Any]:
        self.queries += 1
        return []

    async def fetchval(self, *_args: Any) -> Any:
        self.queries += 1
        return None

    async def fetchrow(self, *_args: Any) -> Any:
        self.queries += 1
        return None

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[FakePool]:
        yield self


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def kafka_down() -> dict[str, str | None]:
    return {"database": None, "kafka": "does not answer"}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool() -> FakePool:
    return FakePool()


@pytest.fixture
async def api(pool: FakePool, clock: Clock) -> AsyncIterator[httpx.AsyncClient]:
    settings = StatusSettings(api_rate_limit_per_second=1.0, api_rate_limit_burst=3)
    backend = QueryBackend(settings, "status", lambda: cast(asyncpg.Pool, pool), kafka_down,
                           limiter=RateLimiter(1.0, 3, clock=clock))
    transport = httpx.ASGITransport(app=create_app(backend))
    async with httpx.AsyncClient(transport=transport, base_url="http://status") as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("route", ["card", "timeline"])
@pytest.mark.parametrize("headers", [
    pytest.param({}, id="no-header"),
    pytest.param(bearer("not-a-key"), id="unknown-key"),
    pytest.param(bearer(CHANNEL_KEY + "x"), id="a-key-with-a-suffix"),
    pytest.param(bearer(CHANNEL_KEY[:-1]), id="a-key-prefix"),
    pytest.param({"Authorization": f"Basic {CHANNEL_KEY}"}, id="wrong-scheme"),
    pytest.param({"Authorization": "Bearer "}, id="empty-bearer"),
    pytest.param({"Authorization": "dev-secret-wechat-oa"}, id="a-signing-secret"),
    pytest.param(bearer("dev-secret-wechat-oa"), id="a-signing-secret-as-bearer"),
])
async def test_a_caller_without_a_known_key_gets_401_and_no_data(
        api: httpx.AsyncClient, pool: FakePool, route: str, headers: dict[str, str]) -> None:
    response = await api.get(f"/v1/citizens/{REF}/{route}", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["code"] == "unauthenticated"
    assert pool.queries == 0


@pytest.mark.parametrize("key", [CHANNEL_KEY, "dev-api-key-bureau-counter", DEV_AUDITOR_API_KEY])
async def test_a_channel_key_and_the_auditor_key_may_read(
        api: httpx.AsyncClient, key: str) -> None:
    response = await api.get(f"/v1/citizens/{REF}/timeline", headers=bearer(key))
    assert response.status_code == 200
    assert response.json() == {"citizen_ref": REF, "entries": []}
    card = await api.get(f"/v1/citizens/{REF}/card", headers=bearer(key))
    assert card.status_code == 404  # authorised; there is just no row


async def test_the_bearer_scheme_is_case_insensitive(api: httpx.AsyncClient) -> None:
    response = await api.get(f"/v1/citizens/{REF}/timeline",
                             headers={"Authorization": f"bearer {CHANNEL_KEY}"})
    assert response.status_code == 200


@pytest.mark.parametrize("ref", [
    "AB" * 32,  # upper case
    "ab" * 31,  # too short
    "ab" * 33,  # too long
    "zz" * 32,  # not hex
    ("ab" * 32) + "%0A",  # a trailing newline
    ("ab" * 32)[:-1] + "%00",  # a NUL byte
    "%27%20OR%201%3D1--",
])
async def test_a_malformed_citizen_ref_gets_400_before_any_query(
        api: httpx.AsyncClient, pool: FakePool, ref: str) -> None:
    response = await api.get(f"/v1/citizens/{ref}/card", headers=bearer(CHANNEL_KEY))
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_citizen_ref"
    assert pool.queries == 0


async def test_a_caller_past_its_rate_limit_gets_429_and_others_are_not_affected(
        api: httpx.AsyncClient, clock: Clock) -> None:
    url = f"/v1/citizens/{REF}/timeline"
    statuses = [(await api.get(url, headers=bearer(CHANNEL_KEY))).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = await api.get(url, headers=bearer(CHANNEL_KEY))
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    # Another caller has a bucket of its own; time refills the first one's.
    assert (await api.get(url, headers=bearer(DEV_AUDITOR_API_KEY))).status_code == 200
    clock.now += 1.0
    assert (await api.get(url, headers=bearer(CHANNEL_KEY))).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/docs/asyncapi", "/docs/asyncapi.json"])
async def test_health_and_the_docs_need_no_key(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path)
    assert response.status_code != 401
    if path != "/health":
        assert response.status_code == 200


def test_a_channel_without_an_api_key_cannot_authenticate() -> None:
    channels = ChannelRegistry.from_file(StatusSettings().channels_file)
    keys = ApiKeys.of(channels, {"auditor-1": "k1"})
    assert keys.caller("Bearer k1") == Caller("auditor-1", "auditor")
    assert keys.caller(f"Bearer {CHANNEL_KEY}") == Caller("wechat-oa", "channel")
    assert ApiKeys([("", Caller("x", "channel"))]).caller("Bearer ") is None
