"""Prometheus metrics of every Card Desk process, served on `/metrics` of its HTTP port.

One registry holds only `carddesk_*` series. Labels are drawn from closed sets (service,
topic, command type, reply code, event type), never from message content a sender chooses
freely, and never personal data: a citizen_ref is no label either (it would be a series per
citizen). Hot-path updates are a counter increment on a cached child; everything that needs a
query (outbox backlog, consumer lag) is sampled by `MetricsSampler` off the message path.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

import asyncpg
import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    make_asgi_app,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from shared.kafka import client_options
from shared.settings import CardDeskSettings

log = structlog.get_logger()

REGISTRY = CollectorRegistry(auto_describe=True)
# carddesk_process_cpu_seconds_total, carddesk_process_resident_memory_bytes, open fds, ...
ProcessCollector(namespace="carddesk", registry=REGISTRY)

# A command type no route knows is counted under this label, so a sender cannot mint series.
UNKNOWN_TYPE = "unknown"

COMMANDS_RECEIVED = Counter(
    "carddesk_commands_received", "Command messages taken from a command topic",
    ["service", "type"], registry=REGISTRY)
COMMANDS_REPLIED = Counter(
    "carddesk_commands_replied", "Commands answered, by outcome (accepted or rejected) and code",
    ["service", "type", "status", "code"], registry=REGISTRY)
COMMANDS_REPEATED = Counter(
    "carddesk_commands_repeated", "Repeated requests answered with their stored reply",
    ["service", "type"], registry=REGISTRY)
COMMAND_LATENCY = Histogram(
    "carddesk_command_latency_seconds",
    "From the command's Kafka timestamp to its reply committed to the outbox",
    ["service", "type"], registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
EVENTS_APPENDED = Counter(
    "carddesk_events_appended", "Events appended to the event store (in a transaction that"
    " may still roll back: a refused command's batch pass)", ["service", "type"],
    registry=REGISTRY)
EVENTS_PUBLISHED = Counter(
    "carddesk_events_published", "Events the outbox relay published to Kafka",
    ["service", "type"], registry=REGISTRY)
REPLIES_PUBLISHED = Counter(
    "carddesk_replies_published", "Replies the outbox relay published to Kafka",
    ["service"], registry=REGISTRY)
OUTBOX_UNSENT = Gauge(
    "carddesk_outbox_unsent_rows", "Outbox rows not yet published", ["service"],
    registry=REGISTRY)
OUTBOX_OLDEST_AGE = Gauge(
    "carddesk_outbox_oldest_unsent_age_seconds",
    "Age of the oldest unpublished outbox row (0 when none)", ["service"], registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "carddesk_consumer_lag_messages",
    "Messages published to a partition and not yet committed by the consumer group",
    ["service", "group", "topic", "partition"], registry=REGISTRY)
DEAD_LETTERS = Counter(
    "carddesk_dlq_messages", "Messages sent to a dead-letter topic, by original topic and code",
    ["topic", "code"], registry=REGISTRY)
BATCH_SIZE = Histogram(
    "carddesk_consumer_batch_size", "Records a subscriber took at once", ["topic"],
    registry=REGISTRY, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
BARRIER_WAIT = Histogram(
    "carddesk_barrier_wait_seconds",
    "How long a command batch waited for the service's followers (shared/barrier.py), by"
    " status: caught_up, behind (the wait ran out) or unknown (Kafka could not tell)",
    ["group", "status"], registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
EVENTS_APPLIED = Counter(
    "carddesk_events_applied", "Events a follower or projection applied (first time only)",
    ["consumer", "topic"], registry=REGISTRY)
CHECKED_WRITES = Counter(
    "carddesk_checked_writes", "Follower batches tried as one read and one checked call, by"
    " status: applied, or missed (something moved; the batch went the locked way)",
    ["consumer", "status"], registry=REGISTRY)
GC_PAUSE = Histogram(
    "carddesk_gc_pause_seconds",
    "How long each of Python's cyclic garbage collections held the process, by generation"
    " (0, 1, 2): the event loop runs nothing meanwhile",
    ["generation"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5))
GC_FROZEN = Gauge(
    "carddesk_gc_frozen_objects",
    "Objects a service process froze out of garbage collection once started (gc.freeze):"
    " what its start built, never walked by a collection again", registry=REGISTRY)
GC_FROZEN.set_function(gc.get_freeze_count)
SAMPLER_ERRORS = Counter(
    "carddesk_metrics_sample_errors", "Failed samples of the outbox or the consumer lag",
    ["service", "what"], registry=REGISTRY)


class _CollectionTimer:
    """A `gc.callbacks` entry: each collection's length into `GC_PAUSE`."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.children = {generation: GC_PAUSE.labels(str(generation)) for generation in range(3)}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
        elif self.started is not None:
            self.children[info["generation"]].observe(time.perf_counter() - self.started)
            self.started = None


