"""/health says 503, and which check failed, when a consumer stops or the database is gone:
a service that cannot do its work must not look healthy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.status.settings import StatusSettings
from shared.service import Service
from shared.settings import CardDeskSettings
from tests.support import eventually, isolated_status_service, unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def running(settings: CardDeskSettings) -> AsyncIterator[tuple[Service[StatusSettings],
                                                                      httpx.AsyncClient]]:
    suffix = unique("hc")
    status_settings = StatusSettings(
        kafka_bootstrap=settings.kafka_bootstrap, database_url=settings.database_url,
        status_topic_prefix=f"{suffix}.", health_timeout_seconds=2.0)
    async with isolated_status_service(settings, status_settings,
                                       schema=suffix) as (service, http, _):
        yield service, http


async def health(http: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await http.get("/health")
    return response.status_code, response.json()


async def test_health_lists_every_consumer_and_is_ok_once_all_consume(
    running: tuple[Service[StatusSettings], httpx.AsyncClient],
) -> None:
    service, http = running

    async def ok() -> bool:
        return (await health(http))[0] == 200

    await eventually(ok, timeout_s=45)
    _, body = await health(http)
    assert set(body["checks"]) == {"database", "kafka", *(
        f"consumer:{topic}" for topic in service.kit.settings.consumed_topics().values())}


async def test_a_stopped_consumer_makes_health_503_naming_it(
    running: tuple[Service[StatusSettings], httpx.AsyncClient],
) -> None:
    service, http = running
    watch = service.runtime.watches[0]
    await watch.subscriber().stop()
    code, body = await health(http)
    assert code == 503
    assert body["status"] == "unavailable"
    assert body["checks"][f"consumer:{watch.topic}"] == "stopped"
    assert body["checks"]["database"] == "ok"


async def test_a_database_that_cannot_answer_makes_health_503(
    running: tuple[Service[StatusSettings], httpx.AsyncClient],
) -> None:
    service, http = running
    service.runtime.pool.terminate()  # close() would wait for the relay to let go
    code, body = await health(http)
    assert code == 503
    assert body["checks"]["database"] != "ok"
