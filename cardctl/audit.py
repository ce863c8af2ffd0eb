"""The auditor's tools: verify the event log's hash chains, and replay it into card status.

Both read the four event topics from their first offset with a consumer of their own (no
consumer group, every partition assigned by hand) up to the end offsets seen when they
start, so they never disturb the services' consumer groups.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
import typer
import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from services.status.adapters import fetch_card, fetch_timeline
from services.status.projection import CardStatusRow, project
from services.status.settings import StatusSettings
from services.status.timeline import ListedEntry, TimelineEntry, listed_timeline, timeline_entry
from shared.consumer import Inbound, Rejected, parse_event
from shared.contracts import EVENT_TOPICS, KNOWN_EVENT_TYPES
from shared.envelope import StreamCursor
from shared.identity import citizen_ref, is_valid_id_number
from shared.kafka import AUDITOR, as_principal, client_options
from shared.masking import mask_text
from shared.settings import CardDeskSettings

CONTRACT_TOPICS: tuple[str, ...] = tuple(EVENT_TOPICS.values())
# Fields every envelope needs before its chain can be followed at all.
_CHAIN_FIELDS: tuple[tuple[str, type], ...] = (
    ("event_id", str), ("stream_id", str), ("version", int), ("prev_hash", str), ("hash", str),
)

Sink = Callable[[Inbound], None]


# --- verify: the pure check ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Failure:
    """One thing wrong in the log, where it is and, when known, which event it concerns."""

    topic: str
    partition: int
    offset: int
    reason: str
    stream_id: str | None = None
    version: int | None = None

    def describe(self) -> str:
        event = f"{self.stream_id} v{self.version}" if self.stream_id is not None else "message"
        return f"{event} at {self.topic}[{self.partition}]@{self.offset}: {self.reason}"


@dataclass(slots=True)
class _Stream:
    cursor: StreamCursor
    topic: str
    partition: int


@dataclass(slots=True)
class _Seen:
    digest: bytes
    topic: str
    partition: int


@dataclass
class VerifyReport:
    messages: Counter[str]
    streams: int
    events: int
    duplicates: int
    failures: list[Failure]
    missing_topics: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.missing_topics


class LogVerifier:
    """Checks messages fed in log order: every stream's hash chain and gapless versions,
    unique event ids, one topic and partition per stream.

    An identical redelivery (same event id, same bytes, same partition) is what the outbox
    relay produces when it crashes between Kafka's ack and its bookkeeping: it is counted and
    skipped. Parsing stays minimal (`json.loads` and the hash) so a long log checks fast."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}
        self._seen: dict[str, _Seen] = {}
        self.messages: Counter[str] = Counter()
        self.events = 0
        self.duplicates = 0
        self.failures: list[Failure] = []

    def feed(self, msg: Inbound) -> None:
        self.messages[msg.topic] += 1
        body = self._chain_fields(msg)
        if body is None:
            return
        stream_id: str = body["stream_id"]
        version: int = body["version"]
        if self._is_redelivery(msg, body["event_id"], stream_id, version):
            self.duplicates += 1
            return
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(StreamCursor(stream_id), msg.topic,
                                                        msg.partition)
        elif (stream.topic, stream.partition) != (msg.topic, msg.partition):
            self._fail(msg, f"stream is on {stream.topic}[{stream.partition}]; this event is not",
                       stream_id, version)
        for chain_break in stream.cursor.check(body):
            self._fail(msg, chain_break.reason, stream_id, version)
        self.events += 1

    def _chain_fields(self, msg: Inbound) -> dict[str, Any] | None:
        """The message as a JSON object with every field of `_CHAIN_FIELDS` of its type, or
        None (and a failure) when it is not one."""
        try:
            body = json.loads(msg.value)
        # JSONDecodeError and UnicodeDecodeError alike.
        except ValueError as exc:
            self._fail(msg, f"unparseable: not JSON ({str(exc)[:200]})")
            return None
        except RecursionError:  # a poison `[[[…` nested deeper than the parser goes
            self._fail(msg, "unparseable: JSON nested too deeply")
            return None
        if not isinstance(body, dict):
            self._fail(msg, "unparseable: not a JSON object")
            return None
        stream_id, version = body.get("stream_id"), body.get("version")
        wrong = [name for name, kind in _CHAIN_FIELDS
                 if not isinstance(body.get(name), kind) or isinstance(body.get(name), bool)]
        if wrong or not isinstance(stream_id, str) or not isinstance(version, int):
            self._fail(msg, f"unparseable: envelope field(s) {', '.join(wrong)} missing or"
                       " mistyped", stream_id if isinstance(stream_id, str) else None,
                       version if type(version) is int else None)
            return None
        return body

    def _is_redelivery(self, msg: Inbound, event_id: str, stream_id: str, version: int) -> bool:
        """Whether `msg` repeats, byte for byte and in the same partition, an event already
        seen; an event id seen with other bytes or elsewhere is a failure (and not skipped)."""
        digest = hashlib.blake2b(msg.value, digest_size=16).digest()
        seen = self._seen.get(event_id)
        if seen is None:
            self._seen[event_id] = _Seen(digest, msg.topic, msg.partition)
        elif seen.digest == digest and (seen.topic, seen.partition) == (msg.topic, msg.partition):
            return True
        elif seen.digest == digest:
            self._fail(msg, f"event id {event_id} copied from {seen.topic}[{seen.partition}]",
                       stream_id, version)
        else:
            self._fail(msg, f"event id {event_id} reused with different content",
                       stream_id, version)
        return False

    def _fail(self, msg: Inbound, reason: str, stream_id: str | None = None,
              version: int | None = None) -> None:
        self.failures.append(Failure(msg.topic, msg.partition, msg.offset, reason, stream_id,
                                     version))

    def report(self, missing_topics: Sequence[str] = ()) -> VerifyReport:
        return VerifyReport(Counter(self.messages), len(self._streams), self.events,
                            self.duplicates, list(self.failures), list(missing_topics))


