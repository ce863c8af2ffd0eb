"""The projection rebuild against the real Kafka and PostgreSQL, with the status service running
in-process on an isolated schema and isolated topics: the swapped-in tables hold what the live
ones held (and what a pure fold gives), and the running service carries on with them."""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import structlog
from aiokafka import AIOKafkaProducer

from services.status.adapters import card_record, status_follower
from services.status.projection import CardStatusRow, project
from services.status.rebuild import (
    CARD_STATUS_COLUMNS,
    TIMELINE_COLUMNS,
    Progress,
    RebuildError,
    RebuildSettings,
    rebuild,
)
from services.status.settings import StatusSettings
from services.status.timeline import timeline_entry
from shared.contracts import EVENT_TOPICS, auth, issuance, loss, review
from shared.envelope import EventEnvelope
from shared.events import DomainEvent
from shared.service import Service
from shared.settings import CardDeskSettings
from tests.builders import CitizenStreams
from tests.support import eventually, isolated_status_service, unique

pytestmark = pytest.mark.integration

class Citizen(CitizenStreams):
    """A fresh citizen whose events are a second apart, each with the topic it goes on."""

    def __init__(self) -> None:
        super().__init__(step=timedelta(seconds=1))

    def event(self, topic: str, event: DomainEvent) -> tuple[str, EventEnvelope]:
        return topic, self.emit(topic, event)

    def journey(self, steps: int, start: int = 0) -> list[tuple[str, EventEnvelope]]:
        """Events `start` to `steps` of a loss-to-pickup journey (each stream gapless)."""
        app = f"app-{uuid.uuid4().hex[:8]}"
        makers: list[Callable[[], tuple[str, EventEnvelope]]] = [
            lambda: self.event("issuance.events", issuance.CardIssued(card_no="A01234567")),
            lambda: self.event("auth.events", auth.ElectronicCardAuthorized(
                session_id="s1", channel="wechat-oa")),
            lambda: self.event("loss.events", loss.LossReported(
                loss_id="l1", kind="formal", card_no="A01234567", expires_at=None,
                financial_freeze=True, channel="wechat-oa")),
            lambda: self.event("review.events", review.ReissueApplied(
                application_id=app, loss_id="l1", old_card_no="A01234567",
                address="enc:v1:AAAA", phone="enc:v1:BBBB", photo_ref="enc:v1:CCCC",
                pickup_bureau="bureau-001", channel="wechat-oa")),
            lambda: self.event("review.events", review.ReviewApproved(
                application_id=app, reviewer_id="r1", pickup_bureau="bureau-001",
                old_card_no="A01234567")),
            lambda: self.event("issuance.events", issuance.CardReissued(
                application_id=app, new_card_no="S440300000001", old_card_no="A01234567")),
            lambda: self.event("issuance.events", issuance.CardReadyForPickup(
                application_id=app, pickup_bureau="bureau-001", card_no="S440300000001")),
        ]
        return [make() for make in makers[start:steps]]


@dataclass
class Isolated:
    """The in-process status service on its own schema and topics, and what was sent."""

    service: Service[StatusSettings]
    http: httpx.AsyncClient
    producer: AIOKafkaProducer
    settings: RebuildSettings
    sent: list[tuple[str, EventEnvelope]] = field(default_factory=list)

    async def send(self, events: list[tuple[str, EventEnvelope]]) -> None:
        for topic, envelope in events:
            await self.producer.send_and_wait(self.settings.consumed_topics()[topic],
                                              value=envelope.to_bytes(),
                                              key=envelope.citizen_ref.encode())
            self.sent.append((topic, envelope))

    async def send_raw(self, topic: str, value: bytes, key: str,
                       partition: int | None = None) -> int:
        """Sends as a (dishonest) producer would; the partition it went to."""
        metadata = await self.producer.send_and_wait(self.settings.consumed_topics()[topic],
                                                     value=value, key=key.encode(),
                                                     partition=partition)
        return int(metadata.partition)

    async def all_applied(self) -> None:
        """Wait until the timeline holds every event sent (over the query API)."""
        wanted: dict[str, set[str]] = {}
        for _, envelope in self.sent:
            wanted.setdefault(envelope.citizen_ref, set()).add(str(envelope.event_id))

        async def check() -> bool:
            for ref, ids in wanted.items():
                response = await self.http.get(f"/v1/citizens/{ref}/timeline")
                if not ids <= {e["event_id"] for e in response.json()["entries"]}:
                    return False
            return True

        await eventually(check, timeout_s=60)

    def pure_fold(self) -> tuple[dict[str, tuple[Any, ...]], set[tuple[Any, ...]]]:
        """The rows `project` and `timeline_entry` give for everything sent."""
        rows: dict[str, CardStatusRow] = {}
        timeline: set[tuple[Any, ...]] = set()
        for topic, envelope in self.sent:
            rows[envelope.citizen_ref] = project(rows.get(envelope.citizen_ref), envelope)
            timeline.add(tuple(timeline_entry(envelope, topic).model_dump().values()))
        return {ref: comparable(card_record(row)) for ref, row in rows.items()}, timeline


