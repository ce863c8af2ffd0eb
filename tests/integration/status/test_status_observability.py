"""What an operator sees of the status projection: `/metrics` on the query API's port with the
projection lag, and the trace id an event carries in the projection's log line (issue 14)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from cardctl.top import parse, total
from services.status.adapters import status_follower
from services.status.settings import StatusSettings
from shared.contracts import issuance
from shared.settings import CardDeskSettings
from tests.builders import CitizenStreams
from tests.integration.status.test_status_service import Running
from tests.support import eventually, isolated_status_service, unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def running(settings: CardDeskSettings) -> AsyncIterator[Running]:
    suffix = unique("obs")
    status_settings = StatusSettings(
        kafka_bootstrap=settings.kafka_bootstrap, database_url=settings.database_url,
        status_topic_prefix=f"{suffix}.")
    async with isolated_status_service(settings, status_settings,
                                       schema=suffix) as (service, http, producer):
        yield Running(service, http, producer, status_settings)


async def test_the_projection_logs_what_it_applied_with_the_trace_it_carries(
    running: Running, capsys: pytest.CaptureFixture[str],
) -> None:
    trace_id = uuid.uuid4().hex
    citizen = CitizenStreams()
    issued = citizen.emit("issuance.events", issuance.CardIssued(card_no="A01234567"))

    await running.producer.send_and_wait(
        running.topic("issuance.events"), value=issued.to_bytes(),
        key=citizen.citizen_ref.encode(),
        headers=[("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01".encode())])
    await running.wait_for_status(citizen.citizen_ref, "ACTIVE")

    lines = capsys.readouterr().out.splitlines()
    applied = [line for line in lines if "events.applied" in line and trace_id in line]
    assert len(applied) == 1, lines[-20:]
    assert "CardIssued" in applied[0]


async def test_metrics_are_served_on_the_query_api_port_with_the_projection_lag(
    running: Running,
) -> None:
    citizen = CitizenStreams()
    issued = citizen.emit("issuance.events", issuance.CardIssued(card_no="A07654321"))
    schema = running.service.kit.schema
    await running.send("issuance.events", issued)
    await running.wait_for_status(citizen.citizen_ref, "ACTIVE")

    async def lag_reported() -> bool:  # open, like /health: no API key asked
        response = await running.http.get("/metrics", headers={"Authorization": ""})
        assert response.status_code == 200
        return any(labels == {"service": schema, "topic": "issuance.events"}
                   for labels, _ in parse(response.text).get(
                       "carddesk_projection_lag_seconds", ()))

    await eventually(lag_reported)
    response = await running.http.get("/metrics", headers={"Authorization": ""})
    samples = parse(response.text)
    assert total(samples, "carddesk_events_applied_total", consumer=status_follower(
                 "issuance.events"), topic=running.topic("issuance.events")) >= 1
    assert total(samples, "carddesk_db_pool_connections", service=schema) >= 1