def observe_collections() -> None:
    """Time every garbage collection of this process from now on (once per process)."""
    if not any(isinstance(callback, _CollectionTimer) for callback in gc.callbacks):
        gc.callbacks.append(_CollectionTimer())


def command_type_label(command_type: str | None, known: Collection[str]) -> str:
    """The `type` label of a command: its type if a route knows it, else `unknown`."""
    return command_type if command_type is not None and command_type in known else UNKNOWN_TYPE


def observe_command_latency(service: str, command_type: str, kafka_timestamp_ms: int | None,
                            now: float | None = None) -> None:
    """Record command → reply latency, from the record's timestamp (a sender's clock ahead
    of ours counts as zero; the histogram's last bucket absorbs one far behind)."""
    if kafka_timestamp_ms is None or kafka_timestamp_ms <= 0:
        return
    elapsed = (now if now is not None else time.time()) - kafka_timestamp_ms / 1000
    COMMAND_LATENCY.labels(service, command_type).observe(max(0.0, elapsed))


class _PoolCollector(Collector):
    """PostgreSQL pool use of every registered pool, read at scrape time."""

    def __init__(self) -> None:
        self.pools: dict[str, Callable[[], asyncpg.Pool | None]] = {}

    def collect(self) -> Iterable[Metric]:
        size = GaugeMetricFamily("carddesk_db_pool_connections",
                                 "Connections the pool holds", labels=["service"])
        busy = GaugeMetricFamily("carddesk_db_pool_in_use",
                                 "Connections acquired from the pool", labels=["service"])
        cap = GaugeMetricFamily("carddesk_db_pool_max", "The pool's maximum size",
                                labels=["service"])
        for service, get in list(self.pools.items()):
            pool = get()
            if pool is None or pool.is_closing():
                continue
            size.add_metric([service], pool.get_size())
            busy.add_metric([service], pool.get_size() - pool.get_idle_size())
            cap.add_metric([service], pool.get_max_size())
        yield from (size, busy, cap)


class _ProjectionLagCollector(Collector):
    """now − occurred_at of the last event the status projection applied, per topic."""

    def __init__(self) -> None:
        self.last_occurred: dict[tuple[str, str], float] = {}

    def collect(self) -> Iterable[Metric]:
        lag = GaugeMetricFamily(
            "carddesk_projection_lag_seconds",
            "Now minus occurred_at of the last event the projection applied",
            labels=["service", "topic"])
        now = time.time()
        for (service, topic), occurred in list(self.last_occurred.items()):
            lag.add_metric([service, topic], max(0.0, now - occurred))
        yield lag


POOLS = _PoolCollector()
REGISTRY.register(POOLS)
PROJECTION = _ProjectionLagCollector()
REGISTRY.register(PROJECTION)


def watch_pool(service: str, pool: Callable[[], asyncpg.Pool | None]) -> None:
    POOLS.pools[service] = pool


def projection_applied(service: str, topic: str, occurred_at: float) -> None:
    """The projection applied an event that occurred at `occurred_at` (epoch seconds)."""
    key = (service, topic)
    if occurred_at > PROJECTION.last_occurred.get(key, 0.0):
        PROJECTION.last_occurred[key] = occurred_at


