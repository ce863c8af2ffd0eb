"""Rebuild `card_status` and `card_timeline` from offset 0 while the status service runs.

1. load: read the event topics from offset 0 up to a snapshot of their ends with a consumer
   of our own (no group, nothing committed), fold every event in memory with the
   projection's own functions, COPY the rows into `*_next` tables, then index them. With
   `rebuild_processes` > 1 the partition numbers are shared out: a citizen's events are
   keyed by `citizen_ref`, so they lie in one partition number of every topic, and each
   process folds its citizens whole. The other processes write their rows and hand back
   their fold's state; a citizen or an event found by two of them starts the load again in
   one process;
2. catch up: read on to the current ends and write what changed, until the lag is small;
3. swap, in ONE transaction: lock the live tables (the live consumer waits on them), read
   the topics up to their ends *now* — everything the live consumer committed lies below —,
   write that last bit, rename live → `*_old_<tag>` and next → live, commit. The new
   `processed` table lists every event in the new rows, so whatever the live consumer
   redelivers or was in the middle of is skipped there; it carries on with the new tables.

Anything that fails before the commit leaves the live tables as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any

import asyncpg
import structlog
import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import Field, ValidationError

from services.status.adapters import (
    CARD_COLUMNS,
    FORMER_FOLLOWER,
    card_record,
    status_follower,
)
from services.status.projection import SubStates, decode_known, evolve, status_row
from services.status.settings import StatusSettings
from services.status.timeline import description
from shared.consumer import Inbound, MessageLimits, Rejected, parse_event
from shared.contracts import KNOWN_EVENT_TYPES
from shared.kafka import client_options
from shared.logging import configure_logging

log = structlog.get_logger()

# The live tables, in the order the live consumer's transaction takes them (processed first),
# so that locking them all cannot deadlock with it.
LIVE_TABLES = ("processed", "card_status", "card_timeline")
CARD_STATUS_COLUMNS = (*CARD_COLUMNS, "sub_states")
TIMELINE_COLUMNS = ("citizen_ref", "event_id", "type", "occurred_at", "description", "topic",
                    "stream_id", "version")
PROCESSED_COLUMNS = ("consumer", "message_id")
NEXT = "_next"


class RebuildSettings(StatusSettings):
    """The status service's settings plus the rebuild's budgets."""

    rebuild_batch_rows: int = Field(default=50_000, gt=0)
    rebuild_swap_max_lag: int = Field(default=2_000, ge=0)
    rebuild_catch_up_rounds: int = Field(default=20, gt=0)
    rebuild_lock_timeout_seconds: float = Field(default=5.0, gt=0)
    rebuild_swap_attempts: int = Field(default=5, gt=0)
    rebuild_stall_timeout_seconds: float = Field(default=60.0, gt=0)
    # Processes that load (fold and COPY) at once, each a share of the partition numbers;
    # a log smaller than `rebuild_split_min_events` is loaded by one, as starting another
    # costs about a second.
    rebuild_processes: int = Field(default_factory=lambda: min(2, os.cpu_count() or 1),
                                   ge=1, le=64)
    rebuild_split_min_events: int = Field(default=100_000, ge=0)


class RebuildError(RuntimeError):
    """The rebuild stopped; the live tables are untouched."""


class UnsplittableLogError(RebuildError):
    """Two load processes folded the same citizen or event: the log is not keyed by citizen
    throughout, so its partitions cannot be loaded apart."""


@dataclass(frozen=True, slots=True)
class Progress:
    """Reported after each batch read."""

    phase: str
    events: int
    target: int
    elapsed_s: float


@dataclass
class PhaseStats:
    name: str
    events: int = 0
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RebuildReport:
    """What the rebuild did; `old_tables` are those kept with `keep_old`."""

    phases: list[PhaseStats] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0
    duplicates: int = 0
    citizens: int = 0
    seconds: float = 0.0
    old_tables: list[str] = field(default_factory=list)
    load_processes: int = 1

    @property
    def events(self) -> int:
        return self.applied + self.skipped + self.duplicates

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


# --- the fold ---------------------------------------------------------------------------

class _Citizen:
    __slots__ = ("last_event_id", "sub", "updated_at")

    def __init__(self, sub: SubStates, updated_at: datetime, last_event_id: str) -> None:
        self.sub = sub
        self.updated_at = updated_at
        self.last_event_id = last_event_id


@dataclass
class Delta:
    """Rows not yet written: timeline and processed rows are new, status rows replace."""

    status: list[tuple[Any, ...]]
    timeline: list[tuple[Any, ...]]
    processed: list[tuple[str, str]]


_UPDATED_AT = CARD_STATUS_COLUMNS.index("updated_at")
_LAST_EVENT_ID = CARD_STATUS_COLUMNS.index("last_event_id")
_SUB_STATES = CARD_STATUS_COLUMNS.index("sub_states")


@dataclass(frozen=True, slots=True)
class FoldState:
    """What a load process hands back once its rows are written: per citizen what its status
    row holds of the fold (`updated_at`, `last_event_id`, the sub-states as JSON), every event
    id it applied, its counts, and where it stopped reading each partition."""

    citizens: dict[str, tuple[datetime, str, str]]
    seen: set[str]
    events: int
    applied: int
    skipped: int
    duplicates: int
    positions: dict[tuple[str, int], int]

    @staticmethod
    def compact(status: Iterable[tuple[Any, ...]]) -> dict[str, tuple[datetime, str, str]]:
        """What `citizens` keeps of status rows."""
        return {row[0]: (row[_UPDATED_AT], row[_LAST_EVENT_ID], row[_SUB_STATES])
                for row in status}

    @classmethod
    def of(cls, fold: ProjectionFold, citizens: dict[str, tuple[datetime, str, str]],
           events: int, positions: Mapping[TopicPartition, int]) -> FoldState:
        """`citizens`: `compact` of every status row the fold gave."""
        return cls(citizens, fold.seen, events, fold.applied, fold.skipped, fold.duplicates,
                   {(tp.topic, tp.partition): at for tp, at in positions.items()})


class ProjectionFold:
    """The read models in memory, fed message by message as the live consumer is.

    A message the live consumer would dead-letter (`parse_event` refuses it, its data does
    not decode) is skipped; an event id seen before is skipped, as the `processed` table
    does. Per citizen only the sub-states and the latest `(occurred_at, event_id)` are kept:
    `status_row` of those is the row `project` reaches event by event. Processed rows go
    under the name of the live follower of the event's topic, `consumer(contract_topic)`.
    """

    def __init__(self, consumer: Callable[[str], str] = status_follower,
                 limits: MessageLimits | None = None) -> None:
        self.consumer = consumer
        self.limits = limits or MessageLimits()
        self.citizens: dict[str, _Citizen] = {}
        # Citizens another process folded (`adopt`), kept as their rows hold them until an
        # event of theirs comes: most never do, and parsing them all would cost seconds.
        self.adopted: dict[str, tuple[datetime, str, str]] = {}
        self.seen: set[str] = set()
        self.applied = self.skipped = self.duplicates = 0
        self._timeline: list[tuple[Any, ...]] = []
        self._processed: list[tuple[str, str]] = []
        self._dirty: set[str] = set()

    def add(self, contract_topic: str, message: Inbound) -> None:
        try:
            envelope = parse_event(message, KNOWN_EVENT_TYPES[contract_topic], self.limits)
            event_id = str(envelope.event_id)
            if event_id in self.seen:
                self.duplicates += 1
                return
            event = decode_known(envelope)
        except (Rejected, ValidationError):
            self.skipped += 1
            return
        except Exception:  # the live consumer retries, then dead-letters it too
            log.warning("rebuild.message_skipped", topic=message.topic,
                        partition=message.partition, offset=message.offset, exc_info=True)
            self.skipped += 1
            return
        ref, occurred_at = envelope.citizen_ref, envelope.occurred_at
        citizen = self.citizens.get(ref)
        if citizen is None and ref in self.adopted:
            updated_at, last_event_id, stored = self.adopted.pop(ref)
            citizen = self.citizens[ref] = _Citizen(SubStates.model_validate_json(stored),
                                                    updated_at, last_event_id)
        if citizen is None:
            sub = evolve(SubStates(), event) if event is not None else SubStates()
            self.citizens[ref] = _Citizen(sub, occurred_at, event_id)
        else:
            if event is not None:
                citizen.sub = evolve(citizen.sub, event)
            if (occurred_at, event_id) > (citizen.updated_at, citizen.last_event_id):
                citizen.updated_at, citizen.last_event_id = occurred_at, event_id
        self.seen.add(event_id)
        self._dirty.add(ref)
        self._timeline.append((ref, event_id, envelope.type, occurred_at,
                               description(envelope, event), contract_topic,
                               envelope.stream_id, envelope.version))
        self._processed.append((self.consumer(contract_topic), event_id))
        self.applied += 1

    @property
    def pending_rows(self) -> int:
        return len(self._timeline)

    @property
    def citizen_count(self) -> int:
        return len(self.citizens) + len(self.adopted)

    def adopt(self, part: FoldState) -> None:
        """Carry on from another process's fold of other partitions, whose rows it wrote.
        Raises `UnsplittableLogError` if both folds hold a citizen or an event id: folded apart,
        their rows would differ from one fold's."""
        if not (self.seen.isdisjoint(part.seen)
                and self.citizens.keys().isdisjoint(part.citizens)
                and self.adopted.keys().isdisjoint(part.citizens)):
            raise UnsplittableLogError(
                "a citizen's events (or an event id) lie in two partition numbers")
        self.adopted.update(part.citizens)
        self.seen |= part.seen
        self.applied += part.applied
        self.skipped += part.skipped
        self.duplicates += part.duplicates

    def row(self, citizen_ref: str) -> tuple[Any, ...]:
        c = self.citizens[citizen_ref]
        return card_record(status_row(citizen_ref, c.sub, c.updated_at, c.last_event_id))

    def take(self, *, with_status: bool) -> Delta:
        """The rows added since the last take; status rows of the citizens they touched."""
        status = [self.row(ref) for ref in self._dirty] if with_status else []
        if with_status:
            self._dirty = set()
        delta = Delta(status, self._timeline, self._processed)
        self._timeline, self._processed = [], []
        return delta

    def take_all_status(self) -> list[tuple[Any, ...]]:
        """The status rows of every citizen this fold holds (not of those it adopted, whose
        rows are written)."""
        return [row for rows in self.all_status(max(1, len(self.citizens))) for row in rows]

    def all_status(self, size: int) -> Iterator[list[tuple[Any, ...]]]:
        """`take_all_status`, `size` rows at a time."""
        self._dirty = set()
        refs = list(self.citizens)
        for start in range(0, len(refs), size):
            yield [self.row(ref) for ref in refs[start:start + size]]


