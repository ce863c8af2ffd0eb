"""Helpers the integration and end-to-end tests share: events, topics, reading Kafka."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord

from cardctl.stack import ensure_topics
from shared.envelope import GENESIS_HASH, EventEnvelope
from shared.events import DomainEvent, EventMeta, to_pending
from shared.topics import TopicSpec


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def make_events(
    stream_id: str, citizen_ref: str, events: Sequence[DomainEvent], *, start_version: int = 1,
    prev_hash: str = GENESIS_HASH,
) -> list[EventEnvelope]:
    """Sealed envelopes as a service would store them, for feeding consumers directly."""
    meta = EventMeta(citizen_ref, datetime.now(UTC), str(uuid.uuid4()), str(uuid.uuid4()))
    sealed: list[EventEnvelope] = []
    for offset, event in enumerate(events):
        envelope = EventEnvelope.seal(to_pending(event, meta, uuid.uuid4()), stream_id,
                                      start_version + offset, prev_hash)
        sealed.append(envelope)
        prev_hash = envelope.hash
    return sealed


async def create_topics(bootstrap: str, names: Sequence[str], partitions: int = 6) -> None:
    await ensure_topics(bootstrap, [TopicSpec(name=n, partitions=partitions) for n in names])


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[ConsumerRecord]], bool],
    timeout_s: float = 30.0,
) -> list[ConsumerRecord]:
    """Every record of `topic` from offset 0, read until `until(records)` holds."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not until(records):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{topic}: condition not met with {len(records)} records")
            batch = await consumer.getmany(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
    finally:
        await consumer.stop()
    return records


async def eventually(check: Callable[[], object], timeout_s: float = 30.0) -> None:
    """Poll an async check until it returns truthy; fail with its last value."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: object = None
    while asyncio.get_running_loop().time() < deadline:
        last = await check()  # type: ignore[misc]
        if last:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"condition not met in {timeout_s}s; last value {last!r}")
