"""Wiring every service shares: pool, producer, outbox relay, dead letters, the FastStream app.

Nothing connects at import time: resources are created in the app's startup hook.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import structlog
import uvloop
from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.asgi.response import JSONResponse
from faststream.kafka import KafkaBroker, KafkaMessage
from faststream.middlewares import AckPolicy

from shared.barrier import FollowerBarrier
from shared.commits import COMMITS, FlushOnRevoke
from shared.consumer import BatchConsumer, DeadLetters, EventConsumer, Inbound
from shared.eventstore import migrate
from shared.health import (
    ConsumerWatch,
    database_problem,
    running_consumer,
    summarise,
    watchdog,
)
from shared.kafka import IDLE_WAKE_MS, broker_security, commit_batch_ends, linger
from shared.logging import configure_logging
from shared.metrics import (
    BATCH_SIZE,
    MetricsSampler,
    metrics_asgi,
    observe_collections,
    watch_pool,
)
from shared.outbox import OutboxRelay, make_producer
from shared.production import UnsafeConfigurationError, exit_refused, refuse_unsafe_configuration
from shared.progress import FollowerProgress
from shared.settings import CardDeskSettings
from shared.ticks import tick_once_a_second
from shared.tracing import configure_tracing

log = structlog.get_logger()

# Each step of stopping a service may take this long before it is cut short.
STOP_STEP_TIMEOUT_S = 10.0


class ServiceRuntime:
    """One service process: its schema, its broker, its relay and its background tasks."""

    def __init__(self, name: str, settings: CardDeskSettings, *, schema: str | None = None,
                 group: str | None = None, extra_ddl: str = "",
                 secrets: Collection[str] = (), shipped_in_use: Iterable[str] = ()) -> None:
        """`schema` and `group` default to the service's own (tests isolate themselves with
        others); `secrets` names the secret settings the service reads
        (`shared.production`), so that start-up refuses development values of exactly those
        in production; `shipped_in_use` names its own settings found holding a shipped value."""
        self.name = name
        self.schema = schema or name
        self.group = group or f"carddesk-{name}"
        self.settings = settings
        self.extra_ddl = extra_ddl
        self.secrets = frozenset(secrets)
        self.shipped_in_use = tuple(shipped_in_use)
        # FastStream logs "Received" and "Processed" for every batch at `log_level`: two
        # lines per fetch per consumer, most of a busy service's log. At DEBUG they are
        # dropped; its errors and partition assignments keep their own levels.
        self.broker = KafkaBroker(settings.kafka_bootstrap, client_id=f"carddesk-{name}",
                                  security=broker_security(settings), log_level=logging.DEBUG)
        self._pool: asyncpg.Pool | None = None
        self._producer: AIOKafkaProducer | None = None
        self._relay: OutboxRelay | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._on_ready: list[Callable[[], Awaitable[None]]] = []
        self._background: list[Callable[[], Awaitable[None]]] = []
        self._barriers: list[FollowerBarrier] = []
        self._own_process = False  # `claim_process`
        self.watches: list[ConsumerWatch] = []
        # How far this process's consumers have handled each partition, for the barrier.
        self.progress = FollowerProgress()
        self._subscriptions: list[tuple[str, str]] = []  # (topic, group), for consumer lag
        self._sampler: MetricsSampler | None = None
        COMMITS.interval_s = settings.consumer_commit_interval_ms / 1000
        COMMITS.alone_interval_s = settings.consumer_commit_interval_alone_ms / 1000

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the runtime has not started"
        return self._pool

    @property
    def producer(self) -> AIOKafkaProducer:
        assert self._producer is not None, "the runtime has not started"
        return self._producer

    @property
    def dead_letters(self) -> DeadLetters:
        return DeadLetters(self.producer, self.group)

    @property
    def events_topic(self) -> str:
        return self.settings.event_topic(self.name)

    def barrier(self, topics: Sequence[str], *, group: str | None = None) -> FollowerBarrier:
        """What the service's commands wait on: its followers of `topics` caught up
        (shared/barrier.py); started and stopped with the runtime."""
        barrier = FollowerBarrier(self.settings, group or self.group, topics,
                                  timeout_s=self.settings.consistency_wait_ms / 1000,
                                  progress=self.progress)
        self._barriers.append(barrier)
        return barrier

    def on_ready(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run after the pool and producer exist, before messages flow (build handlers here)."""
        self._on_ready.append(hook)

    def background(self, loop: Callable[[], Awaitable[None]]) -> None:
        """A long-running loop (timers, schedulers), restarted with backoff if it fails."""
        self._background.append(loop)

    def subscribe(self, topic: str, consumer: Callable[[], BatchConsumer], *,
                  group: str | None = None, title: str | None = None,
                  description: str | None = None) -> None:
        """Consume `topic` in this service's group (see `subscribe_all`)."""
        self.subscribe_all({topic: consumer}, group=group, title=title,
                           description=description)

    def subscribe_all(self, consumers: Mapping[str, Callable[[], BatchConsumer]], *,
                      group: str | None = None, title: str | None = None,
                      description: str | None = None) -> None:
        """Consume every topic of `consumers` with one Kafka consumer in this service's
        group, committing only after the consumers returned. Each topic's `consumer` gives
        its handler once the runtime has started (`on_ready` builds it).

        Records arrive in batches (`_handle_fetch`): each topic's in one transaction for
        all the partitions the fetch brought, followers' of several topics in one together,
        each partition's in its order (a citizen's messages share a partition, so their
        order holds); the batch's offsets are committed once every record was handled.
        One consumer for several topics is one fetch, one offset commit and one group
        member where there would be one per topic.
        """
        topics = list(consumers)
        group_id = group or self.group
        self._subscriptions.extend((topic, group_id) for topic in topics)
        batch_size = BATCH_SIZE.labels(",".join(topics))
        # Offsets are committed on a timer (shared/commits.py), and at once for partitions
        # a rebalance takes away.
        listener = FlushOnRevoke(COMMITS, lambda: None)

        subscriber = self.broker.subscriber(
            *topics,
            group_id=group_id,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.NACK_ON_ERROR,
            batch=True,
            max_records=self.settings.consumer_batch_size,
            batch_timeout_ms=self.settings.consumer_batch_wait_ms,
            # The broker holds an empty fetch `consumer_fetch_wait_ms` (see the setting).
            consumer_timeout_ms=IDLE_WAKE_MS,
            fetch_max_wait_ms=self.settings.consumer_fetch_wait_ms,
            title=title or f"{','.join(topics)}:{self.name}",
            description=description,
            parser=parse_leniently,
            decoder=raw_records,
            listener=listener,
        )
        listener.consumer = lambda: running_consumer(subscriber)
        linger(subscriber, self.settings.consumer_linger_ms)
        self.progress.consumer(lambda: _assignment(subscriber))
        # One watch per topic, all of this consumer: /health names each topic it consumes.
        watches = [ConsumerWatch(topic, lambda: subscriber, self.settings.consumer_stall_seconds,
                                 commits=COMMITS)
                   for topic in topics]
        self.watches.extend(watches)

        @subscriber
        async def on_batch(records: Any) -> None:
            batch_size.observe(len(records))
            for watch in watches:
                watch.batch_started()
            try:
                await self._handle_fetch(consumers, records)
            except BaseException:
                for watch in watches:
                    watch.batch_done(failed=True)
                raise
            for watch in watches:
                watch.batch_done()

    async def _handle_fetch(self, consumers: Mapping[str, Callable[[], BatchConsumer]],
                            records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """One fetch's records: followers of several topics together in one transaction
        (`EventConsumer.handle_together`), any other topics' concurrently, each topic's in
        one `handle_batch`; then each partition's end is recorded as applied."""
        by_topic: dict[str, list[Any]] = {}
        for record in records:  # each partition's records stay in their order
            by_topic.setdefault(record.topic, []).append(record)
        handlers = {topic: consumers[topic]() for topic in by_topic}
        followers = {t: h for t, h in handlers.items() if isinstance(h, EventConsumer)}
        if len(by_topic) > 1 and len(followers) == len(handlers):
            await EventConsumer.handle_together([
                (followers[topic], [Inbound.from_record(r) for r in rs])
                for topic, rs in by_topic.items()])
        else:
            await asyncio.gather(*(_handle_topic(handlers[topic], rs)
                                   for topic, rs in by_topic.items()))
        for topic, rs in by_topic.items():
            for partition, end in partition_ends(rs).items():
                self.progress.applied(topic, partition, end)

    def check_configuration(self) -> None:
        """Refuse development secrets in production and key pairs that do not match."""
        refuse_unsafe_configuration(self.settings, self.secrets,
                                    shipped_in_use=self.shipped_in_use)

    async def start(self) -> None:
        self.check_configuration()
        configure_tracing(self.name, self.settings.otlp_endpoint)
        self._pool = await asyncpg.create_pool(self.settings.database_url, min_size=2,
                                               max_size=10, reset=keep_session)
        await migrate(self._pool, self.schema, self.extra_ddl)
        self._producer = make_producer(self.settings)
        await self._producer.start()
        self._relay = OutboxRelay(
            self._pool, self._producer, self.schema,
            poll_interval=self.settings.outbox_poll_ms / 1000,
            retention=timedelta(hours=self.settings.outbox_retention_hours))
        for barrier in self._barriers:
            await barrier.start()
        for hook in self._on_ready:
            await hook()
        self._tasks.append(asyncio.create_task(supervise("outbox.relay", self._relay.run)))
        for loop in self._background:
            self._tasks.append(asyncio.create_task(supervise(loop.__name__, loop)))
        self._start_metrics()
        if self._own_process:
            log.info("service.heap_frozen", objects=freeze_startup_heap())
        log.info("service.started", schema=self.schema)

    def _start_metrics(self) -> None:
        """Pool use read at scrape time; outbox backlog and consumer lag sampled; every
        garbage collection timed."""
        watch_pool(self.schema, lambda: self._pool)
        observe_collections()
        self._sampler = MetricsSampler(self.settings, self.schema, self.schema,
                                       lambda: self.pool, self._subscriptions,
                                       interval_s=self.settings.metrics_interval_seconds)
        self._tasks.append(asyncio.create_task(supervise("metrics.sampler", self._sampler.run)))

    @property
    def sampler(self) -> MetricsSampler:
        assert self._sampler is not None, "the runtime has not started"
        return self._sampler

    async def stop(self) -> None:
        """Every step bounded: a loop retrying a dead database or a Kafka client still
        reconnecting is left behind, never waited for."""
        if self._relay is not None:
            self._relay.stop()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_STEP_TIMEOUT_S)
        self._tasks.clear()
        if self._sampler is not None:
            await stop_step("metrics sampler", self._sampler.stop())
        for barrier in self._barriers:
            await stop_step("follower barrier", barrier.stop())
        if self._producer is not None:
            await stop_step("producer", self._producer.stop())
        if self._pool is not None and not await stop_step("pool", self._pool.close()):
            self._pool.terminate()  # close() waits for every connection to be released
        log.info("service.stopped")

    async def problems(self, *, kafka: bool = True) -> dict[str, str | None]:
        """Each health check's problem (None when fine): the database, Kafka and every
        consumer, named `consumer:<topic>`."""
        timeout = self.settings.health_timeout_seconds

        async def kafka_problem() -> str | None:
            try:
                answers = await self.broker.ping(timeout)
            except Exception as error:  # a probe reports, it never raises
                return type(error).__name__
            return None if answers else "no answer"

        database, broker = await asyncio.gather(
            database_problem(lambda: self.pool, timeout),
            kafka_problem() if kafka else asyncio.sleep(0))
        return {"database": database, **({"kafka": broker} if kafka else {}),
                **{f"consumer:{w.topic}": w.problem() for w in self.watches}}

    def claim_process(self) -> None:
        """In a service process (never in tests that run services in-process, several to a
        process): exit once unhealthy for `unhealthy_exit_seconds`, for the supervisor to
        restart it, and once started, freeze what the start built out of later garbage
        collections (`freeze_startup_heap`). Its HTTP server ticks once a second
        (`shared.ticks`)."""
        if self.settings.unhealthy_exit_seconds > 0:
            self.background(self._watchdog)
        self._own_process = True
        tick_once_a_second()

    async def _watchdog(self) -> None:
        await watchdog(self.name, self.problems,
                       exit_after_s=self.settings.unhealthy_exit_seconds)

    def app(self) -> AsgiFastStream:
        """The FastStream application: consumers, `/health`, `/metrics` and the AsyncAPI docs."""
        configure_logging(self.name, self.settings.log_level)

        @get
        async def health(_scope: Any) -> AsgiResponse:
            healthy, checks = summarise(await self.problems())
            if healthy:
                return JSONResponse({"status": "ok", "checks": checks})
            return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)

        return AsgiFastStream(
            self.broker,
            # No AsyncAPI page here: FastStream's loads its viewer from a public CDN, and
            # bureaus run on closed networks. The status service serves the whole contract's
            # document with the viewer vendored (`/docs/asyncapi`).
            asgi_routes=[("/health", health), ("/metrics", metrics_asgi())],
            on_startup=[self.start],
            on_shutdown=[COMMITS.flush_all],  # while the consumers still hold their partitions
            after_shutdown=[self.stop],
        )