# --- reading the topics ------------------------------------------------------------------


class TopicReader:
    """The event topics from offset 0, read with a consumer of our own; `after_batch` runs
    after each batch has been folded."""

    def __init__(self, settings: RebuildSettings,
                 after_batch: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.after_batch = after_batch
        self.contract_of = {topic: contract for contract, topic
                            in settings.consumed_topics().items()}
        self.partitions: list[TopicPartition] = []
        self._started: list[AIOKafkaConsumer] = []

    @property
    def consumer(self) -> AIOKafkaConsumer:
        """The reading consumer: no group, nothing committed; `assign` says what it reads."""
        return self._started[1]

    @property
    def offsets(self) -> AIOKafkaConsumer:
        """End offsets come over a connection of their own: on the reading one they would
        queue behind the fetcher's long poll."""
        return self._started[0]

    async def start(self) -> None:
        bootstrap = self.settings.kafka_bootstrap
        security = client_options(self.settings)
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                    client_id="carddesk-status-rebuild", **security)
        await admin.start()
        try:
            # Listed first: describing a missing topic may make the broker create it.
            missing = set(self.contract_of) - set(await admin.list_topics())
            if missing:
                raise RebuildError(f"topics {', '.join(sorted(missing))} do not exist")
            described = await admin.describe_topics(list(self.contract_of))
        finally:
            await admin.close()
        for topic in described:
            if topic["error_code"] != 0 or not topic["partitions"]:
                raise RebuildError(f"topic {topic['topic']} cannot be read")
            self.partitions.extend(TopicPartition(topic["topic"], p["partition"])
                                   for p in sorted(topic["partitions"],
                                                   key=lambda p: int(p["partition"])))
        for consumer in (
            AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False,
                             client_id="carddesk-status-rebuild-offsets", **security),
            AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             client_id="carddesk-status-rebuild",
                             max_partition_fetch_bytes=8 * 1024 * 1024,
                             fetch_max_bytes=64 * 1024 * 1024, **security),
        ):
            self._started.append(consumer)
            await consumer.start()

    async def assign(self, partitions: Iterable[TopicPartition],
                     at: Mapping[TopicPartition, int] | None = None) -> None:
        """Read `partitions` from `at` (from their beginning where it has none)."""
        partitions = list(partitions)
        at = at or {}
        self.consumer.assign(partitions)
        if fresh := [tp for tp in partitions if tp not in at]:
            await self.consumer.seek_to_beginning(*fresh)
        for tp in partitions:
            if tp in at:
                self.consumer.seek(tp, at[tp])

    async def stop(self) -> None:
        while self._started:
            await self._started.pop().stop()

    async def ends(self) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = await self.offsets.end_offsets(self.partitions)
        return ends

    async def size(self, targets: Mapping[TopicPartition, int]) -> int:
        """The records from each partition's beginning up to its target."""
        starts = await self.offsets.beginning_offsets(list(targets))
        return sum(max(0, end - starts[tp]) for tp, end in targets.items())

    def split(self, processes: int) -> list[frozenset[int]]:
        """The partition numbers shared out among `processes`, by round robin; one share
        where the topics differ in partition count (their numbers would not match a
        citizen's partition of each)."""
        counts = Counter(tp.topic for tp in self.partitions)
        numbers = range(max(counts.values(), default=0))
        if len(set(counts.values())) != 1 or processes <= 1:
            return [frozenset(numbers)]
        shares = min(processes, len(numbers))
        return [frozenset(numbers[i::shares]) for i in range(shares)]

    async def lag(self, targets: Mapping[TopicPartition, int]) -> int:
        lag = 0
        for tp, end in targets.items():
            lag += max(0, end - await self.consumer.position(tp))
        return lag

    async def read_to(self, targets: Mapping[TopicPartition, int], fold: ProjectionFold,
                      *, on_batch: Callable[[int], Awaitable[None]] | None = None) -> int:
        """Feed `fold` until every partition's position reaches its target; the count read.
        `on_batch` runs after each batch, before the next fetch."""
        count = 0
        behind = {tp: end for tp, end in targets.items()
                  if await self.consumer.position(tp) < end}
        last_progress = time.monotonic()
        while behind:
            batch = await self.consumer.getmany(timeout_ms=500, max_records=20_000)
            for tp, records in batch.items():
                contract_topic = self.contract_of[tp.topic]
                for record in records:
                    fold.add(contract_topic, Inbound(record.topic, record.partition,
                                                     record.offset, record.key,
                                                     record.value or b""))
                count += len(records)
            if batch:
                last_progress = time.monotonic()
                self.after_batch()
                if on_batch is not None:
                    await on_batch(count)
            elif time.monotonic() - last_progress > self.settings.rebuild_stall_timeout_seconds:
                raise RebuildError(f"no progress reading the topics; still behind on {behind}")
            for tp in list(behind):
                if await self.consumer.position(tp) >= behind[tp]:
                    del behind[tp]
        return count


