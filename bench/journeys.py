"""Journeys on the real local stack: throughput, latency and memory.

Starts (or restarts) the five services with automatic approval on and zero production
time, seeds N citizens, and drives them through the whole journey as channels would:

1. sustained phase: as many concurrent journeys as `--concurrency` for `--seconds`; a
   citizen who collected a new card starts again (loses the new card). Reports journeys/s,
   commands/s, events/s and command → reply latency.
2. paced phases, one per `--rate`: commands at that rate (open loop: journeys start on a
   clock, each with a citizen not in one) for `--seconds`; for every fifth formal loss
   report it also measures command → the status API showing LOST (polled every 10 ms).
   The target rate (1,000/s) shows what saturation does; `half` (half the sustained
   median, where issue 12 sets its latency targets), the latency below it.

Every phase runs `--runs` times (min / median / max printed); the sustained commands/s is
printed with its ratio to the peer's (bench.peer's newest result).

    python -m bench.journeys [--citizens 2000] [--seconds 60] [--rate 1000 half] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import uvloop
from aiokafka import AIOKafkaConsumer

from bench.common import (
    console,
    peak_rss_mb,
    peer_ratio,
    percentiles,
    print_table,
    spread,
    spread_text,
    write_result,
)
from cardctl.channel import ChannelSimulator
from cardctl.journey import Journey, Session
from cardctl.operations import seed, status_url
from cardctl.stack import Stack
from shared.kafka import client_options
from shared.logging import configure_logging
from shared.settings import CardDeskSettings
from shared.topics import SERVICES

BENCH_ENVIRONMENT = {
    "CARDDESK_REVIEW_AUTO_APPROVE": "true",
    "CARDDESK_ISSUANCE_PRODUCTION_SECONDS": "0",
    "CARDDESK_LOG_LEVEL": "WARNING",
    # The load driver is one caller polling for many citizens: lift its per-caller limit.
    "CARDDESK_API_RATE_LIMIT_PER_SECOND": "100000",
    "CARDDESK_API_RATE_LIMIT_BURST": "100000",
}


@dataclass
class Meter:
    """Counts and latencies; `Journey` calls go through `timed`."""

    reply_latencies: list[float] = field(default_factory=list)
    # The same latencies by command type: which step's reply is slow.
    by_command: dict[str, list[float]] = field(default_factory=dict)
    visible_latencies: list[float] = field(default_factory=list)
    commands: int = 0
    journeys: int = 0
    failures: list[str] = field(default_factory=list)
    # Citizens whose journey stopped half-way (a formal loss in force, say): later phases
    # leave them out, or their first command would be refused and retried until its bound,
    # stretching that phase past its length and its rate below what was carried.
    left_behind: set[str] = field(default_factory=set)

    def stopped(self, session: Session, step: str, error: BaseException | str) -> None:
        self.failures.append(failure(session, step, error))
        self.left_behind.add(session.citizen.id_number)

    async def timed(self, command_type: str, call: Awaitable[Any]) -> Any:
        started = time.monotonic()
        result = await call
        latency = time.monotonic() - started
        self.reply_latencies.append(latency)
        self.by_command.setdefault(command_type, []).append(latency)
        self.commands += 1
        return result

    def per_command(self) -> dict[str, dict[str, float]]:
        """p50/p95/p99 of each command type's replies, with its count."""
        return {command: {**percentiles(latencies), "count": len(latencies)}
                for command, latencies in sorted(self.by_command.items())}


class MeteredSimulator(ChannelSimulator):
    meter: Meter

    async def send(self, service: str, command_type: str, *args: Any, **kwargs: Any) -> Any:
        return await self.meter.timed(command_type,
                                      super().send(service, command_type, *args, **kwargs))


async def count_events(conn: asyncpg.Connection) -> int:
    total = 0
    for schema in SERVICES:
        total += await conn.fetchval(f"SELECT count(*) FROM {schema}.events")
    return int(total)


