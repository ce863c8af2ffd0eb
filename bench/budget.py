"""Per-command budget: statements, round trips and CPU per service over one journeys run.

Runs `python -m bench.journeys` (one short run; its arguments pass through) and, over its
sustained phase and backlog drain, reads PostgreSQL's `pg_stat_statements` (reset when the
phase starts) and each stack process's CPU seconds (`/proc/<pid>/stat`; PostgreSQL with its
backends), the records Kafka wrote to its offsets topic, and from each service's `/metrics`
its consumers' batches (how many per command, how many records each) and its barrier's
waits. With py-spy on PATH it also
records the loss and status services (`--profile` names others) for 15 s (speedscope files
in the state directory). Divides by the commands the phase accepted.

`pg_stat_statements` must be loaded, for the measurement only (the extension is then created
in the database where it is missing):

    psql "$SUPERUSER_DSN" -c "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'"
    cardctl stack down && cardctl stack up --no-services

    python -m bench.budget -- --citizens 300 --concurrency 50 --seconds 20 --rate 50 --runs 1

`--phase paced` measures the first paced phase instead (issue 12's latency targets are set at
half the sustained rate, where batches are smaller and each command costs more):

    python -m bench.budget --phase paced -- --citizens 2000 --seconds 30 --rate half --runs 1

The load driver (the journeys process: the channels and the status polls) is measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench.common import console, latest_result, print_table
from cardctl.stack import PG_SUPERUSER, Stack, pg_target, service_ports
from cardctl.top import Samples, scrape, total
from shared.kafka import as_principal, client_options
from shared.settings import CardDeskSettings

SCHEMAS = ("status", "auth", "loss", "review", "issuance", "console")
SCHEMA = re.compile(r"\b(" + "|".join(SCHEMAS) + r")\.\w+")
TICKS = os.sysconf("SC_CLK_TCK")
PROFILED = "loss,status"
OFFSETS_TOPIC = "__consumer_offsets"
OFFSETS_TIMEOUT_S = 30.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU of `pid`; with `reaped`, also of its children that have exited."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICKS


def stack_processes(stack: Stack) -> dict[str, int]:
    """PostgreSQL, Kafka and the services of this stack, by name."""
    pids: dict[str, int] = {}
    for spec in [*stack.infra_specs(), *stack.service_specs()]:
        pid = stack.running_pid(spec)
        if pid is not None:
            pids[spec.name] = pid
    return pids


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    seconds = {name: cpu_seconds(pid) for name, pid in pids.items()}
    if "postgres" in pids:
        master = pids["postgres"]
        seconds["postgres"] = cpu_seconds(master, reaped=True) + sum(
            cpu_seconds(child) for child in children(master))
    return seconds


async def offset_records(settings: CardDeskSettings) -> int:
    """Records Kafka has written to its offsets topic so far: one per partition named in
    each offset commit (and a few for group membership). Gives up after
    `OFFSETS_TIMEOUT_S`, saying so."""
    try:
        return await asyncio.wait_for(_offset_records(settings), OFFSETS_TIMEOUT_S)
    except TimeoutError:
        raise SystemExit(f"no end offsets of {OFFSETS_TOPIC} from Kafka at "
                         f"{settings.kafka_bootstrap} within {OFFSETS_TIMEOUT_S:.0f} s") from None


async def _offset_records(settings: CardDeskSettings) -> int:
    options = client_options(as_principal(settings, "admin"))
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **options)
    await admin.start()
    try:
        described = await admin.describe_topics([OFFSETS_TOPIC])
    finally:
        await admin.close()
    partitions = [TopicPartition(OFFSETS_TOPIC, p["partition"])
                  for topic in described for p in topic["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                **options)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def scrape_services(settings: CardDeskSettings) -> dict[str, Samples | None]:
    """Every service's `/metrics` now (None for one that did not answer in 5 s)."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        ports = service_ports(settings)
        found = await asyncio.gather(*(
            scrape(client, f"http://{settings.http_host}:{port}/metrics")
            for port in ports.values()))
    return dict(zip(ports, found, strict=True))