def freeze_startup_heap() -> int:
    """Leave what a started service holds for its life (modules, models, settings, clients)
    out of every later garbage collection (`gc.freeze`), after collecting what startup left
    over; returns how many objects that is.

    A full collection walks every object the collector tracks, some 85,000 in a started
    service, and at half the sustained rate each full collection held the event loop for
    140-190 ms (README, Performance): every command and event in flight waited that long.
    Frozen, those objects are no longer walked. What is frozen is still freed when no
    reference is left; only a cycle among frozen objects would stay, and startup's cycles
    were collected first."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def stop_step(step: str, work: Awaitable[Any],
                    timeout_s: float = STOP_STEP_TIMEOUT_S) -> bool:
    """Run one step of stopping for at most `timeout_s`; False (logged) when it failed or
    ran out. The step is cancelled then, but not waited for: it may ignore cancellation."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        log.warning("service.stop_step_timed_out", step=step, timeout_s=timeout_s)
        return False
    if task.cancelled() or task.exception() is not None:
        log.warning("service.stop_step_failed", step=step,
                    error=None if task.cancelled() else type(task.exception()).__name__)
        return False
    return True


async def parse_leniently(records: tuple[ConsumerRecord[Any, Any], ...],
                          original: Callable[[Any], Awaitable[Any]]) -> Any:
    """FastStream's parser decodes every header as UTF-8: a record with one that is not would
    fail before our code runs and be redelivered for ever. Such a batch is parsed again with
    the bad bytes replaced (U+FFFD), so the record reaches our checks and its DLQ.
    The batch is acknowledged by committing the partitions it moved (`BatchEndsCommit`)."""
    try:
        message = await original(records)
    except UnicodeDecodeError:
        message = await original(tuple(
            dataclasses.replace(record, headers=[
                (key, value.decode("utf-8", "replace").encode()) for key, value in record.headers
            ]) for record in records))
    return commit_batch_ends(message, records)