# A paced phase at half the sustained phase's median rate.
HALF = "half"
# How long a sampled loss report may take to show LOST before it counts as a failure.
VISIBLE_TIMEOUT_S = 60.0
# How long the paced phase waits past its end for a free citizen before it stops starting.
IDLE_WAIT_S = 30.0


def masked_ref(citizen_ref: str | None) -> str:
    """Enough of a citizen_ref to find the citizen with `cardctl timeline`, no more."""
    return f"{citizen_ref[:9]}…" if citizen_ref else "(not logged in)"


def still_going(sessions: list[Session], left_behind: set[str]) -> list[Session]:
    """The sessions whose citizen no earlier phase left half-way."""
    return [s for s in sessions if s.citizen.id_number not in left_behind]


def failure(session: Session, step: str, error: BaseException | str) -> str:
    """One line per failed journey: which citizen, at which step, and what was seen."""
    seen = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return f"{masked_ref(session.citizen_ref)} at {step}: {seen}"[:240]


async def wait_until_drained(settings: CardDeskSettings, timeout_s: float = 180.0) -> float:
    """Wait until every service's consumer group has caught up with its topics, so a phase
    does not inherit the previous one's backlog; returns the seconds it took. When the bound
    runs out it says which groups still lag and goes on."""
    from aiokafka.admin import AIOKafkaAdminClient

    bootstrap, security = settings.kafka_bootstrap, client_options(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **security)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, **security)
    await admin.start()
    await consumer.start()
    started = time.monotonic()
    try:
        groups = [f"carddesk-{name}" for name in (*SERVICES, "status")]
        lags: dict[str, int] = {}
        while time.monotonic() - started < timeout_s:
            for group in groups:
                committed = await admin.list_consumer_group_offsets(group)
                ends = await consumer.end_offsets(list(committed))
                lags[group] = sum(max(0, ends[tp] - meta.offset)
                                  for tp, meta in committed.items())
            if not any(lags.values()):
                break
            await asyncio.sleep(0.5)
        else:
            console.print(f"[red]not drained after {timeout_s:.0f} s[/]: lag "
                          f"{ {g: n for g, n in lags.items() if n} }")
    finally:
        await consumer.stop()
        await admin.close()
    return time.monotonic() - started


class Steps:
    """The step a journey is at, so a failure can say where it stopped."""

    def __init__(self) -> None:
        self.current = "start"

    async def run(self, name: str, call: Awaitable[None]) -> None:
        self.current = name
        await call


async def again(journey: Journey, session: Session, steps: Steps) -> None:
    """A citizen's whole journey; the second time round the e-card is already authorised."""
    if not session.token:
        await steps.run("log_in", journey.log_in(session))
        await steps.run("authorize_e_card", journey.authorize_e_card(session))
    else:
        await steps.run("log_in", journey.log_in(session))
    await steps.run("verify_portrait", journey.verify_portrait(session))
    await steps.run("report_loss", journey.report_loss(session, "formal"))
    await steps.run("apply_for_reissue", journey.apply_for_reissue(session))
    await steps.run("collect", journey.collect(session))


async def sustained(journey: Journey, meter: Meter, sessions: list[Session],
                    concurrency: int, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    queue: asyncio.Queue[Session] = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)

    async def worker() -> None:
        while (left := deadline - time.monotonic()) > 0:
            try:
                session = await asyncio.wait_for(queue.get(), left)
            except TimeoutError:
                return
            steps = Steps()
            try:
                await again(journey, session, steps)
                meter.journeys += 1
            except Exception as error:  # a benchmark reports failures, it does not stop
                meter.stopped(session, steps.current, error)
                continue  # a citizen left half-way is not sent round again
            queue.put_nowait(session)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started