def verify_messages(messages: Iterable[Inbound]) -> VerifyReport:
    """Check an in-memory log (tests, tools); messages in log order."""
    verifier = LogVerifier()
    for msg in messages:
        verifier.feed(msg)
    return verifier.report()


# --- reading the log ----------------------------------------------------------------------


class LogReadError(RuntimeError):
    """The log could not be read to its end (Kafka stopped answering)."""


async def partitions_of(bootstrap: str, topics: Sequence[str], *,
                        security: Mapping[str, Any]) -> dict[str, list[int]]:
    """The partitions of each of `topics` that exists; asks for every topic's metadata so
    that no broker creates a missing one on the way."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    await admin.start()
    try:
        described = await admin.describe_topics()
    finally:
        await admin.close()
    wanted = set(topics)
    return {t["topic"]: sorted(p["partition"] for p in t["partitions"])
            for t in described if t["topic"] in wanted and t["error_code"] == 0}


def progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=console, transient=True)


async def read_log(
    bootstrap: str, topics: Sequence[str], sink: Sink, *, security: Mapping[str, Any],
    progress: Progress | None = None,
    stall_timeout_s: float = 60.0,
) -> list[str]:
    """Feed `sink` every message of `topics`, per partition in offset order, from the first
    offset to the end offsets seen at the start; returns the topics that do not exist."""
    layout = await partitions_of(bootstrap, topics, security=security)
    missing = [t for t in topics if t not in layout]
    partitions = [TopicPartition(t, p) for t in topics for p in layout.get(t, ())]
    if not partitions:
        return missing
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, **security,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                max_partition_fetch_bytes=8 * 1024 * 1024,
                                fetch_max_bytes=64 * 1024 * 1024)
    await consumer.start()
    try:
        consumer.assign(partitions)
        reader = _PartitionsReader(consumer, sink, progress)
        await reader.start(partitions)
        await reader.read_to_end(stall_timeout_s)
        return missing
    finally:
        await consumer.stop()


class _PartitionsReader:
    """`read_log`'s loop over an assigned consumer: each partition from its first offset up
    to the end offset seen at the start, then paused."""

    def __init__(self, consumer: AIOKafkaConsumer, sink: Sink,
                 progress: Progress | None) -> None:
        self.consumer = consumer
        self.sink = sink
        self.progress = progress
        self.task: TaskID | None = None
        self.end: dict[TopicPartition, int] = {}
        self.remaining: set[TopicPartition] = set()

    async def start(self, partitions: Sequence[TopicPartition]) -> None:
        first = await self.consumer.beginning_offsets(partitions)
        self.end = await self.consumer.end_offsets(partitions)
        total = sum(self.end[tp] - first[tp] for tp in partitions)
        if self.progress is not None:
            self.task = self.progress.add_task("reading the log", total=total)
        for tp in partitions:
            self.consumer.seek(tp, first[tp])
            if self.end[tp] > first[tp]:
                self.remaining.add(tp)
            else:
                self.consumer.pause(tp)

    async def read_to_end(self, stall_timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        while self.remaining:
            batch = await self.consumer.getmany(timeout_ms=500, max_records=5000)
            if batch:
                last_progress = loop.time()
            elif loop.time() - last_progress > stall_timeout_s:
                raise LogReadError(f"no message for {stall_timeout_s:.0f}s with "
                                   f"{len(self.remaining)} partition(s) not read to their end")
            for tp, records in batch.items():
                if tp in self.remaining:
                    await self._feed(tp, records)

    async def _feed(self, tp: TopicPartition, records: Sequence[Any]) -> None:
        end = self.end[tp]
        read = 0
        for record in records:
            if record.offset >= end:
                break
            self.sink(Inbound(record.topic, record.partition, record.offset, record.key,
                              record.value or b""))
            read += 1
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, read)
        if await self.consumer.position(tp) >= end:
            self.remaining.discard(tp)
            self.consumer.pause(tp)


def event_topics(prefix: str) -> dict[str, str]:
    """The topic to read → the contract's name for it."""
    return {f"{prefix}{topic}": topic for topic in CONTRACT_TOPICS}