def exposition() -> tuple[bytes, str]:
    """The registry in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def metrics_asgi() -> Any:
    """An ASGI app serving the registry (mounted at `/metrics`)."""
    return make_asgi_app(REGISTRY)


def unread(start: int, end: int, committed: int | None) -> int:
    """A partition's records from `start` (its log start: earlier ones are deleted) to `end`
    that the group has not committed past. A group commits only the partitions its batches
    moved, so one that never read a partition whose records all expired has no offset
    there, and nothing left to read."""
    done = committed if committed is not None and committed >= 0 else 0
    return max(0, end - max(done, start))


class MetricsSampler:
    """Samples what a counter cannot see: the outbox backlog (one indexed query) and the
    lag of each consumer group the service runs (end offsets minus committed offsets)."""

    def __init__(self, settings: CardDeskSettings, service: str, schema: str,
                 pool: Callable[[], asyncpg.Pool], subscriptions: Sequence[tuple[str, str]],
                 *, interval_s: float) -> None:
        self.settings = settings
        self.service = service
        self.schema = schema
        self.pool = pool
        self.subscriptions = tuple(subscriptions)  # (topic, group)
        self.interval_s = interval_s
        self.timeout_s = max(1.0, min(10.0, interval_s))
        self._offsets: AIOKafkaConsumer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._partitions: dict[str, list[TopicPartition]] = {}

    async def sample_outbox(self) -> None:
        row = await asyncio.wait_for(self.pool().fetchrow(
            f"SELECT count(*) AS rows, coalesce(extract(epoch FROM now() - min(created_at)), 0)"
            f" AS age FROM {self.schema}.outbox WHERE sent_at IS NULL"), self.timeout_s)
        OUTBOX_UNSENT.labels(self.service).set(row["rows"])
        OUTBOX_OLDEST_AGE.labels(self.service).set(float(row["age"]))

    async def sample_lag(self) -> None:
        if not self.subscriptions:
            return
        if self._offsets is None or self._admin is None:
            options = client_options(self.settings)
            offsets = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap,
                                       group_id=None, **options)
            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                        **options)
            await asyncio.wait_for(offsets.start(), self.timeout_s)
            self._offsets = offsets
            await asyncio.wait_for(admin.start(), self.timeout_s)
            self._admin = admin
        by_group: dict[str, list[str]] = {}
        for topic, group in self.subscriptions:
            by_group.setdefault(group, []).append(topic)
        for group, topics in by_group.items():
            partitions = await self._partitions_of(topics)
            if not partitions:
                continue
            starts = await asyncio.wait_for(self._offsets.beginning_offsets(partitions),
                                            self.timeout_s)
            ends = await asyncio.wait_for(self._offsets.end_offsets(partitions), self.timeout_s)
            committed = await asyncio.wait_for(
                self._admin.list_consumer_group_offsets(group, partitions=partitions),
                self.timeout_s)
            for tp in partitions:
                done = committed.get(tp)
                CONSUMER_LAG.labels(self.service, group, tp.topic, str(tp.partition)).set(
                    unread(starts.get(tp, 0), ends.get(tp, 0),
                           None if done is None else done.offset))

    async def _partitions_of(self, topics: list[str]) -> list[TopicPartition]:
        assert self._admin is not None
        missing = [t for t in topics if t not in self._partitions]
        if missing:
            described = await asyncio.wait_for(self._admin.describe_topics(missing),
                                               self.timeout_s)
            for topic in described:
                found = [TopicPartition(topic["topic"], p["partition"])
                         for p in topic["partitions"]]
                if found:
                    self._partitions[topic["topic"]] = found
        return [tp for t in topics for tp in self._partitions.get(t, [])]

    async def sample(self) -> None:
        """One sample of each; a failure is counted and logged, never raised."""
        for what, step in (("outbox", self.sample_outbox), ("lag", self.sample_lag)):
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                SAMPLER_ERRORS.labels(self.service, what).inc()
                log.warning("metrics.sample_failed", what=what, error=type(exc).__name__)

    async def run(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        if self._offsets is not None:
            await self._offsets.stop()
            self._offsets = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