# --- the tables ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IndexDef:
    """An index of a live table, or the constraint it backs."""

    name: str
    constraint: str | None
    definition: str  # the constraint's definition, else CREATE INDEX …


async def _indexes(conn: asyncpg.Connection, schema: str, table: str) -> list[IndexDef]:
    rows = await conn.fetch(
        "SELECT i.relname, c.conname, pg_get_indexdef(i.oid) AS indexdef,"
        " pg_get_constraintdef(c.oid) AS condef"
        " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid"
        "  AND c.contype IN ('p', 'u', 'x')"
        " WHERE x.indrelid = $1::regclass ORDER BY i.relname",
        f"{schema}.{table}",
    )
    return [IndexDef(r["relname"], r["conname"], r["condef"] or r["indexdef"]) for r in rows]


_CREATE_INDEX = re.compile(r"^CREATE (UNIQUE )?INDEX \S+ ON (?:ONLY )?\S+ (.*)$", re.S)


def _renamed(name: str, suffix: str) -> str:
    new = f"{name}{suffix}"
    if len(new) > 63:
        raise RebuildError(f"identifier {new} is longer than PostgreSQL allows")
    return new


class NextTables:
    """`card_status_next`, `card_timeline_next` and `processed_next`, shaped like the live ones."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.indexes: dict[str, list[IndexDef]] = {}

    def name(self, table: str) -> str:
        return f"{self.schema}.{table}{NEXT}"

    async def create(self, conn: asyncpg.Connection) -> None:
        """Fresh tables without indexes (COPY is faster without); a leftover run's are dropped."""
        for table in LIVE_TABLES:
            if await conn.fetchval("SELECT to_regclass($1)", f"{self.schema}.{table}") is None:
                raise RebuildError(f"{self.schema}.{table} does not exist: start the status"
                                   " service once so that it creates its tables")
            self.indexes[table] = await _indexes(conn, self.schema, table)
        await self.drop(conn)
        for table in LIVE_TABLES:
            await conn.execute(
                f"CREATE TABLE {self.name(table)} (LIKE {self.schema}.{table}"
                " INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)")

    async def drop(self, conn: asyncpg.Connection) -> None:
        for table in LIVE_TABLES:
            await conn.execute(f"DROP TABLE IF EXISTS {self.name(table)}")

    async def add_indexes(self, conn: asyncpg.Connection, table: str) -> None:
        """The live table's indexes and key constraints, named `<live name>_next`; then its
        statistics, so that the first queries after the swap are planned well."""
        await conn.execute("SET maintenance_work_mem = '256MB'")
        try:
            for index in self.indexes[table]:
                if index.constraint is not None:
                    await conn.execute(
                        f"ALTER TABLE {self.name(table)} ADD CONSTRAINT"
                        f" {_renamed(index.constraint, NEXT)} {index.definition}")
                    continue
                match = _CREATE_INDEX.match(index.definition)
                if match is None:
                    raise RebuildError(f"cannot copy index {index.name}: {index.definition}")
                await conn.execute(
                    f"CREATE {match.group(1) or ''}INDEX {_renamed(index.name, NEXT)}"
                    f" ON {self.name(table)} {match.group(2)}")
            await conn.execute(f"ANALYZE {self.name(table)}")
        finally:
            await conn.execute("RESET maintenance_work_mem")

    async def swap(self, conn: asyncpg.Connection, tag: str) -> list[str]:
        """Live → `<table>_old_<tag>`, next → live, with their indexes; in the caller's
        transaction. Returns the old tables' names."""
        old_suffix = f"_old_{tag}"
        old_tables: list[str] = []
        for table, indexes in self.indexes.items():
            live = f"{self.schema}.{table}"
            for index in await _indexes(conn, self.schema, table):
                await _rename_index(conn, self.schema, table, index,
                                    _renamed(index.name, old_suffix), index.constraint
                                    and _renamed(index.constraint, old_suffix))
            await conn.execute(f"ALTER TABLE {live} RENAME TO {_renamed(table, old_suffix)}")
            old_tables.append(f"{self.schema}.{table}{old_suffix}")
            await conn.execute(f"ALTER TABLE {self.name(table)} RENAME TO {table}")
            for index in indexes:
                await _rename_index(conn, self.schema, table,
                                    IndexDef(_renamed(index.name, NEXT),
                                             index.constraint and _renamed(index.constraint,
                                                                           NEXT), ""),
                                    index.name, index.constraint)
        return old_tables