async def verify_log(bootstrap: str, prefix: str = "", *, security: Mapping[str, Any],
                     progress: Progress | None = None) -> VerifyReport:
    verifier = LogVerifier()
    missing = await read_log(bootstrap, list(event_topics(prefix)), verifier.feed,
                             security=security, progress=progress)
    return verifier.report(missing)


# --- replay: rebuild card_status and card_timeline from the log ---------------------------


@dataclass
class CitizenState:
    row: CardStatusRow
    entries: list[TimelineEntry] = field(default_factory=list)


class LogReplayer:
    """Folds messages as the live status consumer does: the same validation (a message it
    would dead-letter is skipped), the same dedup by event id, the same `project` and
    timeline entries."""

    def __init__(self, topics: Mapping[str, str], only: str | None = None) -> None:
        self.topics = topics
        self.only = only
        self.citizens: dict[str, CitizenState] = {}
        self._applied: set[str] = set()
        self.events = 0
        self.duplicates = 0
        self.skipped: Counter[str] = Counter()

    def feed(self, msg: Inbound) -> None:
        contract_topic = self.topics[msg.topic]
        if self.only is not None and not self._concerns(msg.value, self.only):
            return
        try:
            envelope = parse_event(msg, KNOWN_EVENT_TYPES[contract_topic])
        except Rejected as rejected:
            self.skipped[rejected.code] += 1
            return
        event_id = str(envelope.event_id)
        if event_id in self._applied:
            self.duplicates += 1
            return
        state = self.citizens.get(envelope.citizen_ref)
        try:
            row = project(state.row if state else None, envelope)
            entry = timeline_entry(envelope, contract_topic)
        except ValidationError:
            self.skipped["invalid_event_data"] += 1
            return
        self._applied.add(event_id)
        self.events += 1
        if state is None:
            self.citizens[envelope.citizen_ref] = CitizenState(row, [entry])
        else:
            state.row = row
            state.entries.append(entry)

    @staticmethod
    def _concerns(value: bytes, ref: str) -> bool:
        try:
            body = json.loads(value)
        except (ValueError, RecursionError):  # a poison message concerns nobody
            return False
        return isinstance(body, dict) and body.get("citizen_ref") == ref


def _instant(value: Any) -> Any:
    return datetime.fromisoformat(value).astimezone(UTC) if isinstance(value, str) else value


def timeline_rows(entries: Iterable[TimelineEntry], *, erased: bool = False,
                  ) -> list[dict[str, Any]]:
    """Entries as the query API lists them (`fetch_timeline`, through the same
    `listed_timeline`): in `(occurred_at, stream_id, version)` order, numbered, and with an
    erased citizen's personal-data lines replaced as the live listing replaces them."""
    ordered = sorted(entries, key=lambda e: (e.occurred_at, e.stream_id, e.version))
    return listed_timeline((ListedEntry(e.event_id, e.type, e.occurred_at, e.description)
                            for e in ordered), erased=erased)


