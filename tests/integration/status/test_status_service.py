"""The status service in-process against the real Kafka and PostgreSQL: events in on the four
topics, the card row and the timeline out over HTTP, duplicates and bad messages handled."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from services.status.settings import StatusSettings
from shared.contracts import EVENT_TOPICS, auth, issuance, loss
from shared.envelope import EventEnvelope, chain_hash
from shared.service import Service
from shared.settings import CardDeskSettings
from shared.topics import all_topics
from tests.builders import CitizenStreams
from tests.support import eventually, isolated_status_service, read_topic, unique

pytestmark = pytest.mark.integration



@dataclass
class Running:
    service: Service[StatusSettings]
    http: httpx.AsyncClient
    producer: AIOKafkaProducer
    settings: StatusSettings

    def topic(self, contract_topic: str) -> str:
        return self.settings.consumed_topics()[contract_topic]

    async def send(self, contract_topic: str, envelope: EventEnvelope, *,
                   value: bytes | None = None) -> None:
        await self.producer.send_and_wait(self.topic(contract_topic),
                                          value=value or envelope.to_bytes(),
                                          key=envelope.citizen_ref.encode())

    async def card(self, citizen_ref: str) -> httpx.Response:
        return await self.http.get(f"/v1/citizens/{citizen_ref}/card")

    async def timeline(self, citizen_ref: str) -> list[dict[str, Any]]:
        response = await self.http.get(f"/v1/citizens/{citizen_ref}/timeline")
        assert response.status_code == 200
        body = response.json()
        assert body["citizen_ref"] == citizen_ref
        entries: list[dict[str, Any]] = body["entries"]
        return entries

    async def wait_for_status(self, citizen_ref: str, status: str) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            response = await self.card(citizen_ref)
            if response.status_code != 200:
                return None
            row: dict[str, Any] = response.json()
            return row if row["status"] == status else None

        await eventually(check, timeout_s=45)
        row = await check()
        assert row is not None
        return row

    async def wait_for_timeline(self, citizen_ref: str, *events: EventEnvelope,
                                ) -> list[dict[str, Any]]:
        """The timeline once all `events` are in it (topics are consumed independently)."""
        wanted = {str(e.event_id) for e in events}

        async def check() -> bool:
            entries = await self.timeline(citizen_ref)
            return wanted <= {e["event_id"] for e in entries}

        await eventually(check, timeout_s=45)
        return await self.timeline(citizen_ref)


@pytest.fixture(scope="module")
async def running(settings: CardDeskSettings) -> AsyncIterator[Running]:
    suffix = unique("st")
    status_settings = StatusSettings(
        kafka_bootstrap=settings.kafka_bootstrap,
        database_url=settings.database_url,
        status_topic_prefix=f"{suffix}.",
    )
    async with isolated_status_service(settings, status_settings,
                                       schema=suffix) as (service, http, producer):
        yield Running(service, http, producer, status_settings)


async def test_events_from_three_topics_make_a_formal_loss_visible_over_http(
    running: Running,
) -> None:
    c = CitizenStreams(step=timedelta(seconds=1))
    issued = c.emit("issuance.events", issuance.CardIssued(card_no="A01234567"))
    authorised = c.emit("auth.events", auth.ElectronicCardAuthorized(session_id="s1",
                                                                      channel="wechat-oa"))
    reported = c.emit("loss.events", loss.LossReported(
        loss_id="l1", kind="formal", card_no="A01234567", expires_at=None,
        financial_freeze=True, channel="wechat-oa"))
    for topic, envelope in (("issuance.events", issued), ("auth.events", authorised),
                            ("loss.events", reported)):
        await running.send(topic, envelope)

    entries = await running.wait_for_timeline(c.citizen_ref, issued, authorised, reported)
    row = await running.wait_for_status(c.citizen_ref, "LOST")

    assert row["e_card_status"] == "UNAVAILABLE"
    assert row["card_no_masked"] == "*****4567"
    assert row["loss_kind"] == "formal"
    assert set(row) == {"citizen_ref", "card_no_masked", "status", "e_card_status", "loss_kind",
                        "loss_expires_at", "application_id", "application_status",
                        "pickup_bureau", "updated_at", "last_event_id"}
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert [e["type"] for e in entries] == ["CardIssued", "ElectronicCardAuthorized",
                                            "LossReported"]
    assert "A01234567" not in json.dumps(entries)


async def test_a_redelivered_event_adds_no_timeline_entry(running: Running) -> None:
    c = CitizenStreams(step=timedelta(seconds=1))
    issued = c.emit("issuance.events", issuance.CardIssued(card_no="A01234567"))
    await running.send("issuance.events", issued)
    await running.wait_for_status(c.citizen_ref, "ACTIVE")

    await running.send("issuance.events", issued)
    temporary = c.emit("loss.events", loss.LossReported(
        loss_id="l1", kind="temporary", card_no="A01234567",
        expires_at=c.now + timedelta(days=15), financial_freeze=True, channel="app"))
    await running.send("loss.events", temporary)
    # Same topic and key as the duplicate: once the marker is in, the duplicate was handled.
    marker = c.emit("issuance.events", issuance.CardIssued(card_no="A01234567"))
    await running.send("issuance.events", marker)

    await running.wait_for_status(c.citizen_ref, "TEMP_LOST")
    entries = await running.wait_for_timeline(c.citizen_ref, marker)
    assert [e["event_id"] for e in entries].count(str(issued.event_id)) == 1
    assert len(entries) == 3


async def test_a_tampered_or_unknown_event_is_dead_lettered_and_the_next_one_applied(
    running: Running, settings: CardDeskSettings,
) -> None:
    c = CitizenStreams(step=timedelta(seconds=1))
    good = c.emit("loss.events", loss.LossReported(
        loss_id="l1", kind="formal", card_no=None, expires_at=None, financial_freeze=True,
        channel="app"))
    body = good.to_json_dict()
    body["data"]["kind"] = "temporary"  # changed after sealing: the hash no longer matches
    tampered = json.dumps(body).encode()
    unknown = c.emit("loss.events", loss.LossCancelled(loss_id="l1"))
    unknown_body = unknown.to_json_dict() | {"type": "LossForgotten"}
    del unknown_body["hash"]
    unknown_value = json.dumps(unknown_body | {
        "hash": chain_hash(unknown_body["prev_hash"], unknown_body)}).encode()

    await running.send("loss.events", good, value=tampered)
    await running.send("loss.events", unknown, value=unknown_value)
    await running.send("loss.events", good)

    await running.wait_for_status(c.citizen_ref, "LOST")
    dlq = f"{running.topic('loss.events')}.dlq"
    key = c.citizen_ref.encode()
    records = await read_topic(settings.kafka_bootstrap, dlq,
                               until=lambda rs: sum(r.key == key for r in rs) >= 2)
    codes = sorted(dict(r.headers)["x-dlq-code"].decode() for r in records if r.key == key)
    assert codes == ["bad_hash", "unknown_event_type"]
    entries = await running.timeline(c.citizen_ref)
    assert [e["type"] for e in entries] == ["LossReported"]


async def test_an_unknown_citizen_is_not_found(running: Running) -> None:
    response = await running.card(uuid.uuid4().hex * 2)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_health_is_ok_when_database_and_kafka_answer(running: Running) -> None:
    # Ok once every consumer has its partitions, which on a loaded machine takes a while.
    async def ok() -> bool:
        return (await running.http.get("/health")).status_code == 200

    await eventually(ok, timeout_s=45)
    response = await running.http.get("/health")
    assert response.json()["status"] == "ok"
    assert set(response.json()["checks"].values()) == {"ok"}


async def test_the_asyncapi_document_lists_every_topic_of_the_contract(
    running: Running,
) -> None:
    response = await running.http.get("/docs/asyncapi.json")
    assert response.status_code == 200
    channels = {ch["address"] for ch in response.json()["channels"].values()}
    assert channels >= {t.name for t in all_topics(6, [])}
    assert "channel.replies.{channel_id}" in channels  # one reply topic per channel
    assert set(EVENT_TOPICS.values()) <= channels
    html = await running.http.get("/docs/asyncapi")
    assert html.status_code == 200
    assert "AsyncApiStandalone" in html.text
