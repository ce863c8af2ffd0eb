"""Projection rebuild over a generated log: N citizens' journeys, 13 events each (by default
100,000 citizens, 1,300,000 events), written to isolated copies of the four event topics,
then `projections rebuild` into an isolated status schema, timed, `--runs` times over the
same log (min / median / max, and the ratio to the peer's projection catch-up).

    python -m bench.rebuild [--citizens 100000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import uvloop

from bench.common import console, peer_ratio, print_table, spread, spread_text, write_result
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


async def rebuild_once(settings: RebuildSettings, schema: str) -> dict[str, Any]:
    """One rebuild into a fresh status schema (dropped afterwards): its figures."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    await migrate(pool, schema, status_ddl(schema))

    last_phase = {"name": ""}

    def progress(p: Progress) -> None:
        if p.phase != last_phase["name"]:
            last_phase["name"] = p.phase
            console.print(f"  {p.phase} …")

    started = time.monotonic()
    report = await rebuild(settings.model_copy(update={"status_schema": schema}),
                           progress=progress)
    elapsed = time.monotonic() - started
    rows = await pool.fetchval(f"SELECT count(*) FROM {schema}.card_status")
    active = await pool.fetchval(
        f"SELECT count(*) FROM {schema}.card_status WHERE status = 'ACTIVE'")
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()
    return {"rebuild_seconds": elapsed,
            "phases": [{"phase": p.name, "seconds": p.seconds, "events": p.events}
                       for p in report.phases],
            "rows": rows, "rows_active": active, "load_processes": report.load_processes}


async def main(citizens: int, runs: int) -> None:
    tag = uuid.uuid4().hex[:6]
    prefix = f"bench_{tag}."
    settings = as_principal(
        RebuildSettings(status_schema=f"bench_status_{tag}", status_topic_prefix=prefix), ADMIN)
    console.print(f"generating {citizens:,} citizens' journeys into {prefix}* …")
    count, generated_in = await generate(settings, prefix, citizens)
    results = []
    for k in range(runs):
        console.print(f"rebuilding {count:,} events, run {k + 1}/{runs} …")
        results.append(await rebuild_once(settings, f"bench_status_{tag}_{k + 1}"))
        results[-1]["events_per_s"] = count / results[-1]["rebuild_seconds"]
        console.print(f"  {results[-1]['events_per_s']:,.0f} events/s")
    await _drop_topics(settings, [f"{prefix}{t}" for t in STREAM])
    rate = spread([r["events_per_s"] for r in results])
    figures = {"events": count, "citizens": citizens, "generate_seconds": generated_in,
               "events_per_s": rate, "runs": results}
    last = results[-1]
    print_table(f"projection rebuild, {count:,} events, {citizens:,} citizens, "
                f"{runs} run(s)", [
        ("events", f"{count:,}"),
        ("rebuild seconds (load, catch-up, swap), min / median / max",
         spread_text(spread([r["rebuild_seconds"] for r in results]), 1)),
        ("events/s, min / median / max", spread_text(rate)),
        ("  ratio to the peer's projection catch-up (median)",
         peer_ratio(rate["median"], "projection_events_per_s")),
        *((f"  phase {p['phase']} (s, last run)", f"{p['seconds']:.1f}")
          for p in last["phases"]),
        ("  load processes (last run)", str(last["load_processes"])),
        ("card_status rows / ACTIVE (last run)", f"{last['rows']:,} / {last['rows_active']:,}"),
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
    parser.add_argument("--runs", type=int, default=3, help="rebuilds of the same log")
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    uvloop.run(main(args.citizens, args.runs))