BATCHES = "carddesk_consumer_batch_size"
BARRIER_WAITS = "carddesk_barrier_wait_seconds"


def _grew(before: Samples | None, after: Samples, name: str, **match: str) -> float:
    """How much the series of `name` whose labels include `match` grew between two scrapes
    (from 0 for a service that had not answered the first)."""
    return total(after, name, **match) - total(before, name, **match)


def batch_rows(before: dict[str, Samples | None], after: dict[str, Samples | None],
               commands: int) -> list[tuple[str, str]]:
    """Per consumer (service and topics): its batches per command and records per batch
    (`carddesk_consumer_batch_size`); per command service: its barrier's waits per command
    and their mean (`carddesk_barrier_wait_seconds`), between the two scrapes."""
    rows: list[tuple[str, str]] = []
    all_batches = 0.0
    for service, samples in after.items():
        if samples is None:
            rows.append((service, "no /metrics"))
            continue
        earlier = before.get(service)
        consumers = {labels["topic"] for labels, _ in samples.get(f"{BATCHES}_count", ())}
        for topics in sorted(consumers):
            batches = _grew(earlier, samples, f"{BATCHES}_count", topic=topics)
            records = _grew(earlier, samples, f"{BATCHES}_sum", topic=topics)
            per_batch = records / batches if batches else 0.0
            all_batches += batches
            rows.append((f"{service} ← {topics}", f"{batches / commands:.3f} batches per "
                         f"command, {per_batch:.1f} records per batch"))
        waits = _grew(earlier, samples, f"{BARRIER_WAITS}_count")
        if waits:
            waited = _grew(earlier, samples, f"{BARRIER_WAITS}_sum")
            rows.append((f"{service}: barrier", f"{waits / commands:.3f} waits per command, "
                         f"{1000 * waited / waits:.1f} ms mean"))
    return [*rows, ("all consumers", f"{all_batches / commands:.2f} batches per command")]


def schema_of(query: str) -> str:
    """The schema a statement names, or the statement itself when it names none or several."""
    named = {m.group(1) for m in SCHEMA.finditer(query)}
    if len(named) == 1:
        return named.pop()
    return " ".join(query.split())[:40]


def statement_rows(stats: list[asyncpg.Record], commands: int) -> list[tuple[str, str]]:
    calls: Counter[str] = Counter()
    ms: Counter[str] = Counter()
    for row in stats:
        key = schema_of(row["query"])
        calls[key] += row["calls"]
        ms[key] += row["total_exec_time"]
    rows = [(key, f"{n / commands:.2f} per command, {ms[key] / commands:.2f} ms")
            for key, n in calls.most_common(12)]
    total = sum(calls.values())
    return [*rows, ("all statements (= round trips)", f"{total / commands:.1f} per command")]


def top_statements(stats: list[asyncpg.Record]) -> list[tuple[str, str]]:
    ranked = sorted(stats, key=lambda row: -row["total_exec_time"])[:8]
    return [(" ".join(row["query"].split())[:70], f"{row['total_exec_time']:.0f} ms, "
             f"{row['calls']} calls") for row in ranked]


