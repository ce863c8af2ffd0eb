"""No personal data in plain text: not in Kafka, not in a log file, not in any table."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Journey, Session
from cardctl.operations import seed
from shared.masking import mask_id_number, mask_name
from shared.settings import CardDeskSettings
from shared.topics import SERVICES
from tests.support import kafka_options

pytestmark = pytest.mark.integration


def needles(citizen: SyntheticCitizen) -> dict[str, list[bytes]]:
    """Each personal value as its bytes would appear: raw UTF-8 and JSON-escaped."""
    values = {"id_number": citizen.id_number, "name": citizen.name,
              "address": citizen.address, "phone": citizen.phone}
    return {
        field: sorted({value.encode(), json.dumps(value)[1:-1].encode()})
        for field, value in values.items()
    }


def leaks(haystack: bytes, citizens: list[SyntheticCitizen]) -> list[str]:
    """Which personal values occur, described masked so a failure prints no personal data."""
    found = []
    for citizen in citizens:
        for field, forms in needles(citizen).items():
            if any(form in haystack for form in forms):
                found.append(f"{field} of {mask_name(citizen.name)} "
                             f"{mask_id_number(citizen.id_number)}")
    return found


async def every_topic_bytes(bootstrap: str) -> dict[str, bytes]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **kafka_options())
    await admin.start()
    try:
        topics = sorted(t for t in await admin.list_topics() if not t.startswith("__"))
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    partitions = [TopicPartition(d["topic"], p["partition"])
                  for d in described for p in d["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, **kafka_options(), group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        chunks: dict[str, list[bytes]] = {t: [] for t in topics}
        remaining = {tp for tp in partitions if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                for record in records:
                    chunks[tp.topic].extend([record.key or b"", record.value or b""])
                    chunks[tp.topic].extend(v or b"" for _, v in record.headers or ())
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
            if not batch:
                remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
    return {topic: b"\n".join(parts) for topic, parts in chunks.items()}


async def test_no_seeded_citizens_personal_data_appears_in_kafka_logs_or_tables(
    journey: Journey, settings: CardDeskSettings, tmp_path: Path,
) -> None:
    citizens = await seed(settings, 5, tmp_path / "private.jsonl", report=lambda _: None)
    sessions = [Session(c) for c in citizens]
    await asyncio.gather(*(journey.whole(s) for s in sessions))
    for session in sessions:
        await journey.wait_for_timeline(session.citizen_ref, "CardCollected", "LossClosed")
    await asyncio.sleep(1.0)  # let the last log lines reach their files

    found: list[str] = []
    for topic, data in (await every_topic_bytes(settings.kafka_bootstrap)).items():
        found += [f"Kafka topic {topic}: {leak}" for leak in leaks(data, citizens)]

    logs = sorted((settings.state_dir / "logs").glob("*.log"))
    assert logs, "the services' log files were not found"
    for log in logs:
        found += [f"log {log.name}: {leak}" for leak in leaks(log.read_bytes(), citizens)]

    conn = await asyncpg.connect(settings.database_url)
    try:
        for schema in (*SERVICES, "status", "console"):
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables"
                " WHERE table_schema = $1 AND table_type = 'BASE TABLE'", schema)
            for table in tables:
                rows = await conn.fetch(
                    f'SELECT t::text AS row FROM {schema}."{table["table_name"]}" t')
                data = "\n".join(r["row"] for r in rows).encode()
                found += [f"table {schema}.{table['table_name']}: {leak}"
                          for leak in leaks(data, citizens)]
    finally:
        await conn.close()

    # The check itself must see plain data where it is: the seed file holds it by design.
    assert leaks((tmp_path / "private.jsonl").read_bytes(), citizens)
    assert found == []