_INSTANT_FIELDS = frozenset({"updated_at", "loss_expires_at", "occurred_at"})


@dataclass(frozen=True, slots=True)
class Difference:
    citizen_ref: str
    field: str
    log_value: Any
    live_value: Any

    def describe(self) -> str:
        return (f"{self.citizen_ref} {self.field}: log {_shown(self.log_value)}"
                f" / live {_shown(self.live_value)}")


def _shown(value: Any) -> str:
    return "-" if value is None else mask_text(str(value))


def _same(name: str, log_value: Any, live_value: Any) -> bool:
    if name in _INSTANT_FIELDS:
        return bool(_instant(log_value) == _instant(live_value))
    return bool(log_value == live_value)


def compare_citizen(ref: str, replayed: CitizenState | None, live_card: Mapping[str, Any] | None,
                    live_timeline: Sequence[Mapping[str, Any]]) -> list[Difference]:
    """Every public `card_status` column and every timeline entry, log against live."""
    differences: list[Difference] = []
    log_card = replayed.row.public() if replayed else None
    if log_card is None or live_card is None:
        if log_card != live_card:
            differences.append(Difference(ref, "card_status",
                                          "row" if log_card else None,
                                          "row" if live_card else None))
    else:
        for name, value in log_card.items():
            if not _same(name, value, live_card.get(name)):
                differences.append(Difference(ref, name, value, live_card.get(name)))
    log_timeline = (timeline_rows(replayed.entries, erased=replayed.row.sub_states.erased)
                    if replayed else [])
    if len(log_timeline) != len(live_timeline):
        differences.append(Difference(ref, "timeline.entries", len(log_timeline),
                                      len(live_timeline)))
    for log_entry, live_entry in zip(log_timeline, live_timeline, strict=False):
        for name, value in log_entry.items():
            if not _same(name, value, live_entry.get(name)):
                differences.append(Difference(ref, f"timeline[{log_entry['seq']}].{name}",
                                              value, live_entry.get(name)))
    return differences


@dataclass
class ReplayReport:
    messages: int
    events: int
    duplicates: int
    skipped: Counter[str]
    agreed: list[str]
    differences: list[Difference]
    missing_topics: list[str] = field(default_factory=list)
    # Asked for, yet neither in the log nor in the live projection (a mistyped reference?).
    unknown: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences and not self.missing_topics and not self.unknown

    @property
    def disagreeing(self) -> list[str]:
        return sorted({d.citizen_ref for d in self.differences})


async def replay_log(
    bootstrap: str, database_url: str, *, schema: str, security: Mapping[str, Any],
    prefix: str = "", citizen: str | None = None, progress: Progress | None = None,
    concurrency: int = 8,
) -> ReplayReport:
    """Rebuild the projection of one citizen (or of all, `citizen=None`) from the log and
    compare it with the live one in `schema`."""
    topics = event_topics(prefix)
    replayer = LogReplayer(topics, citizen)
    read = Counter[str]()

    def sink(msg: Inbound) -> None:
        read[msg.topic] += 1
        replayer.feed(msg)

    missing = await read_log(bootstrap, list(topics), sink, security=security,
                             progress=progress)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=concurrency)
    try:
        if citizen is not None:
            refs = [citizen]
        else:
            live_refs = await pool.fetch(f"SELECT citizen_ref FROM {schema}.card_status")
            refs = sorted(set(replayer.citizens) | {r["citizen_ref"] for r in live_refs})
        gate = asyncio.Semaphore(concurrency)

        async def check(ref: str) -> list[Difference]:
            async with gate:
                card = await fetch_card(pool, schema, ref)
                timeline = await fetch_timeline(pool, schema, ref)
            return compare_citizen(ref, replayer.citizens.get(ref), card, timeline)

        results = await asyncio.gather(*(check(ref) for ref in refs))
    finally:
        await pool.close()
    differences = [d for found in results for d in found]
    agreed = [ref for ref, found in zip(refs, results, strict=True) if not found]
    unknown = [ref for ref in agreed if ref not in replayer.citizens]
    return ReplayReport(sum(read.values()), replayer.events, replayer.duplicates,
                        replayer.skipped, [r for r in agreed if r not in unknown], differences,
                        missing, unknown)


# --- the CLI ------------------------------------------------------------------------------