async def visible_after(client: httpx.AsyncClient, meter: Meter, session: Session,
                        sent: float) -> None:
    """Poll the status API until the citizen's card shows LOST; the time since `sent` is
    one visibility latency."""
    seen = "no answer"
    while time.monotonic() - sent < VISIBLE_TIMEOUT_S:
        try:
            response = await client.get(f"/v1/citizens/{session.citizen_ref}/card")
        except httpx.TransportError as error:
            # The server may close a kept-alive connection just as a request goes out on it
            # (RFC 9112, 9.3.1): a GET is safe to send again.
            seen = type(error).__name__
            await asyncio.sleep(0.01)
            continue
        seen = f"HTTP {response.status_code}"
        if response.status_code == 200:
            seen = f"status {response.json()['status']}"
            if response.json()["status"] == "LOST":
                meter.visible_latencies.append(time.monotonic() - sent)
                return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"not LOST after {VISIBLE_TIMEOUT_S:.0f} s; last seen {seen}")


async def paced(journey: Journey, meter: Meter, sessions: list[Session], rate: float,
                seconds: float, status: str) -> tuple[float, int]:
    """Open loop at `rate` commands/s for `seconds`: a journey starts every 1/(rate/6) s
    with a citizen who is not in one (citizens go round again, as in the sustained phase);
    every fifth formal loss report also waits for the status API to show LOST. Returns the
    seconds it took and how many starts were late because every citizen was busy."""
    per_journey = 6  # captcha, login, portrait, loss, application, collect
    interval = per_journey / rate
    idle: asyncio.Queue[Session] = asyncio.Queue()
    for session in sessions:
        idle.put_nowait(session)
    client = httpx.AsyncClient(base_url=status, timeout=10.0, headers=journey.api_headers)

    async def one(session: Session, sampled: bool) -> None:
        steps = Steps()
        try:
            await steps.run("log_in", journey.log_in(session))
            await steps.run("verify_portrait", journey.verify_portrait(session))
            sent = time.monotonic()
            await steps.run("report_loss", journey.report_loss(session, "formal"))
            if sampled:
                await steps.run("wait_for_LOST", visible_after(client, meter, session, sent))
            await steps.run("apply_for_reissue", journey.apply_for_reissue(session))
            await steps.run("collect", journey.collect(session))
            meter.journeys += 1
            idle.put_nowait(session)
        except Exception as error:  # a citizen left half-way is not sent round again
            meter.stopped(session, steps.current, error)

    started = time.monotonic()
    tasks = []
    late = 0
    index = 0
    next_start = started
    while next_start < started + seconds:
        if idle.empty():
            late += 1
        try:
            # Every citizen may have failed (a failed one is not sent round again).
            session = await asyncio.wait_for(
                idle.get(), max(0.0, started + seconds - time.monotonic()) + IDLE_WAIT_S)
        except TimeoutError:
            meter.failures.append(f"paced phase: no citizen free for {IDLE_WAIT_S:.0f} s "
                                  "after its end; stopped starting journeys")
            break
        # Every fifth journey measures visibility: polling the API for all would load it.
        tasks.append(asyncio.create_task(one(session, index % 5 == 0)))
        index += 1
        next_start += interval
        await asyncio.sleep(max(0.0, next_start - time.monotonic()))
    await asyncio.gather(*tasks)
    await client.aclose()
    return time.monotonic() - started, late


def restart_services(stack: Stack) -> dict[str, int]:
    stack.down(only=[spec.name for spec in stack.service_specs()])
    saved = {key: os.environ.get(key) for key in BENCH_ENVIRONMENT}
    os.environ.update(BENCH_ENVIRONMENT)
    try:
        stack.start_services()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    pids = {}
    for spec in stack.service_specs():
        pid = stack.running_pid(spec)
        if pid is not None:
            pids[spec.name] = pid
    return pids