async def _rename_index(conn: asyncpg.Connection, schema: str, table: str, index: IndexDef,
                        new_name: str, new_constraint: str | None) -> None:
    if index.constraint is not None and new_constraint is not None:
        # Renaming the constraint renames the index that backs it.
        await conn.execute(f"ALTER TABLE {schema}.{table} RENAME CONSTRAINT"
                           f" {index.constraint} TO {new_constraint}")
    else:
        await conn.execute(f"ALTER INDEX {schema}.{index.name} RENAME TO {new_name}")


async def write_delta(conn: asyncpg.Connection, schema: str, delta: Delta, *,
                      replace: bool = True) -> None:
    """New timeline and processed rows by COPY; status rows replace what is there (or, with
    `replace` off, are new too: the first load, before the keys exist)."""
    if delta.timeline:
        await conn.copy_records_to_table(f"card_timeline{NEXT}", schema_name=schema,
                                         records=delta.timeline, columns=TIMELINE_COLUMNS)
    if delta.processed:
        await conn.copy_records_to_table(f"processed{NEXT}", schema_name=schema,
                                         records=delta.processed, columns=PROCESSED_COLUMNS)
    if delta.status and not replace:
        await conn.copy_records_to_table(f"card_status{NEXT}", schema_name=schema,
                                         records=delta.status, columns=CARD_STATUS_COLUMNS)
    elif delta.status:
        async with conn.transaction():
            await conn.execute(f"CREATE TEMP TABLE card_status_delta (LIKE {schema}.card_status"
                               f"{NEXT}) ON COMMIT DROP")
            await conn.copy_records_to_table("card_status_delta", records=delta.status,
                                             columns=CARD_STATUS_COLUMNS)
            columns = ", ".join(CARD_STATUS_COLUMNS)
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in CARD_STATUS_COLUMNS[1:])
            await conn.execute(
                f"INSERT INTO {schema}.card_status{NEXT} ({columns})"
                f" SELECT {columns} FROM card_status_delta"
                f" ON CONFLICT (citizen_ref) DO UPDATE SET {updates}")