def start_profiles(pids: dict[str, int], out: Path,
                   profiled: list[str]) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy")
    if spy is None:
        console.print("py-spy not on PATH: no profiles")
        return []
    return [subprocess.Popen([spy, "record", "--nonblocking", "-r", "50", "-d", "15",
                              "--format", "speedscope", "-o", str(out / f"{name}.speedscope.json"),
                              "-p", str(pids[name])],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name in profiled if name in pids]


PHASES = {"sustained": "sustained phase", "paced": "paced phase"}


class Window:
    """A phase and its drain, as seen in the journeys run's output."""

    def __init__(self, stack: Stack, dsn: str, profiled: list[str]) -> None:
        self.stack, self.dsn, self.profiled = stack, dsn, profiled
        self.offset_records = 0
        self.pids: dict[str, int] = {}
        self.before: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.started = self.seconds = 0.0
        self.stats: list[asyncpg.Record] = []
        self.profiles: list[subprocess.Popen[bytes]] = []
        self.metrics_before: dict[str, Samples | None] = {}
        self.metrics_after: dict[str, Samples | None] = {}

    async def open(self, driver: int) -> None:
        self.pids = {**stack_processes(self.stack), "load driver": driver}
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute("SELECT pg_stat_statements_reset()")
        finally:
            await conn.close()
        self.offset_records = -await offset_records(self.stack.settings)
        self.metrics_before = await scrape_services(self.stack.settings)
        self.started, self.before = time.monotonic(), snapshot(self.pids)
        self.profiles = start_profiles(self.pids, self.stack.state_dir, self.profiled)

    async def close(self) -> None:
        self.seconds = time.monotonic() - self.started
        after = snapshot(self.pids)
        self.cpu = {name: after[name] - self.before.get(name, 0.0) for name in after}
        self.metrics_after = await scrape_services(self.stack.settings)
        self.offset_records += await offset_records(self.stack.settings)
        conn = await asyncpg.connect(self.dsn)
        try:
            self.stats = await conn.fetch(
                "SELECT query, calls, total_exec_time FROM pg_stat_statements")
        finally:
            await conn.close()


async def follow(argv: list[str], window: Window, phase: str) -> None:
    """Run the journeys benchmark, opening the window at the first run of `phase` and
    closing it when that run's backlog has drained; its output passes through."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.journeys", *argv, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    state = "before"
    async for raw in process.stdout:
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        if state == "before" and PHASES[phase] in line:
            await window.open(process.pid)
            state = "open"
        elif state == "open" and "backlog drained" in line:
            await window.close()
            state = "closed"
    await asyncio.wait_for(process.wait(), 60)
    if state != "closed":
        raise SystemExit(f"the journeys run ended before its {PHASES[phase]} drained")


def phase_commands(phase: str) -> int:
    """The commands the measured run of `phase` carried, from the journeys result."""
    result = latest_result("journeys")
    if result is None:
        raise SystemExit("no journeys result written")
    figures = result["figures"]
    if phase == "sustained":
        return int(figures["sustained"]["runs"][0]["commands"])
    paced = figures["paced"][0]["runs"][0]
    return round(float(paced["achieved_commands_per_s"]) * float(paced["seconds"]))


async def run(argv: list[str], profiled: list[str], phase: str) -> None:
    settings = CardDeskSettings()
    stack = Stack(settings, report=lambda line: console.print(f"[dim]•[/] {line}"))
    pg = pg_target(settings)
    window = Window(stack, f"postgresql://{PG_SUPERUSER}@{pg.host}:{pg.port}/{pg.dbname}",
                    profiled)
    await follow(argv, window, phase)
    for profile in window.profiles:
        profile.wait(timeout=60)
    commands = phase_commands(phase)
    print_table(f"statements per command ({commands} commands, {window.seconds:.1f} s)",
                statement_rows(window.stats, commands))
    print_table("top statements by execution time", top_statements(window.stats))
    print_table("consumer batches",
                batch_rows(window.metrics_before, window.metrics_after, commands))
    print_table("offset commits", [("records written to __consumer_offsets per command",
                                    f"{window.offset_records / commands:.2f}")])
    print_table("CPU ms per command", [
        (name, f"{1000 * s / commands:.2f} ({s:.2f} s)")
        for name, s in sorted(window.cpu.items(), key=lambda item: -item[1])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=PROFILED,
                        help="services py-spy records, comma-separated (default: %(default)s)")
    parser.add_argument("--phase", choices=sorted(PHASES), default="sustained",
                        help="the phase measured: its first run (default: %(default)s)")
    parser.add_argument("journeys", nargs="*",
                        help="arguments for bench.journeys, after --")
    args = parser.parse_args()
    asyncio.run(run(args.journeys or ["--citizens", "300", "--concurrency", "50",
                                      "--seconds", "20", "--rate", "50", "--runs", "1"],
                    [name for name in args.profile.split(",") if name], args.phase))


if __name__ == "__main__":
    main()