async def run(citizens: int, seconds: float, rates: list[float | str], concurrency: int,
              runs: int) -> None:
    settings = CardDeskSettings()
    stack = Stack(settings, report=lambda line: console.print(f"[dim]•[/] {line}"))
    stack.up(services=False)
    # Reading every group's offsets is the administrator's business.
    admin = stack.admin_settings()
    pids = restart_services(stack)

    console.print(f"seeding {citizens} citizens …")
    people = await seed(settings, citizens, settings.state_dir / "bench-citizens.jsonl",
                        report=lambda _: None)
    half = len(people) // 2
    all_failures: dict[str, list[str]] = {}
    # Shared by every phase's meter: a citizen one phase leaves half-way sits out the rest.
    left_behind: set[str] = set()
    simulator = MeteredSimulator.for_settings(settings)
    simulator.meter = Meter()
    async with simulator as sim:
        # A citizen's next round may start before loss and review have seen the last one end.
        journey = Journey(sim, status_url(settings), retry_for_s=120,
                          also_retry={"ReportLoss": frozenset({"already_lost"}),
                                      "SubmitReissueApplication": frozenset({"already_approved"})})
        sessions = [Session(c) for c in people[:half]]
        # Unmeasured: the restarted services join their consumer groups (seconds, during
        # which the first commands wait) and warm their pools and caches.
        console.print("warming up for 10 s …")
        simulator.meter = Meter(left_behind=left_behind)
        await sustained(journey, simulator.meter, sessions[:20], 20, 10.0)
        await wait_until_drained(admin)
        conn = await asyncpg.connect(settings.database_url)
        sustained_runs: list[dict[str, Any]] = []
        for k in range(runs):
            meter = Meter(left_behind=left_behind)
            all_failures[f"sustained run {k + 1}"] = meter.failures
            simulator.meter = meter
            events_before = await count_events(conn)
            console.print(f"sustained phase, run {k + 1}/{runs}: {concurrency} concurrent "
                          f"journeys for {seconds:.0f} s …")
            elapsed = await sustained(journey, meter, still_going(sessions, left_behind),
                                      concurrency, seconds)
            events = await count_events(conn) - events_before
            sustained_runs.append({
                "seconds": elapsed, "journeys": meter.journeys, "commands": meter.commands,
                "events": events, "journeys_per_s": meter.journeys / elapsed,
                "commands_per_s": meter.commands / elapsed, "events_per_s": events / elapsed,
                "command_to_reply": percentiles(meter.reply_latencies),
                "command_to_reply_by_command": meter.per_command(),
                "failures": len(meter.failures), "first_failures": meter.failures[:5],
            })
            drained_in = await wait_until_drained(admin)
            sustained_runs[-1]["backlog_drained_after_s"] = drained_in
            console.print(f"  {sustained_runs[-1]['commands_per_s']:.0f} commands/s; "
                          f"backlog drained after {drained_in:.1f} s")
        sustained_median = spread([r["commands_per_s"] for r in sustained_runs])["median"]
        paced_figures: list[dict[str, Any]] = []
        for wanted in rates:
            rate = sustained_median / 2 if wanted == HALF else float(wanted)
            runs_at_rate: list[dict[str, Any]] = []
            for k in range(runs):
                paced_meter = Meter(left_behind=left_behind)
                all_failures[f"paced {rate:.0f}/s run {k + 1}"] = paced_meter.failures
                simulator.meter = paced_meter
                console.print(f"paced phase, run {k + 1}/{runs}: {rate:.0f} commands/s "
                              f"for {seconds:.0f} s …")
                paced_sessions = still_going([Session(c) for c in people[half:]], left_behind)
                paced_elapsed, late = await paced(journey, paced_meter, paced_sessions,
                                                  rate, seconds, status_url(settings))
                runs_at_rate.append({
                    "seconds": paced_elapsed,
                    "achieved_commands_per_s": paced_meter.commands / paced_elapsed,
                    "late_starts": late,
                    "command_to_reply": percentiles(paced_meter.reply_latencies),
                    "command_to_status_visible": percentiles(paced_meter.visible_latencies),
                    "command_to_reply_by_command": paced_meter.per_command(),
                    "visible_samples": len(paced_meter.visible_latencies),
                    "failures": len(paced_meter.failures),
                    "first_failures": paced_meter.failures[:5],
                })
                drained = await wait_until_drained(admin)
                console.print(f"  backlog drained after {drained:.1f} s")
            paced_figures.append({"target_commands_per_s": rate,
                                  "half_of_sustained": wanted == HALF, "runs": runs_at_rate})
        await conn.close()
    rss = {name: peak_rss_mb(pid) for name, pid in pids.items()}
    commands = spread([r["commands_per_s"] for r in sustained_runs])
    figures = {"citizens": citizens, "concurrency": concurrency, "runs": runs,
               "sustained": {"commands_per_s": commands, "runs": sustained_runs},
               "paced": paced_figures, "peak_rss_mb": rss,
               "citizens_left_behind": len(left_behind)}

    rows = summary_rows(seconds, commands, sustained_runs, paced_figures, rss)
    print_table(f"journeys on this machine ({citizens} citizens)", rows)
    console.print(f"written {write_result('journeys', figures)}")
    for phase, failures in all_failures.items():
        for line in failures[:20]:
            console.print(f"[red]failed[/] ({phase}) {line}")
        if len(failures) > 20:
            console.print(f"[red]… and {len(failures) - 20} more failures[/] ({phase})")
    if left_behind:
        console.print(f"{len(left_behind)} citizen(s) left half-way sat out the later phases")