# --- the whole run -------------------------------------------------------------------------


def _silent(_: Progress) -> None:
    return None


async def rebuild(settings: RebuildSettings, *, keep_old: bool = False,
                  progress: Callable[[Progress], None] = _silent,
                  before_swap: Callable[[], Awaitable[None]] | None = None,
                  allow_shrink: bool = False) -> RebuildReport:
    """Load, catch up, swap. Raises `RebuildError` (or the underlying error) with the live
    tables untouched if anything before the swap's commit fails. `before_swap` runs between
    the catch-up and the swap (tests write events there). Citizens of the live table that
    the topics do not explain stop the rebuild, unless `allow_shrink`."""
    schema = settings.status_schema
    started = time.monotonic()
    report = RebuildReport()
    tables = NextTables(schema)
    pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=4)
    processes = settings.rebuild_processes
    try:
        async with pool.acquire() as guard:
            if not await guard.fetchval("SELECT pg_try_advisory_lock(hashtext($1))",
                                        f"rebuild:{schema}"):
                raise RebuildError(f"another rebuild of {schema} is running")
            try:
                while True:
                    fold = ProjectionFold(limits=MessageLimits.from_settings(settings))
                    # The fold keeps every citizen's state and every event id until the
                    # swap: millions of long-lived objects, which each full pass of Python's
                    # cyclic collector would scan again (in a rebuild of 390,000 events, 14
                    # full passes took 2.3 s of about 25). Frozen after each batch, they stay
                    # out of its sight until the rebuild ends. What is dropped is still freed
                    # by its reference count; only cyclic garbage frozen with a batch waits
                    # for the end.
                    reader = TopicReader(settings, after_batch=gc.freeze)
                    await tables.create(guard)
                    try:
                        await reader.start()
                        await _load(settings, pool, reader, fold, tables, report, progress,
                                    processes)
                        await _catch_up(settings, pool, reader, fold, report, progress)
                        if not allow_shrink:
                            await _nothing_dropped(guard, schema)
                        if before_swap is not None:
                            await before_swap()
                        report.old_tables = await _swap(settings, guard, reader, fold,
                                                        tables, report, progress)
                        break
                    except UnsplittableLogError as unsplittable:
                        if processes == 1:
                            raise  # cannot happen: one fold adopts nothing
                        log.warning("rebuild.split_mismatch", reason=str(unsplittable),
                                    action="loading again in one process")
                        processes = 1
                        report.phases.clear()
                        gc.unfreeze()
                        with contextlib.suppress(Exception):
                            await tables.drop(guard)
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await tables.drop(guard)
                        raise
                    finally:
                        await reader.stop()
                if not keep_old:
                    await _drop_old(settings, guard, report.old_tables)
                    report.old_tables = []
            finally:
                await guard.execute("SELECT pg_advisory_unlock(hashtext($1))",
                                    f"rebuild:{schema}")
    finally:
        gc.unfreeze()
        await pool.close()
    report.applied, report.skipped = fold.applied, fold.skipped
    report.duplicates, report.citizens = fold.duplicates, fold.citizen_count
    report.seconds = time.monotonic() - started
    log.info("rebuild.done", events=report.events, applied=report.applied,
             skipped=report.skipped, duplicates=report.duplicates, citizens=report.citizens,
             seconds=round(report.seconds, 3), events_per_s=round(report.rate))
    return report


