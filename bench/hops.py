"""Where a command's time goes between processes: per-hop latency read off Kafka itself.

While traffic runs (a paced phase of `python -m bench.journeys`, say), reads every command,
event and reply topic from its end for `--seconds`, as the admin principal, and joins the
records by request id (a command's `request_id`, its events' `correlation_id`, the reply's
`request_id`). Each record's timestamp is its producer's send time (Kafka's CreateTime), so
per command type it prints, p50 / p90 / p99 in ms:

- command sent → its first event sent: the owning service's consumer (fetch, batch,
  transaction, commit) and its outbox relay;
- first event sent → reply sent: the relay sends a reply once Kafka acknowledged the events
  before it;
- command sent → reply sent, and reply sent → read here (a consumer of the reply topic, as
  the channel is).

Every process runs on this machine, so their clocks agree.

    python -m bench.journeys --seconds 20 --rate 200 --runs 1 &   # then, once it is paced:
    python -m bench.hops --seconds 12
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer

from bench.common import percentiles, print_table
from shared.kafka import ADMIN, as_principal, client_options
from shared.logging import configure_logging
from shared.settings import CardDeskSettings

HOPS = ("command sent → first event sent", "first event sent → reply sent",
        "command sent → reply sent", "reply sent → read here")


@dataclass(frozen=True, slots=True)
class Seen:
    """One record as read: its topic, its producer's send time and when it was read (ms)."""

    topic: str
    sent_ms: float
    read_ms: float
    request_id: str | None  # a command's or a reply's
    correlation_id: str | None  # an event's
    command_type: str | None


def hop_latencies(seen: Iterable[Seen]) -> dict[str, dict[str, list[float]]]:
    """Per command type, each hop's latencies in ms, of the commands whose reply was read."""
    commands: dict[str, Seen] = {}
    replies: dict[str, Seen] = {}
    first_event: dict[str, float] = {}
    for record in seen:
        if record.topic.endswith(".commands") and record.request_id:
            commands[record.request_id] = record
        elif record.topic.startswith("channel.replies.") and record.request_id:
            replies[record.request_id] = record
        elif record.topic.endswith(".events") and record.correlation_id:
            known = first_event.get(record.correlation_id, record.sent_ms)
            first_event[record.correlation_id] = min(known, record.sent_ms)
    hops: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for request_id, command in commands.items():
        reply = replies.get(request_id)
        if reply is None:
            continue
        of_type = hops[command.command_type or "?"]
        of_type[HOPS[2]].append(reply.sent_ms - command.sent_ms)
        of_type[HOPS[3]].append(reply.read_ms - reply.sent_ms)
        if (event_ms := first_event.get(request_id)) is not None:
            of_type[HOPS[0]].append(event_ms - command.sent_ms)
            of_type[HOPS[1]].append(reply.sent_ms - event_ms)
    return {kind: dict(of_type) for kind, of_type in hops.items()}


def seen_of(topic: str, sent_ms: float, read_ms: float, value: bytes | None) -> Seen:
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        body = {}
    if not isinstance(body, dict):
        body = {}

    def text(key: str) -> str | None:
        found = body.get(key)
        return found if isinstance(found, str) else None

    return Seen(topic, sent_ms, read_ms, text("request_id"), text("correlation_id"),
                text("type"))


async def read_all(settings: CardDeskSettings, seconds: float) -> list[Seen]:
    """Every record written to a command, event or reply topic during `seconds`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                auto_offset_reset="latest", fetch_max_wait_ms=50,
                                **client_options(as_principal(settings, ADMIN)))
    await consumer.start()
    try:
        topics = sorted(t for t in await consumer.topics()
                        if t.endswith((".commands", ".events"))
                        or t.startswith("channel.replies."))
        consumer.subscribe(topics)
        seen: list[Seen] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            fetched = await consumer.getmany(timeout_ms=200)
            read_ms = time.time() * 1000
            seen.extend(seen_of(tp.topic, record.timestamp, read_ms, record.value)
                        for tp, records in fetched.items() for record in records)
        return seen
    finally:
        await consumer.stop()


def rows_of(hops: dict[str, dict[str, list[float]]]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for kind in sorted(hops):
        for hop in HOPS:
            samples: Sequence[float] = hops[kind].get(hop, [])
            if len(samples) < 2:
                continue
            cuts = percentiles([s / 1000 for s in samples])
            p90 = sorted(samples)[int(0.9 * (len(samples) - 1))]
            rows.append((f"{kind}: {hop} (n={len(samples)})",
                         f"{cuts['p50_ms']:,.0f} / {p90:,.0f} / {cuts['p99_ms']:,.0f}"))
    return rows


def main(seconds: float) -> int:
    settings = CardDeskSettings()
    seen = asyncio.run(read_all(settings, seconds))
    print_table(f"per hop, ms p50 / p90 / p99 ({len(seen)} records in {seconds:.0f} s)",
                rows_of(hop_latencies(seen)))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    raise SystemExit(main(args.seconds))
