"""Event store: appends/s to distinct streams and to one hot stream (conflicts retried), with
the outbox relay publishing to Kafka at the same time.

    python -m bench.eventstore [--seconds 20] [--writers 8]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from datetime import UTC, datetime

import asyncpg
import uvloop

from bench.common import console, print_table, write_result
from shared.envelope import PendingEvent
from shared.eventstore import ConcurrencyError, PostgresEventStore, migrate
from shared.kafka import ADMIN, as_principal
from shared.logging import configure_logging
from shared.outbox import OutboxRelay, make_producer
from shared.settings import CardDeskSettings
from shared.topics import TopicSpec

# How long the relay may take to publish what is left once the writers stop.
DRAIN_TIMEOUT_S = 120.0


def pending(citizen: str) -> PendingEvent:
    return PendingEvent(event_id=uuid.uuid4(), type="BenchProbe", citizen_ref=citizen,
                        occurred_at=datetime.now(UTC), correlation_id="bench",
                        causation_id="bench", data={"n": 1})


async def append_loop(pool: asyncpg.Pool, schema: str, topic: str, stream_of: object,
                      deadline: float, counts: dict[str, int]) -> None:
    writer = uuid.uuid4().hex[:8]
    n = 0
    while time.monotonic() < deadline:
        stream = stream_of(writer, n)  # type: ignore[operator]
        n += 1
        while True:
            async with pool.acquire() as conn, conn.transaction():
                store = PostgresEventStore(conn, schema, topic)
                version = await conn.fetchval(
                    f"SELECT coalesce(max(version), 0) FROM {schema}.events WHERE stream_id = $1",
                    stream)
                try:
                    await store.append(stream, version, [pending(stream)])
                    counts["appends"] += 1
                    break
                except ConcurrencyError:
                    counts["conflicts"] += 1


async def run_case(settings: CardDeskSettings, name: str, stream_of: object, seconds: float,
                   writers: int) -> dict[str, float]:
    from cardctl.stack import ensure_topics

    schema = f"bench_{name}_{uuid.uuid4().hex[:6]}"
    topic = f"{schema}.events"
    await ensure_topics(settings, [TopicSpec(topic, settings.partitions)])
    pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=writers + 2)
    await migrate(pool, schema)
    producer = make_producer(settings)
    await producer.start()
    relay = OutboxRelay(pool, producer, schema)
    relay_task = asyncio.create_task(relay.run())
    counts = {"appends": 0, "conflicts": 0}
    started = time.monotonic()
    await asyncio.gather(*(append_loop(pool, schema, topic, stream_of, started + seconds, counts)
                           for _ in range(writers)))
    elapsed = time.monotonic() - started
    # Let the relay drain, then measure how far it kept up.
    drain_started = time.monotonic()
    unsent = 1
    while unsent and time.monotonic() - drain_started < DRAIN_TIMEOUT_S:
        unsent = await pool.fetchval(
            f"SELECT count(*) FROM {schema}.outbox WHERE sent_at IS NULL")
        if unsent:
            await asyncio.sleep(0.05)
    if unsent:
        console.print(f"[red]relay not drained after {DRAIN_TIMEOUT_S:.0f} s[/]: "
                      f"{unsent} messages unsent")
    drain = time.monotonic() - drain_started
    published = await pool.fetchval(f"SELECT count(*) FROM {schema}.outbox")
    relay.stop()
    await relay_task
    await producer.stop()
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()
    return {
        "appends_per_s": counts["appends"] / elapsed,
        "conflicts_retried": counts["conflicts"],
        "appends": counts["appends"],
        "published": published,
        "published_per_s": published / (elapsed + drain),
        "relay_drain_after_s": drain,
    }


async def main(seconds: float, writers: int) -> None:
    # The benchmark creates topics: it runs as the local stack's administrator.
    settings = as_principal(CardDeskSettings(), ADMIN)
    distinct = await run_case(settings, "distinct", lambda w, n: f"s-{w}-{n}", seconds, writers)
    hot = await run_case(settings, "hot", lambda w, n: "hot-stream", seconds, writers)
    figures = {"seconds": seconds, "writers": writers, "distinct_streams": distinct,
               "one_hot_stream": hot}
    print_table(f"event store, {writers} concurrent writers, {seconds:.0f} s each", [
        ("appends/s, distinct streams", f"{distinct['appends_per_s']:.0f}"),
        ("published/s (relay), distinct", f"{distinct['published_per_s']:.0f}"),
        ("relay drained after writers stopped (s)", f"{distinct['relay_drain_after_s']:.2f}"),
        ("appends/s, one hot stream", f"{hot['appends_per_s']:.0f}"),
        ("conflicts retried, hot stream", f"{hot['conflicts_retried']}"),
        ("published/s (relay), hot", f"{hot['published_per_s']:.0f}"),
    ])
    console.print(f"written {write_result('eventstore', figures)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    uvloop.run(main(args.seconds, args.writers))