async def _read_and_copy(settings: RebuildSettings, pool: asyncpg.Pool, reader: TopicReader,
                         fold: ProjectionFold, targets: Mapping[TopicPartition, int],
                         on_progress: Callable[[int], None], *, hand_back: bool = False,
                         ) -> tuple[int, float, dict[str, tuple[datetime, str, str]]]:
    """Fold the assigned partitions up to `targets`, COPY'ing timeline and processed rows
    batch by batch while reading on, then every status row, `rebuild_batch_rows` at a time.
    `on_progress(events read)` runs after each batch read and each COPY. Returns the count
    read, the seconds spent waiting for a COPY, and with `hand_back` `FoldState.compact` of
    the status rows written."""
    schema = settings.status_schema
    flushing: asyncio.Task[None] | None = None
    waited = 0.0
    read = 0

    async def flush(delta: Delta) -> None:
        async with pool.acquire() as conn:
            await write_delta(conn, schema, delta, replace=False)
        on_progress(read)

    async def on_batch(count: int) -> None:
        nonlocal flushing, waited, read
        read = count
        on_progress(count)
        if fold.pending_rows >= settings.rebuild_batch_rows:
            if flushing is not None:
                wait_started = time.monotonic()
                await flushing
                waited += time.monotonic() - wait_started
            # One COPY runs while the next batch is read and folded.
            flushing = asyncio.create_task(flush(fold.take(with_status=False)))

    handed: dict[str, tuple[datetime, str, str]] = {}
    try:
        events = await reader.read_to(targets, fold, on_batch=on_batch)
        if flushing is not None:
            await flushing
        await flush(fold.take(with_status=False))
        for rows in fold.all_status(settings.rebuild_batch_rows):
            await flush(Delta(rows, [], []))
            if hand_back:
                handed.update(FoldState.compact(rows))
    finally:
        if flushing is not None and not flushing.done():
            flushing.cancel()
    return events, waited, handed