audit_app = typer.Typer(help="Auditors: verify the event log and replay it into card status.",
                        no_args_is_help=True)

TopicPrefix = Annotated[str | None, typer.Option(
    "--topic-prefix", help="Read <prefix>auth.events etc. (a copy of the log).")]
Bootstrap = Annotated[str | None, typer.Option(
    "--bootstrap", help="Kafka bootstrap servers (default CARDDESK_KAFKA_BOOTSTRAP).")]
Show = Annotated[int, typer.Option("--show", min=0, help="Print at most this many findings.")]


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _print_list(console: Console, lines: Sequence[str], show: int) -> None:
    for line in lines[:show]:
        console.print(f"  {line}", markup=False)
    if len(lines) > show:
        console.print(f"  … and {len(lines) - show} more", markup=False)


@audit_app.command("verify")
def verify_command(topic_prefix: TopicPrefix = None, bootstrap: Bootstrap = None,
                   show: Show = 200) -> None:
    """Check every stream's hash chain, versions, event ids and placement; exit 1 on any
    failure."""
    settings = as_principal(CardDeskSettings(), AUDITOR)
    console = _console()
    with progress_bar(console) as progress:
        try:
            report = uvloop.run(verify_log(bootstrap or settings.kafka_bootstrap,
                                           topic_prefix or "",
                                           security=client_options(settings),
                                           progress=progress))
        except LogReadError as error:
            console.print(f"could not read the log: {error}", markup=False)
            raise typer.Exit(2) from error
    for topic, count in sorted(report.messages.items()):
        console.print(f"topic {topic}: {count} messages", markup=False)
    for topic in report.missing_topics:
        console.print(f"topic {topic}: MISSING", markup=False)
    console.print(f"{report.streams} streams, {report.events} events, "
                  f"{report.duplicates} benign duplicates, {len(report.failures)} failures",
                  markup=False)
    if report.ok:
        console.print("log verified: every stream is intact")
        return
    _print_list(console, [f"FAIL {f.describe()}" for f in report.failures], show)
    raise typer.Exit(1)


@audit_app.command("replay")
def replay_command(
    citizen: Annotated[str | None, typer.Option(
        "--citizen", help="citizen_ref (or ID number) of the one citizen to replay.")] = None,
    everyone: Annotated[bool, typer.Option("--all", help="Replay every citizen.")] = False,
    topic_prefix: TopicPrefix = None, bootstrap: Bootstrap = None,
    schema: Annotated[str | None, typer.Option(
        "--schema", help="The live projection's schema (default CARDDESK_STATUS_SCHEMA).")] = None,
    show: Show = 200,
) -> None:
    """Rebuild card status and timeline from the log alone and compare with the live
    projection; exit 1 on any difference."""
    if (citizen is None) == (not everyone):
        raise typer.BadParameter("give exactly one of --citizen REF and --all")
    settings = as_principal(StatusSettings(), AUDITOR)
    ref = citizen
    if ref is not None and is_valid_id_number(ref):
        ref = citizen_ref(settings.citizen_ref_pepper.get_secret_value(), ref)
    console = _console()
    prefix = settings.status_topic_prefix if topic_prefix is None else topic_prefix
    with progress_bar(console) as progress:
        try:
            report = uvloop.run(replay_log(
                bootstrap or settings.kafka_bootstrap, settings.database_url,
                schema=schema or settings.status_schema, security=client_options(settings),
                prefix=prefix, citizen=ref,
                progress=progress))
        except LogReadError as error:
            console.print(f"could not read the log: {error}", markup=False)
            raise typer.Exit(2) from error
    skipped = ", ".join(f"{code} {n}" for code, n in sorted(report.skipped.items())) or "none"
    console.print(f"{report.messages} messages, {report.events} events applied, "
                  f"{report.duplicates} duplicates, skipped as the live consumer would: {skipped}",
                  markup=False)
    for topic in report.missing_topics:
        console.print(f"topic {topic}: MISSING", markup=False)
    for ref in report.unknown:
        console.print(f"{ref}: no event in the log and no live row", markup=False)
    console.print(f"{len(report.agreed)} citizen(s) agree with the live projection, "
                  f"{len(report.disagreeing)} differ", markup=False)
    if report.ok:
        return
    _print_list(console, [f"DIFF {d.describe()}" for d in report.differences], show)
    raise typer.Exit(1)
