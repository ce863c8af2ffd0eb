"""What an operator sees of the loss service: each metric moves when its event happens, and a
trace sent with a command travels on the events it caused (issue 14)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cardctl.top import Samples, parse, total
from shared.metrics import metrics_asgi
from shared.tracing import export_to, trace_id_in
from tests.integration.loss.conftest import CHANNEL, Harness
from tests.integration.loss.test_loss_service import citizen_with_card
from tests.support import eventually

pytestmark = pytest.mark.integration

TRACE_ID = uuid.uuid4().hex
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()


async def scrape() -> Samples:
    """`/metrics` as the runtime serves it."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=metrics_asgi()),
                                 base_url="http://loss") as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans recorded from here on, as with CARDDESK_OTLP_ENDPOINT set."""
    exporter = InMemorySpanExporter()
    export_to("loss", SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def test_an_accepted_command_moves_every_metric_of_its_path(harness: Harness) -> None:
    service = harness.schema
    before = await scrape()
    citizen_ref, _ = await citizen_with_card(harness)

    reply = await harness.command(
        "ReportLoss", {"session_token": harness.token(citizen_ref), "kind": "temporary"})
    assert (reply["status"], reply["code"]) == ("accepted", "accepted"), reply

    def moved(after: Samples, name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    async def published() -> bool:
        # The relay counts a record once Kafka acknowledged it, which may come after the
        # channel has read the reply: both counters are awaited.
        now = await scrape()
        return (moved(now, "carddesk_events_published_total", service=service,
                      type="LossReported") >= 1
                and moved(now, "carddesk_replies_published_total", service=service) >= 1)

    await eventually(published)
    after = await scrape()
    assert moved(after, "carddesk_commands_received_total", service=service,
                 type="ReportLoss") == 1
    assert moved(after, "carddesk_commands_replied_total", service=service, type="ReportLoss",
                 status="accepted", code="accepted") == 1
    assert moved(after, "carddesk_command_latency_seconds_count", service=service,
                 type="ReportLoss") == 1
    assert moved(after, "carddesk_events_appended_total", service=service,
                 type="LossReported") == 1
    assert moved(after, "carddesk_replies_published_total", service=service) >= 1
    assert moved(after, "carddesk_consumer_batch_size_count", topic="loss.commands") >= 1
    assert moved(after, "carddesk_barrier_wait_seconds_count", status="caught_up") >= 1
    assert moved(after, "carddesk_events_applied_total", topic="issuance.events") >= 1
    assert total(after, "carddesk_db_pool_max", service=service) == 10
    assert total(after, "carddesk_process_resident_memory_bytes") > 0
    # The runtime's start times every collection.
    assert {labels["generation"] for labels, _ in after["carddesk_gc_pause_seconds_count"]} == {
        "0", "1", "2"}


async def test_the_sampler_reports_the_outbox_backlog_and_each_partitions_lag(
    harness: Harness,
) -> None:
    service = harness.schema
    await harness.db.execute(
        f"INSERT INTO {service}.outbox (topic, key, value, created_at)"
        " VALUES ('nowhere.held', NULL, '\\x7b7d', now() - interval '1 hour')")
    # The relay cannot publish it while we hold its row: take it off the outbox once sampled.
    try:
        await harness.runtime.sampler.sample()
        now = await scrape()
    finally:
        await harness.db.execute(f"DELETE FROM {service}.outbox WHERE topic = 'nowhere.held'")

    assert total(now, "carddesk_outbox_unsent_rows", service=service) >= 1
    assert total(now, "carddesk_outbox_oldest_unsent_age_seconds", service=service) >= 3000
    lag = [labels for labels, _ in now["carddesk_consumer_lag_messages"]
           if labels["service"] == service]
    assert {labels["topic"] for labels in lag} == {"loss.commands", "issuance.events",
                                                   "review.events"}
    assert len({labels["partition"] for labels in lag}) == harness.settings.partitions


async def test_a_hostile_command_type_is_counted_as_unknown_and_mints_no_series(
    harness: Harness,
) -> None:
    service, invented = harness.schema, f"Evil{uuid.uuid4().hex}"
    before = await scrape()

    reply = await harness.command(invented, {})

    assert (reply["status"], reply["code"]) == ("rejected", "unknown_command_type")

    def moved(after: Samples, name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    async def dead_lettered() -> bool:  # the reply goes out before the DLQ write
        return moved(await scrape(), "carddesk_dlq_messages_total", topic="loss.commands",
                     code="unknown_command_type") == 1

    await eventually(dead_lettered)
    after = await scrape()
    assert invented not in json.dumps(after)
    assert moved(after, "carddesk_commands_received_total", service=service,
                 type="unknown") == 1
    assert moved(after, "carddesk_commands_replied_total", service=service, type="unknown",
                 status="rejected", code="unknown_command_type") == 1


async def test_a_forged_command_counts_as_a_dead_letter_with_its_reason(harness: Harness) -> None:
    before = await scrape()
    value = json.dumps({"request_id": str(uuid.uuid4()), "channel": CHANNEL,
                        "issued_at": datetime.now(UTC).isoformat(), "type": "ReportLoss",
                        "payload": {}}).encode()

    await harness.producer.send_and_wait(
        "loss.commands", value=value, key=b"forged",
        headers=[("x-channel-id", CHANNEL.encode()), ("x-signature", b"0" * 64)])

    async def dead_lettered() -> bool:
        return total(await scrape(), "carddesk_dlq_messages_total", topic="loss.commands",
                     code="bad_signature") == total(
            before, "carddesk_dlq_messages_total", topic="loss.commands",
            code="bad_signature") + 1

    await eventually(dead_lettered)


async def test_the_trace_sent_with_a_command_travels_on_the_events_it_caused(
    harness: Harness, spans: InMemorySpanExporter,
) -> None:
    citizen_ref, card_no = await citizen_with_card(harness)
    token = harness.token(citizen_ref)
    seen = len(harness.loss_events.records)

    reply = await harness.command("ReportLoss", {"session_token": token, "kind": "temporary"},
                                  headers=[("traceparent", TRACEPARENT)])
    assert reply["status"] == "accepted", reply

    await harness.loss_events.wait_for(
        lambda e: e["citizen_ref"] == citizen_ref and e["type"] == "LossReported", after=seen)
    record = next(r for r in harness.loss_events.records[seen:]
                  if json.loads(r.value)["citizen_ref"] == citizen_ref)
    assert trace_id_in({k: bytes(v) for k, v in record.headers}) == TRACE_ID
    # The command's span is in that trace, and names nothing personal.
    ours = [s for s in spans.get_finished_spans()
            if f"{s.context.trace_id:032x}" == TRACE_ID]
    assert [s.name for s in ours] == ["ReportLoss process"]
    attributes = json.dumps(dict(ours[0].attributes or {}))
    assert "ReportLoss" in attributes
    for personal in (citizen_ref, token, card_no):
        assert personal not in attributes