async def _load(settings: RebuildSettings, pool: asyncpg.Pool, reader: TopicReader,
                fold: ProjectionFold, tables: NextTables, report: RebuildReport,
                progress: Callable[[Progress], None], processes: int) -> None:
    """Phase 1: everything up to the snapshot, COPY'd batch by batch while reading on; the
    first share of the partition numbers here, the others in load processes of their own."""
    phase = PhaseStats("load")
    started = time.monotonic()
    targets = await reader.ends()
    target = await reader.size(targets)
    shares = reader.split(processes if target >= settings.rebuild_split_min_events else 1)
    mine = {tp: end for tp, end in targets.items() if tp.partition in shares[0]}
    helpers: list[LoadProcess] = []
    try:
        for share in shares[1:]:
            helpers.append(LoadProcess(settings, {tp: end for tp, end in targets.items()
                                                  if tp.partition in share}))

        def show(own: int) -> None:
            done = own + sum(helper.count for helper in helpers)
            progress(Progress("load", done, target, time.monotonic() - started))

        await reader.assign(mine)
        own, waited, _ = await _read_and_copy(settings, pool, reader, fold, mine, show)
        phase.events = own
        at = {tp: await reader.consumer.position(tp) for tp in mine}
        for helper in helpers:
            part = await helper.result(lambda: show(own),
                                       settings.rebuild_stall_timeout_seconds)
            fold.adopt(part)
            phase.events += part.events
            at.update({TopicPartition(topic, partition): position
                       for (topic, partition), position in part.positions.items()})
        # The catch-up reads every partition on from where its process stopped.
        await reader.assign(targets, at)
    finally:
        for helper in helpers:
            helper.stop()
    loaded = time.monotonic()

    async def index(table: str) -> None:
        async with pool.acquire() as conn:
            await tables.add_indexes(conn, table)

    # After the load, not before: building an index at once beats growing it row by row.
    await asyncio.gather(*(index(table) for table in LIVE_TABLES))
    phase.seconds = time.monotonic() - started
    report.phases.append(phase)
    report.load_processes = len(shares)
    log.info("rebuild.loaded", events=phase.events, seconds=round(phase.seconds, 3),
             events_per_s=round(phase.rate), citizens=fold.citizen_count,
             processes=len(shares), copy_wait_s=round(waited, 3),
             index_s=round(phase.seconds - (loaded - started), 3))


# --- load processes --------------------------------------------------------------------


class LoadProcess:
    """A process (spawned: a fork of a running event loop is unsafe) that loads some
    partitions up to their targets into the next tables and hands back its fold's state.
    `count` is what it has read so far."""

    def __init__(self, settings: RebuildSettings, targets: Mapping[TopicPartition, int]) -> None:
        context = multiprocessing.get_context("spawn")
        self._results, sending = context.Pipe(duplex=False)
        self._count = context.Value("q", 0, lock=False)
        self._beats = context.Value("q", 0, lock=False)  # one per batch read, per COPY
        self.process = context.Process(
            target=_load_process, name="carddesk-rebuild-load", daemon=True,
            args=(settings, [(tp.topic, tp.partition, end) for tp, end in targets.items()],
                  sending, self._count, self._beats))
        self.process.start()
        sending.close()  # the child's end only: its exit is then our end-of-file

    @property
    def count(self) -> int:
        return int(self._count.value)

    @property
    def beats(self) -> int:
        return int(self._beats.value)

    async def result(self, tick: Callable[[], None], stall_timeout_s: float) -> FoldState:
        """Its fold's state once it is done; `tick` every half second meanwhile. A process
        that dies without a result, or that neither reads nor writes for `stall_timeout_s`
        while we wait, is a `RebuildError` (and `stop` ends it)."""
        receiving = asyncio.ensure_future(asyncio.to_thread(self._results.recv))
        seen, moved = self.beats, time.monotonic()
        try:
            while not receiving.done():
                await asyncio.wait({receiving}, timeout=0.5)
                tick()
                if self.beats != seen:
                    seen, moved = self.beats, time.monotonic()
                elif not receiving.done() and time.monotonic() - moved > stall_timeout_s:
                    raise RebuildError(f"a load process read and wrote nothing for"
                                       f" {stall_timeout_s:g} s (at {self.count:,} events)")
        finally:
            # Cancelled here: the thread ends when `stop` ends the process; nobody waits.
            receiving.cancel()
        try:
            outcome, value = receiving.result()
        except EOFError:
            raise RebuildError("a load process ended without handing back its fold (exit code"
                               f" {self.process.exitcode})") from None
        if outcome != "ok":
            raise RebuildError(f"a load process failed: {value}")
        state: FoldState = value
        return state

    def stop(self) -> None:
        """Ends the process if it still runs (the rebuild failed elsewhere)."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=10)
        self._results.close()


def _load_process(settings: RebuildSettings, targets: list[tuple[str, int, int]],
                  results: Connection, count: Any, beats: Any) -> None:
    """A load process's body: ("ok", FoldState) or ("error", what went wrong) down `results`."""
    configure_logging("status-rebuild", "WARNING")
    try:
        state = uvloop.run(_load_share(settings, {TopicPartition(topic, partition): end
                                                  for topic, partition, end in targets},
                                       count, beats))
        results.send(("ok", state))
    except BaseException as error:  # interrupted too: the parent hears of it at once
        results.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        results.close()


async def _load_share(settings: RebuildSettings, targets: Mapping[TopicPartition, int],
                      count: Any, beats: Any) -> FoldState:
    fold = ProjectionFold(limits=MessageLimits.from_settings(settings))
    reader = TopicReader(settings, after_batch=gc.freeze)  # as in the parent, see `rebuild`
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        await reader.start()
        await reader.assign(targets)

        def counted(events: int) -> None:
            count.value = events
            beats.value += 1

        events, _, citizens = await _read_and_copy(settings, pool, reader, fold, targets,
                                                   counted, hand_back=True)
        positions = {tp: await reader.consumer.position(tp) for tp in targets}
    finally:
        await reader.stop()
        await pool.close()
    return FoldState.of(fold, citizens, events, positions)