def _over(values: list[dict[str, Any]], key: str, digits: int = 0) -> str:
    return spread_text(spread([v[key] for v in values]), digits)


def _p99(values: list[dict[str, Any]], key: str) -> str:
    return spread_text(spread([v[key]["p99_ms"] for v in values]))


def _by_command(values: list[dict[str, Any]], command: str) -> str:
    """A command type's reply p50 and p99 over the runs (min / median / max each)."""
    known = [f for v in values if (f := v["command_to_reply_by_command"].get(command))]
    return " / ".join(spread_text(spread([f[key] for f in known]))
                      for key in ("p50_ms", "p99_ms"))


def summary_rows(seconds: float, commands: dict[str, float],
                 sustained_runs: list[dict[str, Any]], paced_figures: list[dict[str, Any]],
                 rss: dict[str, float | None]) -> list[tuple[str, str]]:
    """The printed table's rows."""
    rows = [
        ("sustained: seconds per run", f"{seconds:.0f}"),
        ("commands/s (min / median / max)", spread_text(commands)),
        ("  ratio to the peer (median)", peer_ratio(commands["median"], "commands_per_s")),
        ("journeys/s", _over(sustained_runs, "journeys_per_s", 1)),
        ("events/s", _over(sustained_runs, "events_per_s")),
        ("command → reply p99 ms", _p99(sustained_runs, "command_to_reply")),
        ("failures (per run)", _over(sustained_runs, "failures")),
        ("backlog drained after (s)", _over(sustained_runs, "backlog_drained_after_s", 1)),
    ]
    for p in paced_figures:
        rate, r = p["target_commands_per_s"], p["runs"]
        label = " (half the sustained median)" if p["half_of_sustained"] else ""
        rows += [
            (f"paced at {rate:.0f}/s{label}: achieved commands/s",
             _over(r, "achieved_commands_per_s")),
            ("  starts late (every citizen busy)", _over(r, "late_starts")),
            ("  command → reply p99 ms", _p99(r, "command_to_reply")),
            ("  command → status visible p99 ms", _p99(r, "command_to_status_visible")),
            ("  failures (per run)", _over(r, "failures")),
        ]
        rows += [(f"    {command}: reply p50 / p99 ms", _by_command(r, command))
                 for command in r[0]["command_to_reply_by_command"]]
    rows += [(f"peak RSS {name} (MB)", f"{mb:.0f}" if mb else "?") for name, mb in rss.items()]
    return rows


def rate_argument(text: str) -> float | str:
    return HALF if text == HALF else float(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--citizens", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=rate_argument, nargs="+", default=[1000.0, HALF],
                        help="one paced phase per rate, in commands/s; 'half': half the "
                             "sustained phase's median (the issue's latency targets)")
    parser.add_argument("--runs", type=int, default=3, help="runs of every phase")
    parser.add_argument("--concurrency", type=int, default=200)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    uvloop.run(run(args.citizens, args.seconds, args.rate, args.concurrency, args.runs))


if __name__ == "__main__":
    main()