def comparable(record: tuple[Any, ...]) -> tuple[Any, ...]:
    """A status row with its sub-states parsed (jsonb comes back normalised)."""
    return (*record[:-1], json.loads(record[-1]))


@dataclass
class Tables:
    status: dict[str, tuple[Any, ...]]
    timeline: set[tuple[Any, ...]]
    processed: set[tuple[str, str]]  # (consumer, message_id) of the status followers
    names: set[str]


async def read_tables(settings: CardDeskSettings, schema: str) -> Tables:
    conn = await asyncpg.connect(settings.database_url)
    try:
        status = await conn.fetch(
            f"SELECT {', '.join(CARD_STATUS_COLUMNS)} FROM {schema}.card_status")
        timeline = await conn.fetch(
            f"SELECT {', '.join(TIMELINE_COLUMNS)} FROM {schema}.card_timeline")
        processed = await conn.fetch(
            f"SELECT consumer, message_id FROM {schema}.processed WHERE consumer = ANY($1)",
            [status_follower(topic) for topic in EVENT_TOPICS.values()])
        names = await conn.fetch(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind IN ('r', 'i')", schema)
    finally:
        await conn.close()
    return Tables(
        status={r["citizen_ref"]: comparable(tuple(r.values())) for r in status},
        timeline={tuple(r.values()) for r in timeline},
        processed={(r["consumer"], r["message_id"]) for r in processed},
        names={r["relname"] for r in names},
    )


@pytest.fixture
async def isolated(settings: CardDeskSettings) -> AsyncIterator[Isolated]:
    suffix = unique("rb")
    rebuild_settings = RebuildSettings(
        kafka_bootstrap=settings.kafka_bootstrap,
        database_url=settings.database_url,
        status_schema=suffix,
        status_topic_prefix=f"{suffix}.",
        rebuild_batch_rows=7,  # several COPY batches even for a few events
        rebuild_swap_max_lag=0,
        # Two load processes even for a few events: every test here goes through the split.
        rebuild_processes=2,
        rebuild_split_min_events=0,
    )
    # The service's schema is the one its rebuild settings name.
    async with isolated_status_service(settings, rebuild_settings,
                                       schema=suffix) as (service, http, producer):
        yield Isolated(service, http, producer, rebuild_settings)


async def test_after_the_swap_the_rows_are_those_of_the_live_tables_and_of_a_pure_fold(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    citizens = [Citizen() for _ in range(6)]
    for steps, citizen in enumerate(citizens, start=2):
        await isolated.send(citizen.journey(steps))
    # A redelivered event and a tampered one: the live consumer skips and dead-letters them.
    topic, first = isolated.sent[0]
    await isolated.send_raw(topic, first.to_bytes(), first.citizen_ref)
    tampered = first.to_json_dict() | {"type": "CardReissued"}
    await isolated.send_raw(topic, json.dumps(tampered).encode(), first.citizen_ref)
    await isolated.all_applied()
    schema = isolated.settings.status_schema
    before = await read_tables(settings, schema)

    report = await rebuild(isolated.settings)

    after = await read_tables(settings, schema)
    status, timeline = isolated.pure_fold()
    assert after.status == before.status == status
    assert after.timeline == before.timeline == timeline
    assert after.processed == before.processed == {
        (status_follower(topic), str(e.event_id)) for topic, e in isolated.sent}
    assert after.names == before.names  # the same tables and index names; none old, none next
    assert (report.applied, report.duplicates, report.skipped) == (len(isolated.sent), 1, 1)
    assert report.citizens == len(citizens)
    assert report.load_processes == 2


async def test_the_running_service_applies_new_events_to_the_new_tables(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    early, late = Citizen(), Citizen()
    await isolated.send(early.journey(3))
    await isolated.all_applied()

    report = await rebuild(isolated.settings, keep_old=True)

    [old_status] = [t for t in report.old_tables if ".card_status_old_" in t]
    await isolated.send(early.journey(7, start=3) + late.journey(2))
    await isolated.all_applied()
    response = await isolated.http.get(f"/v1/citizens/{early.citizen_ref}/card")
    assert response.json()["status"] == "READY_FOR_PICKUP"
    tables = await read_tables(settings, isolated.settings.status_schema)
    status, timeline = isolated.pure_fold()
    assert tables.status == status
    assert tables.timeline == timeline
    conn = await asyncpg.connect(settings.database_url)
    try:  # the kept old table saw nothing after the swap
        assert await conn.fetchval(f"SELECT count(*) FROM {old_status}") == 1
    finally:
        await conn.close()


async def test_events_written_during_the_rebuild_end_up_in_the_swapped_tables(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    citizens = [Citizen() for _ in range(10)]
    for citizen in citizens:
        await isolated.send(citizen.journey(2))
    more = [event for citizen in citizens for event in citizen.journey(7, start=2)]
    half = len(more) // 2

    async def keep_sending() -> None:
        for index in range(0, half, 5):
            await isolated.send(more[index:index + 5])
            await asyncio.sleep(0.01)

    async def applied_live_just_before_the_swap() -> None:
        await isolated.send(more[half:half + 10])
        await isolated.all_applied()

    sender = asyncio.create_task(keep_sending())
    await rebuild(isolated.settings, before_swap=applied_live_just_before_the_swap)
    await sender
    await isolated.send(more[half + 10:])
    await isolated.all_applied()

    tables = await read_tables(settings, isolated.settings.status_schema)
    status, timeline = isolated.pure_fold()
    assert tables.status == status
    assert tables.timeline == timeline
    assert not any(name.endswith(("_next", "_next_pkey")) or "_old_" in name
                   for name in tables.names)


async def test_the_fold_is_out_of_the_cyclic_collectors_sight_until_the_rebuild_ends(
    isolated: Isolated,
) -> None:
    await isolated.send(Citizen().journey(3))
    await isolated.all_applied()
    frozen: list[int] = []

    async def count_frozen_objects() -> None:
        frozen.append(gc.get_freeze_count())

    # In one process: the citizen's partition may be in the other process's share.
    await rebuild(isolated.settings.model_copy(update={"rebuild_processes": 1}),
                  before_swap=count_frozen_objects)

    assert frozen[0] > 0  # the batches read so far, the fold among them
    assert gc.get_freeze_count() == 0  # given back to the collector


async def test_a_failed_rebuild_leaves_the_live_tables_as_they_were(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    citizen = Citizen()
    await isolated.send(citizen.journey(3))
    await isolated.all_applied()
    schema = isolated.settings.status_schema
    before = await read_tables(settings, schema)
    missing_topics = isolated.settings.model_copy(update={"status_topic_prefix": unique("no")})

    with pytest.raises(RebuildError, match="do not exist"):
        await rebuild(missing_topics)

    after = await read_tables(settings, schema)
    assert after == before


async def test_live_rows_the_topics_do_not_explain_stop_the_swap(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    await isolated.send(Citizen().journey(2))
    await isolated.all_applied()
    schema = isolated.settings.status_schema
    conn = await asyncpg.connect(settings.database_url)
    try:  # as if the service had been fed from other topics
        await conn.execute(
            f"INSERT INTO {schema}.card_status SELECT 'cr-elsewhere', card_no_masked, status,"
            " e_card_status, loss_kind, loss_expires_at, application_id, application_status,"
            f" pickup_bureau, updated_at, last_event_id, sub_states FROM {schema}.card_status")
    finally:
        await conn.close()
    before = await read_tables(settings, schema)

    with pytest.raises(RebuildError, match="1 citizens of the live card_status"):
        await rebuild(isolated.settings)

    assert await read_tables(settings, schema) == before
    await rebuild(isolated.settings, allow_shrink=True)
    assert "cr-elsewhere" not in (await read_tables(settings, schema)).status


async def test_an_event_in_two_partition_numbers_has_the_log_loaded_again_in_one_process(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    assert settings.partitions >= 2, "the split needs two partition numbers"
    citizens = [Citizen() for _ in range(4)]
    for citizen in citizens:
        await isolated.send(citizen.journey(5))
    # A producer that republishes an event under another key: a copy in the partition number
    # the other load process reads. The live consumer skips it as seen before.
    topic, first = isolated.sent[0]
    home = await isolated.send_raw(topic, first.to_bytes(), first.citizen_ref)
    await isolated.send_raw(topic, first.to_bytes(), first.citizen_ref,
                            partition=(home + 1) % settings.partitions)
    await isolated.all_applied()
    schema = isolated.settings.status_schema
    before = await read_tables(settings, schema)

    with structlog.testing.capture_logs() as logs:
        report = await rebuild(isolated.settings)

    after = await read_tables(settings, schema)
    status, timeline = isolated.pure_fold()
    assert after.status == before.status == status
    assert after.timeline == before.timeline == timeline
    assert after.names == before.names
    assert [e["action"] for e in logs if e["event"] == "rebuild.split_mismatch"] == [
        "loading again in one process"]
    assert [phase.name for phase in report.phases] == ["load", "catch-up", "swap"]
    assert (report.applied, report.duplicates) == (len(isolated.sent), 2)
    assert report.load_processes == 1


async def test_a_load_process_that_dies_fails_the_rebuild_and_leaves_the_live_tables(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    for citizen in [Citizen() for _ in range(6)]:
        await isolated.send(citizen.journey(4))
    await isolated.all_applied()
    schema = isolated.settings.status_schema
    before = await read_tables(settings, schema)
    killed: list[int] = []

    def kill_the_load_process(step: Progress) -> None:
        for child in multiprocessing.active_children():
            if child.name == "carddesk-rebuild-load" and child.pid not in killed:
                killed.append(child.pid or 0)
                child.kill()

    with pytest.raises(RebuildError, match="ended without handing back its fold"):
        await rebuild(isolated.settings, progress=kill_the_load_process)

    assert len(killed) == 1
    assert await read_tables(settings, schema) == before  # no next table left either
    assert not [c for c in multiprocessing.active_children()
                if c.name == "carddesk-rebuild-load"]
    await rebuild(isolated.settings)  # nothing in the way of the next one
    assert await read_tables(settings, schema) == before


async def test_a_load_process_that_stops_reading_is_ended_within_the_stall_timeout(
    isolated: Isolated, settings: CardDeskSettings,
) -> None:
    for citizen in [Citizen() for _ in range(6)]:
        await isolated.send(citizen.journey(4))
    await isolated.all_applied()
    schema = isolated.settings.status_schema
    before = await read_tables(settings, schema)
    stopped: list[multiprocessing.process.BaseProcess] = []

    def freeze_the_load_process(step: Progress) -> None:
        for child in multiprocessing.active_children():
            if child.name == "carddesk-rebuild-load" and child not in stopped and child.pid:
                stopped.append(child)
                os.kill(child.pid, signal.SIGSTOP)  # alive, but reads nothing any more

    impatient = isolated.settings.model_copy(update={"rebuild_stall_timeout_seconds": 2.0})
    with pytest.raises(RebuildError, match="a load process read and wrote nothing for 2 s"):
        await asyncio.wait_for(rebuild(impatient, progress=freeze_the_load_process), 60)

    assert len(stopped) == 1
    assert not stopped[0].is_alive()  # ended, not left stopped
    assert await read_tables(settings, schema) == before