async def _catch_up(settings: RebuildSettings, pool: asyncpg.Pool, reader: TopicReader,
                    fold: ProjectionFold, report: RebuildReport,
                    progress: Callable[[Progress], None]) -> None:
    """Phase 2: read on to the moving ends until what is left for the swap is small."""
    phase = PhaseStats("catch-up")
    started = time.monotonic()
    for _ in range(settings.rebuild_catch_up_rounds):
        targets = await reader.ends()
        if await reader.lag(targets) <= settings.rebuild_swap_max_lag:
            break
        phase.events += await reader.read_to(targets, fold)
        async with pool.acquire() as conn:
            await write_delta(conn, settings.status_schema, fold.take(with_status=True))
        progress(Progress("catch-up", phase.events, phase.events, time.monotonic() - started))
    phase.seconds = time.monotonic() - started
    report.phases.append(phase)


async def _nothing_dropped(conn: asyncpg.Connection, schema: str) -> None:
    """The live consumer only ever adds rows, so the new table must cover the live one;
    if not, the topics read are not those the live tables came from."""
    missing = await conn.fetchval(
        f"SELECT count(*) FROM {schema}.card_status live WHERE NOT EXISTS"
        f" (SELECT 1 FROM {schema}.card_status{NEXT} n WHERE n.citizen_ref = live.citizen_ref)")
    if missing:
        raise RebuildError(f"{missing} citizens of the live card_status are not in the topics"
                           " read; wrong topics? (allow_shrink replaces the tables anyway)")


async def _swap(settings: RebuildSettings, conn: asyncpg.Connection, reader: TopicReader,
                fold: ProjectionFold, tables: NextTables, report: RebuildReport,
                progress: Callable[[Progress], None]) -> list[str]:
    """Phase 3: lock, read to the ends now, write the rest, rename; one transaction."""
    schema = settings.status_schema
    phase = PhaseStats("swap")
    started = time.monotonic()
    lock_ms = int(settings.rebuild_lock_timeout_seconds * 1000)
    for attempt in range(1, settings.rebuild_swap_attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {lock_ms}")
                # Serialises with a status service's schema migration at start-up.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
                await conn.execute(
                    "LOCK TABLE " + ", ".join(f"{schema}.{t}" for t in LIVE_TABLES)
                    + " IN ACCESS EXCLUSIVE MODE")
                locked = time.monotonic()
                # The live consumer is blocked now: whatever it committed is below these ends.
                phase.events += await reader.read_to(await reader.ends(), fold)
                await write_delta(conn, schema, fold.take(with_status=True))
                # Rows other consumers recorded in this schema's processed table stay.
                await conn.execute(
                    f"INSERT INTO {schema}.processed{NEXT} SELECT * FROM {schema}.processed"
                    " WHERE consumer <> ALL($1::text[])",
                    [FORMER_FOLLOWER, *map(fold.consumer, settings.consumed_topics())])
                tag = time.strftime("%Y%m%d%H%M%S")
                old_tables = await tables.swap(conn, tag)
            log.info("rebuild.swapped", attempt=attempt, events=phase.events,
                     locked_ms=round((time.monotonic() - locked) * 1000))
            break
        except asyncpg.exceptions.LockNotAvailableError:
            log.warning("rebuild.lock_timeout", attempt=attempt)
            if attempt == settings.rebuild_swap_attempts:
                raise RebuildError("could not lock the live tables; they are untouched") from None
            phase.events += await reader.read_to(await reader.ends(), fold)
            await write_delta(conn, schema, fold.take(with_status=True))
    phase.seconds = time.monotonic() - started
    report.phases.append(phase)
    progress(Progress("swap", phase.events, phase.events, phase.seconds))
    return old_tables


async def _drop_old(settings: RebuildSettings, conn: asyncpg.Connection,
                    old_tables: Iterable[str]) -> None:
    """The replaced tables go; a query still running on one only delays this."""
    lock_ms = int(settings.rebuild_lock_timeout_seconds * 1000)
    for table in old_tables:
        for attempt in range(1, settings.rebuild_swap_attempts + 1):
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {lock_ms}")
                    await conn.execute(f"DROP TABLE IF EXISTS {table}")
                break
            except asyncpg.exceptions.LockNotAvailableError:
                if attempt == settings.rebuild_swap_attempts:
                    raise RebuildError(f"the projections were swapped, but {table} could not"
                                       " be dropped; drop it by hand") from None