async def raw_records(message: KafkaMessage) -> tuple[ConsumerRecord[Any, Any], ...]:
    """What the handlers get: the batch's records as the client read them. Decoding every
    value as FastStream does by default would be work thrown away, and a handler parameter
    of type `KafkaMessage` is resolved in a worker thread, once per batch."""
    records = message.raw_message
    return records if isinstance(records, tuple) else (records,)


async def keep_session(_conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default reset query (unlock all, close, unlisten,
    reset all): a round trip per release, and no code here leaves session state behind
    (advisory locks are transaction-scoped; the relay releases its own lock and listener)."""


async def supervise(name: str, loop: Callable[[], Awaitable[Any]]) -> None:
    """Keep a background loop alive: a crash is logged and the loop restarts with backoff."""
    delay = 0.5
    while True:
        try:
            await loop()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background.crashed", loop=name)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def run_service(runtime: ServiceRuntime, default_health_port: int) -> None:
    """Entry point body of `python -m services.<name>.main`."""
    settings = runtime.settings
    try:
        runtime.check_configuration()
    except UnsafeConfigurationError as error:
        exit_refused(error)
    port = settings.health_port or default_health_port
    runtime.claim_process()
    app = runtime.app()
    uvloop.run(app.run(run_extra_options={"host": settings.http_host, "port": port}))


async def _handle_topic(consumer: BatchConsumer,
                        records: Sequence[ConsumerRecord[Any, Any]]) -> None:
    if len(records) > 1:
        await consumer.handle_batch([Inbound.from_record(r) for r in records])
    else:
        await consumer.handle(Inbound.from_record(records[0]))


def partition_ends(records: Iterable[ConsumerRecord[Any, Any]]) -> dict[int, int]:
    """Each partition's offset after the last of `records` (of one topic): once they are
    handled for good, what an offset commit would say."""
    return {record.partition: record.offset + 1 for record in records}


def _assignment(subscriber: Any) -> set[TopicPartition]:
    """The partitions FastStream's Kafka `subscriber` is assigned now (none while stopped)."""
    consumer = running_consumer(subscriber)
    return set() if consumer is None else set(consumer.assignment())
