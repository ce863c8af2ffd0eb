"""The metrics registry: names, labels free of personal data and of sender-chosen values, and
the counters the kernel moves without Kafka or PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from cardctl.top import parse, total
from shared.consumer import DeadLetters, Inbound
from shared.metrics import (
    REGISTRY,
    UNKNOWN_TYPE,
    command_type_label,
    exposition,
    observe_command_latency,
    projection_applied,
)
from shared.outbox import OutboxRelay
from tests.support import OutboxRows

# Every label any carddesk_ series may have: none can hold a citizen or free text.
ALLOWED_LABELS = {"service", "type", "status", "code", "topic", "group", "partition",
                  "consumer", "what", "generation", "le"}


def scraped() -> dict[str, list[tuple[dict[str, str], float]]]:
    body, content_type = exposition()
    assert content_type.startswith("text/plain")
    return parse(body.decode())


def test_every_series_is_named_carddesk_and_labelled_from_closed_sets() -> None:
    projection_applied("unit", "loss.events", time.time())
    families = list(REGISTRY.collect())

    assert families, "the registry is empty"
    for family in families:
        assert family.name.startswith("carddesk_"), family.name
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, (family.name, sample.labels)
    names = {family.name for family in families}
    assert {"carddesk_process_cpu_seconds", "carddesk_process_resident_memory_bytes",
            "carddesk_commands_received", "carddesk_command_latency_seconds",
            "carddesk_consumer_lag_messages", "carddesk_outbox_unsent_rows",
            "carddesk_dlq_messages", "carddesk_db_pool_in_use",
            "carddesk_projection_lag_seconds"} <= names


def test_a_command_type_no_route_knows_is_counted_as_unknown_not_as_itself() -> None:
    routes = {"ReportLoss": object()}

    assert command_type_label("ReportLoss", routes) == "ReportLoss"
    assert command_type_label("Evil" + "x" * 500, routes) == UNKNOWN_TYPE
    assert command_type_label(None, routes) == UNKNOWN_TYPE


def test_latency_from_a_clock_ahead_of_ours_counts_as_zero_and_no_timestamp_as_nothing() -> None:
    def fastest_bucket() -> float:
        return total(scraped(), "carddesk_command_latency_seconds_bucket",
                     service="unit-latency", type="ReportLoss", le="0.005")

    before = fastest_bucket()
    observe_command_latency("unit-latency", "ReportLoss", int(time.time() * 1000) + 60_000)
    observe_command_latency("unit-latency", "ReportLoss", None)

    assert fastest_bucket() == before + 1
    assert total(scraped(), "carddesk_command_latency_seconds_count",
                 service="unit-latency") == before + 1


def test_the_projection_lag_grows_from_the_last_applied_events_time() -> None:
    projection_applied("unit-lag", "review.events", time.time() - 30)
    projection_applied("unit-lag", "review.events", time.time() - 90)  # older: ignored

    lag = total(scraped(), "carddesk_projection_lag_seconds", service="unit-lag")

    assert 29 <= lag < 60


class _Producer:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_and_wait(self, topic: str, **_: Any) -> None:
        self.sent.append(topic)

    async def send(self, topic: str, **_: Any) -> asyncio.Future[None]:
        self.sent.append(topic)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_dead_letter_is_counted_by_its_original_topic_and_code() -> None:
    def count() -> float:
        return total(scraped(), "carddesk_dlq_messages_total", topic="unit.commands",
                     code="bad_signature")

    before = count()
    producer = _Producer()
    msg = Inbound(topic="unit.commands", partition=0, offset=7, key=None, value=b"{}")

    await DeadLetters(producer).send(msg, "bad_signature", "x-signature does not match")

    assert producer.sent == ["unit.commands.dlq"]
    assert count() == before + 1


async def test_the_relay_counts_published_events_by_type_and_the_rest_as_replies() -> None:
    def figures() -> tuple[float, float]:
        now = scraped()
        return (total(now, "carddesk_events_published_total", service="unit_relay",
                      type="LossReported"),
                total(now, "carddesk_replies_published_total", service="unit_relay"))

    before = figures()
    event_headers = json.dumps([["event-type", "LossReported"], ["event-id", "e1"]])
    rows = [
        {"position": 1, "topic": "loss.events", "key": b"r", "value": b"{}",
         "headers": event_headers},
        {"position": 2, "topic": "loss.events", "key": b"r", "value": b"{}",
         "headers": event_headers},
        {"position": 3, "topic": "channel.replies.wechat-oa", "key": b"q", "value": b"{}",
         "headers": "[]"},
    ]
    relay = OutboxRelay(None, _Producer(), "unit_relay")

    sent = await relay.publish_pending(OutboxRows(rows))

    assert sent == 3
    after = figures()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)
