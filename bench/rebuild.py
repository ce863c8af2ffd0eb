"""Projection rebuild over a generated log: N citizens' journeys, 13 events each (by default
100,000 citizens, 1,300,000 events), written to isolated copies of the four event topics,
then `projections rebuild` into an isolated status schema, timed.

    python -m bench.rebuild [--citizens 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import uvloop

from bench.common import console, print_table, write_result
from cardctl.stack import ensure_topics
from services.status.adapters import status_ddl
from services.status.rebuild import Progress, RebuildSettings, rebuild
from shared.contracts import auth, issuance, loss, review
from shared.envelope import GENESIS_HASH, EventEnvelope
from shared.events import DomainEvent, EventMeta, to_pending
from shared.eventstore import migrate
from shared.kafka import ADMIN, as_principal, client_options
from shared.logging import configure_logging
from shared.outbox import make_producer
from shared.settings import CardDeskSettings
from shared.topics import TopicSpec

STREAM = {"auth.events": "auth", "loss.events": "loss", "review.events": "review",
          "issuance.events": "card"}


def journey(index: int, start: datetime) -> Iterator[tuple[str, EventEnvelope]]:
    """One citizen's 13 events, sealed per stream as the owning services would."""
    ref = f"{uuid.uuid4().hex}{uuid.uuid4().hex}"
    app, loss_id = f"app-{index}", f"loss-{index}"
    old, new = f"L{index:09d}", f"S{index:09d}"
    steps: list[tuple[str, DomainEvent]] = [
        ("issuance.events", issuance.CardIssued(card_no=old)),
        ("auth.events", auth.SessionStarted(session_id="s", channel="wechat-oa",
                                            expires_at=start)),
        ("auth.events", auth.IdentityVerified(method="realname", session_id="s")),
        ("auth.events", auth.ElectronicCardAuthorized(session_id="s", channel="wechat-oa")),
        ("auth.events", auth.IdentityVerified(method="portrait", session_id="s",
                                              similarity=0.99)),
        ("loss.events", loss.LossReported(loss_id=loss_id, kind="formal", card_no=old,
                                          expires_at=None, financial_freeze=True,
                                          channel="wechat-oa")),
        ("review.events", review.ReissueApplied(
            application_id=app, loss_id=loss_id, old_card_no=old, address="enc:v1:AAAA",
            phone="enc:v1:BBBB", photo_ref="enc:v1:CCCC", pickup_bureau="bureau-001",
            channel="wechat-oa")),
        ("review.events", review.ReviewApproved(application_id=app, reviewer_id="auto-rule",
                                                automatic=True, pickup_bureau="bureau-001",
                                                old_card_no=old)),
        ("issuance.events", issuance.CardProductionStarted(
            application_id=app, pickup_bureau="bureau-001", ready_by=start)),
        ("issuance.events", issuance.CardReissued(application_id=app, new_card_no=new,
                                                  old_card_no=old)),
        ("issuance.events", issuance.CardReadyForPickup(application_id=app,
                                                        pickup_bureau="bureau-001",
                                                        card_no=new)),
        ("loss.events", loss.LossClosed(loss_id=loss_id, new_card_no=new)),
        ("issuance.events", issuance.CardCollected(
            application_id=app, bureau_id="bureau-001", card_no=new, by_proxy=False,
            collected_by="holder")),
    ]
    last: dict[str, tuple[int, str]] = {}
    for step, (topic, event) in enumerate(steps):
        stream_id = f"{STREAM[topic]}-{ref}"
        version, prev = last.get(stream_id, (0, GENESIS_HASH))
        meta = EventMeta(ref, start + timedelta(seconds=step), "bench", "bench")
        envelope = EventEnvelope.seal(to_pending(event, meta, uuid.uuid4()), stream_id,
                                      version + 1, prev)
        last[stream_id] = (envelope.version, envelope.hash)
        yield topic, envelope


async def generate(settings: RebuildSettings, prefix: str, citizens: int) -> tuple[int, float]:
    await ensure_topics(settings, [
        TopicSpec(f"{prefix}{topic}", settings.partitions) for topic in STREAM])
    producer = make_producer(settings)
    await producer.start()
    started = time.monotonic()
    count = 0
    start = datetime(2026, 1, 1, tzinfo=UTC)
    pending = []
    for index in range(citizens):
        for topic, envelope in journey(index, start):
            pending.append(await producer.send(f"{prefix}{topic}", envelope.to_bytes(),
                                               key=envelope.citizen_ref.encode()))
            count += 1
        if len(pending) > 20_000:
            await asyncio.gather(*pending)
            pending.clear()
        if index and index % 10_000 == 0:
            console.print(f"  generated {count:,} events")
    await asyncio.gather(*pending)
    await producer.stop()
    return count, time.monotonic() - started


async def main(citizens: int) -> None:
    tag = uuid.uuid4().hex[:6]
    prefix = f"bench_{tag}."
    schema = f"bench_status_{tag}"
    settings = as_principal(
        RebuildSettings(status_schema=schema, status_topic_prefix=prefix), ADMIN)
    console.print(f"generating {citizens:,} citizens' journeys into {prefix}* …")
    count, generated_in = await generate(settings, prefix, citizens)
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    await migrate(pool, schema, status_ddl(schema))

    last_phase = {"name": ""}

    def progress(p: Progress) -> None:
        if p.phase != last_phase["name"]:
            last_phase["name"] = p.phase
            console.print(f"  {p.phase} …")

    console.print(f"rebuilding {count:,} events …")
    started = time.monotonic()
    report = await rebuild(settings, progress=progress)
    elapsed = time.monotonic() - started
    rows = await pool.fetchval(f"SELECT count(*) FROM {schema}.card_status")
    active = await pool.fetchval(
        f"SELECT count(*) FROM {schema}.card_status WHERE status = 'ACTIVE'")
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()
    await _drop_topics(settings, [f"{prefix}{t}" for t in STREAM])
    figures = {
        "events": count, "citizens": citizens, "generate_seconds": generated_in,
        "rebuild_seconds": elapsed, "events_per_s": count / elapsed,
        "phases": [{"phase": p.name, "seconds": p.seconds, "events": p.events}
                   for p in report.phases],
        "rows": rows, "rows_active": active,
    }
    print_table(f"projection rebuild, {count:,} events, {citizens:,} citizens", [
        ("events", f"{count:,}"),
        ("rebuild seconds (load, catch-up, swap)", f"{elapsed:.1f}"),
        ("events/s", f"{count / elapsed:,.0f}"),
        *((f"  phase {p.name} (s)", f"{p.seconds:.1f}") for p in report.phases),
        ("card_status rows / ACTIVE", f"{rows:,} / {active:,}"),
    ])
    console.print(f"written {write_result('rebuild', figures)}")


async def _drop_topics(settings: CardDeskSettings, names: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                **client_options(settings))
    await admin.start()
    try:
        await admin.delete_topics(names)
    finally:
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--citizens", type=int, default=100_000)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    uvloop.run(main(args.citizens))
