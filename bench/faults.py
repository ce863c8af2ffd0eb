"""Fault injection on the running local stack (issue 9, section 5).

Citizens run their journeys as channels would — a command that got no reply within
`--reply-timeout` is sent again with the same request_id, a refusal that only means "not
yet" is retried — while, one at a time and at random moments, the run:

- kills -9 each service, the Kafka broker and the PostgreSQL postmaster; what does not come
  back by itself within `--come-back` seconds is restarted with `cardctl stack up`;
- SIGSTOPs the `--pause` services for `--pause-seconds`, then SIGCONTs them;
- races a follower event against a command for the same citizen in the loss service
  (`--race-rounds` citizens report a new loss while their approved reissue completes);
- sends poison (unsigned, forged, malformed, deeply nested, mistyped, huge) to every
  command and event topic.

Then it checks and prints: journeys completed and failed, lost / duplicated / unacknowledged
effects, the card invariant, `audit verify` and `audit replay --all`, dead letters by reason
and recovery time per fault. Exit status 1 when any target is missed.

    cardctl stack up && python -m bench.faults [--citizens 30] [--seed 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from bench.common import console, print_table, write_result
from bench.fault_checks import (
    DeadLetter,
    LoggedEvent,
    Outcome,
    Position,
    Sent,
    card_violations,
    dlq_verdict,
    effect_findings,
    mask_ref,
    open_formal_losses,
    status_violations,
    timeline_findings,
    verify_verdict,
)
from cardctl.audit import event_topics, read_log, replay_log, verify_log
from cardctl.channel import ChannelSimulator
from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Journey, Session
from cardctl.operations import seed
from cardctl.stack import Stack
from services.status.adapters import fetch_timeline
from services.status.settings import StatusSettings
from shared.channels import ChannelRegistry, sign
from shared.commands import Reply
from shared.consumer import Inbound
from shared.identity import citizen_ref
from shared.kafka import ADMIN, as_principal, client_options
from shared.logging import configure_logging
from shared.sealing import SealContext
from shared.settings import CardDeskSettings
from shared.topics import SERVICES, command_topic, dlq_topic, event_topic

COMMAND_SERVICES: tuple[str, ...] = SERVICES
# A command of each service that poison pretends to be.
POISON_COMMAND = {"auth": "AuthorizeElectronicCard", "loss": "ReportLoss",
                  "review": "SubmitReissueApplication", "issuance": "CollectCard"}
POISON_KEY_PREFIX = "poison:"
# Refusals that only mean another service has not caught up yet; each retry is a new request.
# A citizen's next round may start before loss and review have seen the last one end.
ALSO_RETRY = {"ReportLoss": frozenset({"already_lost"}),
              "SubmitReissueApplication": frozenset({"already_approved", "application_pending"})}


@dataclass(frozen=True)
class FaultPlan:
    """What a run does and how long anything may take."""

    citizens: int = 30
    seed: int | None = None
    kill_services: tuple[str, ...] = ("status", *COMMAND_SERVICES)
    kill_kafka: bool = True
    kill_postgres: bool = True
    pause: tuple[str, ...] = ("loss", "status")
    pause_seconds: float = 30.0
    race_rounds: int = 40
    poison: bool = True
    repeat: int = 1  # the whole set of faults, this many times
    gap_seconds: tuple[float, float] = (5.0, 15.0)  # load between faults, drawn at random
    think_seconds: tuple[float, float] = (0.0, 1.0)  # a citizen's pause between steps
    reply_timeout_s: float = 10.0   # no reply within this: the same request_id again
    step_budget_s: float = 240.0    # a step with no reply (or only "not yet") for this long fails
    come_back_s: float = 15.0       # a killed process may come back by itself within this
    recovery_bound_s: float = 240.0  # healthy and progressing again within this, or it failed
    drain_bound_s: float = 180.0     # consumer groups caught up within this after the load
    finish_bound_s: float = 600.0    # rounds under way when the faults end finish within this
    environment: Mapping[str, str] = field(default_factory=dict)  # for restarted services


# --- the channel's side ---------------------------------------------------------------------


class NoReplyError(Exception):
    """A step never got an answer it could act on within its budget."""


class RefusedError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


@dataclass
class Ledger:
    """Every request id the channels used, and when accepted replies came back."""

    sent: list[Sent] = field(default_factory=list)
    # (service, first sent, replied) of every accepted request: "are journeys progressing?"
    accepted: list[tuple[str, float, float]] = field(default_factory=list)
    resends: int = 0
    not_yet: Counter[str] = field(default_factory=Counter)

    def progressed(self, service: str | None, since: float) -> float | None:
        """When a request first sent at or after `since` was first accepted (by `service`)."""
        times = [replied for name, first, replied in self.accepted
                 if first >= since and (service is None or name == service)]
        return min(times) if times else None


class PatientChannel:
    """A channel that does not give up: resends with the same request_id until answered."""

    def __init__(self, sim: ChannelSimulator, ledger: Ledger, plan: FaultPlan) -> None:
        self.sim = sim
        self.ledger = ledger
        self.plan = plan

    async def ask(self, service: str, command: str, payload: Mapping[str, Any], *,
                  channel_id: str, session_key: str | None, ref: str | None,
                  deadline: float) -> Reply:
        """One request id, sent (the same bytes) until a reply other than
        `not_yet_consistent` arrives, which is never stored and so decided afresh."""
        loop = asyncio.get_running_loop()
        request_id = str(uuid.uuid4())
        if self.sim.sealer is not None:
            payload = self.sim.sealer.seal_payload(
                SealContext(channel_id, command, request_id), payload)
        value = self.sim.envelope(channel_id, command, payload, request_id)
        first = loop.time()
        sends = 0
        while (left := deadline - loop.time()) > 0:
            sends += 1
            wait = min(self.plan.reply_timeout_s, left)
            try:
                reply = await asyncio.wait_for(self.sim.send_raw(
                    command_topic(service), value, channel_id=channel_id,
                    key=(session_key or request_id).encode(), request_id=request_id,
                    timeout_s=wait), wait + 1.0)
            except (TimeoutError, KafkaError):
                self.ledger.resends += 1
                continue
            if reply.code == "not_yet_consistent":
                self.ledger.not_yet[f"{command}: not_yet_consistent"] += 1
                await asyncio.sleep(0.2)
                continue
            status: Outcome = "accepted" if reply.status == "accepted" else "rejected"
            self.ledger.sent.append(Sent(request_id, command, service, ref, status,
                                         reply.code, sends))
            if status == "accepted":
                self.ledger.accepted.append((service, first, loop.time()))
            return reply
        self.ledger.sent.append(Sent(request_id, command, service, ref, "no_reply", "", sends))
        raise NoReplyError(f"{command}: no reply after {sends} send(s)")


class FaultJourney(Journey):
    """The journey's steps, each through the patient channel and bounded by the step budget."""

    def __init__(self, channel: PatientChannel, plan: FaultPlan) -> None:
        super().__init__(channel.sim, retry_for_s=plan.step_budget_s, also_retry=ALSO_RETRY)
        self.channel = channel

    async def _send(self, s: Session, service: str, command: str, payload: dict[str, Any],
                    *, bureau: bool = False) -> dict[str, Any]:
        channel = self.bureau_channel if bureau else self.citizen_channel
        reply = await self.until_accepted(s, service, command, payload, channel,
                                          self.retry_codes.get(command, frozenset()))
        s.log.append((command, reply.code))
        return reply.data

    async def until_accepted(self, s: Session, service: str, command: str,
                             payload: dict[str, Any], channel: str,
                             retry_codes: frozenset[str]) -> Reply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for_s
        while True:
            reply = await self.channel.ask(service, command, payload, channel_id=channel,
                                           session_key=s.key, ref=s.citizen_ref,
                                           deadline=deadline)
            if reply.status == "accepted":
                return reply
            if reply.code not in retry_codes or loop.time() >= deadline:
                raise RefusedError(reply)
            self.channel.ledger.not_yet[f"{command}: {reply.code}"] += 1
            await asyncio.sleep(0.3)

    async def race_report_loss(self, s: Session) -> str:
        """A formal loss report sent while the citizen's reissue completes: `already_lost`
        (the old loss is still open) is as good an answer as `accepted`."""
        deadline = asyncio.get_running_loop().time() + self.retry_for_s
        reply = await self.channel.ask("loss", "ReportLoss",
                                       {"session_token": s.token, "kind": "formal"},
                                       channel_id=self.citizen_channel, session_key=s.key,
                                       ref=s.citizen_ref, deadline=deadline)
        return reply.code


@dataclass(frozen=True, slots=True)
class RoundResult:
    citizen_ref: str
    completed: bool
    failed_step: str = ""
    reason: str = ""
    race: str = ""  # the racing ReportLoss's reply code, when this round raced


class LoadDriver:
    """Each citizen goes round after round (log in … collect) until told to stop."""

    def __init__(self, journey: FaultJourney, sessions: Sequence[Session],
                 rng: random.Random, think: tuple[float, float] = (0.0, 0.0)) -> None:
        self.journey = journey
        self.think = think
        self.sessions = sessions
        self.rng = rng
        self.stop = asyncio.Event()
        self.rounds: list[RoundResult] = []
        self.race_tokens = 0
        self.races_done = 0
        self.under_way: dict[str, str] = {}  # citizen_ref -> the step a round is at

    def record_unfinished(self) -> None:
        """Rounds still under way when the run had to stop them count as failed."""
        for ref, step in self.under_way.items():
            self.rounds.append(RoundResult(ref, False, step, "still under way at the end"))
        self.under_way.clear()

    async def run(self) -> None:
        await asyncio.gather(*(self._citizen(s) for s in self.sessions))

    async def _citizen(self, s: Session) -> None:
        first, open_loss = True, False
        while not self.stop.is_set():
            raced = self.race_tokens > 0
            if raced:
                self.race_tokens -= 1
            result, open_loss = await self._round(s, first=first, open_loss=open_loss,
                                                  race=raced)
            self.under_way.pop(s.citizen_ref, None)
            self.rounds.append(result)
            if raced:
                self.races_done += 1
            if not result.completed:
                return  # a citizen left half-way is not sent round again
            first = False

    async def _round(self, s: Session, *, first: bool, open_loss: bool,
                     race: bool) -> tuple[RoundResult, bool]:
        j = self.journey
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("log in", lambda: j.log_in(s)),
            *([("authorise e-card", lambda: j.authorize_e_card(s))] if first else []),
            ("portrait", lambda: j.verify_portrait(s)),
            *([] if open_loss else [("report loss", lambda: j.report_loss(s, "formal"))]),
            ("apply", lambda: j.apply_for_reissue(s)),
            ("approve + race" if race else "approve",
             (lambda: self._race(s)) if race else (lambda: j.approve(s))),
            ("collect", lambda: j.collect(s)),
        ]
        race_code = ""
        for step, action in steps:
            self.under_way[s.citizen_ref] = step
            await asyncio.sleep(self.rng.uniform(*self.think))
            try:
                outcome = await action()
            except (NoReplyError, RefusedError) as error:
                return RoundResult(s.citizen_ref, False, step, str(error)[:120], race_code), False
            except Exception as error:  # anything else ends the round, never the whole run
                return RoundResult(s.citizen_ref, False, step,
                                   f"{type(error).__name__}: {error}"[:120], race_code), False
            if step == "approve + race":
                race_code = str(outcome)
        return RoundResult(s.citizen_ref, True, race=race_code), race_code == "accepted"

    async def _race(self, s: Session) -> str:
        """Approve, and report a new loss at a random moment while the loss service's
        follower applies the `CardReissued` that the approval leads to."""
        async def report() -> str:
            await asyncio.sleep(max(0.0, lag))
            return await self.journey.race_report_loss(s)

        async def approve() -> None:
            await asyncio.sleep(max(0.0, -lag))
            await self.journey.approve(s)

        # The follower applies CardReissued some tens of ms after the approval's reply.
        lag = self.rng.uniform(-0.05, 0.25)
        _, code = await asyncio.gather(approve(), report())
        return code


# --- faults ---------------------------------------------------------------------------------


@dataclass
class FaultRecord:
    kind: str
    target: str
    at: str
    came_back_by_itself: bool | None = None
    stack_up_runs: int = 0
    healthy_after_s: float | None = None
    progress_after_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def recovered(self) -> bool:
        return self.healthy_after_s is not None and self.progress_after_s is not None

    @property
    def recovery_s(self) -> float | None:
        if not self.recovered:
            return None
        return max(self.healthy_after_s or 0.0, self.progress_after_s or 0.0)


@dataclass(frozen=True, slots=True)
class PoisonRecord:
    topic: str
    kind: str
    key: bytes
    position: Position | None
    reply_code: str | None = None  # a signed command's refusal


class Injector:
    """Kills, pauses and poisons, one fault at a time, and measures recovery."""

    def __init__(self, stack: Stack, settings: CardDeskSettings, plan: FaultPlan,
                 ledger: Ledger, sim: ChannelSimulator, driver: LoadDriver) -> None:
        self.stack = stack
        self.settings = settings
        self.plan = plan
        self.ledger = ledger
        self.sim = sim
        self.driver = driver
        self.records: list[FaultRecord] = []
        self.poison: list[PoisonRecord] = []
        self.specs = {spec.name: spec for spec in stack.all_specs()}

    def _note(self, line: str) -> None:
        console.print(f"[dim]{datetime.now(UTC):%H:%M:%S}[/] {line}", markup=True)

    async def _pid(self, name: str) -> int | None:
        return await asyncio.to_thread(self.stack.running_pid, self.specs[name])

    async def kill(self, name: str) -> FaultRecord:
        record = FaultRecord("kill -9", name, _now())
        pid = await self._pid(name)
        if pid is None:
            record.notes.append("was not running when the fault was due")
        loop = asyncio.get_running_loop()
        started = loop.time()
        if pid is not None:
            self._note(f"kill -9 {name} (pid {pid})")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await _until(lambda: _gone(pid), 10.0)
        record.came_back_by_itself = await _until(self._back(name, pid), self.plan.come_back_s)
        await self._recover(record, started, name)
        return record

    def _back(self, name: str, old: int | None) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            pid = await self._pid(name)
            return pid is not None and pid != old
        return check

    async def pause(self, name: str) -> FaultRecord:
        record = FaultRecord(f"SIGSTOP {self.plan.pause_seconds:.0f}s", name, _now())
        pid = await self._pid(name)
        if pid is None:
            record.notes.append("was not running when the fault was due")
            await self._recover(record, asyncio.get_running_loop().time(), name)
            return record
        self._note(f"SIGSTOP {name} (pid {pid}) for {self.plan.pause_seconds:.0f} s")
        try:
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(self.plan.pause_seconds)
        finally:  # never leave a process stopped, whatever happens to this run
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._note(f"SIGCONT {name}")
        record.came_back_by_itself = True
        await self._recover(record, asyncio.get_running_loop().time(), name)
        return record

    async def _recover(self, record: FaultRecord, started: float, target: str) -> None:
        """Restart with `stack up` what is not running, then wait until everything is healthy
        and the journeys progress again; each measured from `started`."""
        loop = asyncio.get_running_loop()
        deadline = started + self.plan.recovery_bound_s
        wall_start = datetime.now(UTC)
        if await self.heal(record, deadline):
            record.healthy_after_s = loop.time() - started
        services = ([target] if target in COMMAND_SERVICES else
                    [] if target == "status" else list(COMMAND_SERVICES))
        projection = target not in COMMAND_SERVICES

        async def progressed() -> bool:
            if any(self.ledger.progressed(s, started) is None for s in services):
                return False
            return not projection or await self._projection_since(wall_start)

        if await _until(progressed, max(0.0, deadline - loop.time()), interval=0.5):
            record.progress_after_s = loop.time() - started
        else:
            stuck = [s for s in services if self.ledger.progressed(s, started) is None]
            record.notes.append("journeys did not progress within the bound"
                                + (f" ({', '.join(stuck)})" if stuck else " (projection)"))
        self._note(f"{record.kind} {target}: healthy after {_secs(record.healthy_after_s)}, "
                   f"progressing after {_secs(record.progress_after_s)}"
                   + (f"; {'; '.join(record.notes)}" if record.notes else ""))

    async def heal(self, record: FaultRecord, deadline: float) -> bool:
        """Until `deadline`: every component healthy, running `stack up` while any is not
        running. False (with a note naming the sick) when the deadline passes."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            statuses = await self._statuses()
            if all(healthy for _, healthy in statuses.values()):
                return True
            dead = [name for name, (alive, _) in statuses.items() if not alive]
            if not dead:
                await asyncio.sleep(1.0)
                continue
            record.stack_up_runs += 1
            self._note(f"not running: {', '.join(dead)}; cardctl stack up")
            try:
                await asyncio.wait_for(asyncio.to_thread(self._stack_up),
                                       max(1.0, deadline - loop.time()))
            except Exception as error:  # reported, and tried again within the bound
                record.notes.append(f"stack up failed: {str(error)[:160]}")
                self._note(f"stack up failed: {error}")
                await asyncio.sleep(2.0)
        statuses = await self._statuses()
        sick = [name for name, (_, healthy) in statuses.items() if not healthy]
        if not sick:
            return True
        record.notes.append(f"not healthy within the bound: {', '.join(sick)}")
        return False

    def _stack_up(self) -> None:
        saved = {key: os.environ.get(key) for key in self.plan.environment}
        os.environ.update(self.plan.environment)
        try:
            self.stack.up()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    async def _statuses(self) -> dict[str, tuple[bool, bool]]:
        found = await asyncio.to_thread(self.stack.status)
        return {c.name: (c.alive, c.healthy) for c in found}

    async def _projection_since(self, since: datetime) -> bool:
        """Whether the status projection holds an event that occurred after `since`."""
        schema = StatusSettings().status_schema
        try:
            conn = await asyncpg.connect(self.settings.database_url, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        try:
            latest = await conn.fetchval(f"SELECT max(updated_at) FROM {schema}.card_status")
        except asyncpg.PostgresError:
            return False
        finally:
            await conn.close()
        return latest is not None and bool(latest > since)

    async def race(self) -> FaultRecord:
        """Hand out race tokens and wait until that many rounds have raced."""
        record = FaultRecord(f"race ×{self.plan.race_rounds}", "loss", _now())
        self._note(f"race: {self.plan.race_rounds} citizens report a loss while their reissue "
                   "completes")
        target = self.driver.races_done + self.plan.race_rounds
        self.driver.race_tokens += self.plan.race_rounds
        started = asyncio.get_running_loop().time()
        if not await _until(self._races_reach(target), self.plan.recovery_bound_s):
            record.notes.append(f"only {self.driver.races_done - target + self.plan.race_rounds}"
                                " rounds raced within the bound")
            self.driver.race_tokens = 0
        await self._recover(record, started, "loss")
        return record

    def _races_reach(self, target: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return self.driver.races_done >= target or self.driver.stop.is_set()
        return check

    async def poison_all(self) -> FaultRecord:
        record = FaultRecord("poison", "every topic", _now())
        started = asyncio.get_running_loop().time()
        self._note("poison: every command and event topic")
        sender = PoisonSender(self.settings, self.sim)
        async with sender:
            self.poison += await sender.everything()
        started = asyncio.get_running_loop().time()  # recovery counts from the last one
        unanswered = [p for p in self.poison if p.kind.startswith("signed") and
                      p.reply_code is None]
        if unanswered:
            record.notes.append(f"{len(unanswered)} signed poison message(s) got no reply")
        await self._recover(record, started, "kafka")
        return record


# --- poison ---------------------------------------------------------------------------------


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


class PoisonSender:
    """Hostile messages for every command and event topic, each keyed `poison:<uuid>` so
    that its dead letters can be told from a real message's."""

    def __init__(self, settings: CardDeskSettings, sim: ChannelSimulator) -> None:
        self.settings = settings
        self.sim = sim
        self.channels = ChannelRegistry.from_file(settings.channels_file)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                         max_request_size=2 * 1024 * 1024,
                                         **client_options(settings))

    async def __aenter__(self) -> PoisonSender:
        await self.producer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.producer.stop()

    async def everything(self) -> list[PoisonRecord]:
        records = []
        for service in COMMAND_SERVICES:
            records += await self.commands(command_topic(service))
            records += await self.events(event_topic(service))
        return records

    async def _raw(self, topic: str, kind: str, value: bytes,
                   headers: list[tuple[str, bytes]], key: bytes) -> PoisonRecord:
        meta = await asyncio.wait_for(
            self.producer.send_and_wait(topic, value, key=key, headers=headers), 30.0)
        return PoisonRecord(topic, kind, key, (topic, meta.partition, meta.offset))

    async def commands(self, topic: str) -> list[PoisonRecord]:
        channel = next(iter(self.channels))
        records = []
        # Unauthenticated: a DLQ entry and no reply, since the sender is unknown.
        for kind, headers in (
            ("unsigned", [("x-channel-id", channel.channel_id.encode())]),
            ("forged signature", [("x-channel-id", channel.channel_id.encode()),
                                  ("x-signature", b"0" * 64)]),
            ("unknown channel", [("x-channel-id", b"no-such-channel"),
                                 ("x-signature", b"0" * 64)]),
        ):
            key = _poison_key()
            records.append(await self._raw(topic, kind, self._command(topic, channel.channel_id),
                                           headers, key))
        for kind in ("signed malformed JSON", "signed not UTF-8", "signed deep nesting",
                     "signed wrong types", "signed huge value"):
            key, request_id = _poison_key(), str(uuid.uuid4())
            value, readable = self._signed_value(kind, topic, channel.channel_id, request_id)
            # A body without a readable request id is answered under the message key.
            records.append(await self._signed(topic, kind, value, channel.channel_id, key,
                                              request_id if readable else key.decode()))
        return records

    def _signed_value(self, kind: str, topic: str, channel_id: str,
                      request_id: str) -> tuple[bytes, bool]:
        """A correctly signed poison body, and whether its request id can be read."""
        envelope = json.loads(self._command(topic, channel_id, request_id))
        match kind:
            case "signed malformed JSON":
                return b'{"request_id": "' + request_id.encode() + b'", ', False
            case "signed not UTF-8":
                return b"\xff\xfe\x00poison", False
            case "signed deep nesting":
                return (json.dumps(envelope)[:-1].encode() + b', "x": '
                        + _deep(100_000).encode() + b"}"), False
            case "signed wrong types":
                return json.dumps({**envelope, "payload": {
                    "session_token": 12, "application_id": ["a"], "kind": {}}}).encode(), True
            case _:
                return json.dumps({**envelope, "payload": {
                    "session_token": "x" * 900_000, "application_id": "x"}}).encode(), True

    def _command(self, topic: str, channel_id: str, request_id: str | None = None) -> bytes:
        return self.sim.envelope(channel_id, POISON_COMMAND[topic.split(".")[0]],
                                 {"session_token": "poison"}, request_id)

    async def _signed(self, topic: str, kind: str, value: bytes, channel_id: str, key: bytes,
                      reply_to: str) -> PoisonRecord:
        channel = self.channels.get(channel_id)
        assert channel is not None
        try:
            reply = await self.sim.send_raw(topic, value, channel_id=channel_id, key=key,
                                            signature=sign(channel.secret, value),
                                            request_id=reply_to, timeout_s=20.0)
            code: str | None = f"{reply.status}: {reply.code}"
        except (TimeoutError, KafkaError):
            code = None
        return PoisonRecord(topic, kind, key, None, code)

    async def events(self, topic: str) -> list[PoisonRecord]:
        fake = f"poison-{uuid.uuid4().hex}"
        forged = {"event_id": str(uuid.uuid4()), "type": "LossReported", "schema_version": 1,
                  "stream_id": fake, "version": 1, "citizen_ref": fake,
                  "occurred_at": _now(), "correlation_id": fake, "causation_id": fake,
                  "prev_hash": "0" * 64, "hash": "f" * 64, "data": {}}
        values = [
            ("not JSON", b"\xff\xfe\x00 not an event"),
            ("deep nesting", _deep(100_000).encode()),
            ("wrong types", json.dumps({**forged, "version": "one", "data": [1]}).encode()),
            ("huge value", json.dumps({**forged, "data": {"x": "x" * 900_000}}).encode()),
            ("forged hash", json.dumps(forged).encode()),
        ]
        return [await self._raw(topic, kind, value, [], _poison_key()) for kind, value in values]


def _poison_key() -> bytes:
    return f"{POISON_KEY_PREFIX}{uuid.uuid4()}".encode()


# --- after the run: collect and check -------------------------------------------------------


async def dlq_ends(settings: CardDeskSettings) -> dict[TopicPartition, int]:
    """The end offset of every DLQ partition: where this run's dead letters start."""
    return await end_offsets(settings, [
        dlq_topic(t) for s in COMMAND_SERVICES for t in (command_topic(s), event_topic(s))])


async def end_offsets(settings: CardDeskSettings,
                      topics: list[str]) -> dict[TopicPartition, int]:
    """The end offset of every partition of `topics`."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                **client_options(settings))
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t in topics
                      for p in sorted(consumer.partitions_for_topic(t) or ())]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [TopicPartition(t, p) for t in topics
                          for p in sorted(consumer.partitions_for_topic(t) or ())]
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        return ends
    finally:
        await consumer.stop()


async def read_dead_letters(settings: CardDeskSettings,
                            since: Mapping[TopicPartition, int]) -> list[DeadLetter]:
    """Every dead letter after `since`, up to the end offsets now (bounded)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, **client_options(settings))
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        partitions = list(since)
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > since[tp]}
        for tp in partitions:
            consumer.seek(tp, since[tp])
        deadline = asyncio.get_running_loop().time() + 60.0
        while remaining and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset < ends[tp]:
                        headers = dict(record.headers or ())
                        code = bytes(headers.get("x-dlq-code") or b"?").decode(errors="replace")
                        reason = "; ".join(
                            bytes(headers[name]).decode(errors="replace")
                            for name in ("x-dlq-consumer", "x-dlq-reason") if headers.get(name))
                        letters.append(DeadLetter(tp.topic, record.key, code, reason))
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return letters


async def wait_drained(settings: CardDeskSettings, bound_s: float) -> float | None:
    """Seconds until every consumer group has caught up with its topics; None past the bound."""
    options = client_options(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **options)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                **options)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await admin.start()
    await consumer.start()
    try:
        groups = [f"carddesk-{name}" for name in (*COMMAND_SERVICES, "status")]
        while loop.time() - started < bound_s:
            try:
                lag = 0
                for group in groups:
                    committed = await admin.list_consumer_group_offsets(group)
                    ends = await consumer.end_offsets(list(committed))
                    lag += sum(max(0, ends[tp] - meta.offset) for tp, meta in committed.items())
                if lag == 0:
                    return loop.time() - started
            except KafkaError:
                pass
            await asyncio.sleep(1.0)
        return None
    finally:
        await consumer.stop()
        await admin.close()


async def read_events(settings: CardDeskSettings,
                      poison: set[Position]) -> list[tuple[Position, LoggedEvent]]:
    """Every readable event of the log; the positions of poison (this run's and any earlier
    run's, told by its key) go to `poison`."""
    events: list[tuple[Position, LoggedEvent]] = []

    def sink(msg: Inbound) -> None:
        if (msg.key or b"").startswith(POISON_KEY_PREFIX.encode()):
            poison.add((msg.topic, msg.partition, msg.offset))
            return
        try:
            event = LoggedEvent.parse(json.loads(msg.value))
        except (ValueError, RecursionError):
            return
        if event is not None:
            events.append(((msg.topic, msg.partition, msg.offset), event))

    await read_log(settings.kafka_bootstrap, list(event_topics("")), sink,
                   security=client_options(settings))
    return events


@dataclass
class Findings:
    rounds: int = 0
    completed: int = 0
    failed: list[str] = field(default_factory=list)
    race_outcomes: Counter[str] = field(default_factory=Counter)
    effects: list[str] = field(default_factory=list)
    lost: int = 0
    duplicated: int = 0
    unacknowledged: int = 0
    timeline: list[str] = field(default_factory=list)
    card_invariant: list[str] = field(default_factory=list)
    status_invariant: list[str] = field(default_factory=list)
    verify: str = ""
    verify_problems: list[str] = field(default_factory=list)
    replay: str = ""
    replay_problems: list[str] = field(default_factory=list)
    dlq: dict[str, int] = field(default_factory=dict)
    dlq_problems: list[str] = field(default_factory=list)
    drained_after_s: float | None = None
    faults: list[FaultRecord] = field(default_factory=list)
    poison_replies: Counter[str] = field(default_factory=Counter)
    commands: int = 0
    resends: int = 0
    not_yet: Counter[str] = field(default_factory=Counter)

    def missed(self) -> list[str]:
        """Every target this run missed; empty when it met them all."""
        invariants = len(self.card_invariant) + len(self.status_invariant)
        unanswered = self.unanswered_poison()
        checks = [
            (bool(self.failed or self.completed == 0),
             f"{len(self.failed)} journey(s) failed, {self.completed} completed"),
            *((count > 0, f"{count} {name} effect(s)") for name, count in (
                ("lost", self.lost), ("duplicated", self.duplicated),
                ("unacknowledged", self.unacknowledged))),
            (bool(self.timeline), f"{len(self.timeline)} timeline finding(s)"),
            (invariants > 0, f"{invariants} invariant violation(s)"),
            (bool(self.verify_problems), "audit verify not clean"),
            (bool(self.replay_problems), "audit replay not clean"),
            (bool(self.dlq_problems), f"{len(self.dlq_problems)} dead-letter finding(s)"),
            (self.drained_after_s is None, "consumer groups never caught up"),
            # DESIGN 4: a correctly signed message with a malformed body gets its refusal.
            (unanswered > 0, f"{unanswered} signed poison message(s) got no reply"),
        ]
        missed = [text for failed, text in checks if failed]
        missed += [f"{f.kind} {f.target}: not recovered ({'; '.join(f.notes)})"
                   for f in self.faults if not f.recovered]
        return missed

    def unanswered_poison(self) -> int:
        return sum(n for outcome, n in self.poison_replies.items()
                   if outcome.endswith(": no reply"))


async def check(settings: CardDeskSettings, plan: FaultPlan, driver: LoadDriver,
                ledger: Ledger, injector: Injector,
                dlq_start: Mapping[TopicPartition, int],
                events_start: Mapping[TopicPartition, int]) -> Findings:
    found = Findings(faults=injector.records, commands=len(ledger.sent), resends=ledger.resends,
                     not_yet=ledger.not_yet)
    found.rounds = len(driver.rounds)
    found.completed = sum(r.completed for r in driver.rounds)
    found.failed = [f"{mask_ref(r.citizen_ref)} at {r.failed_step}: {r.reason}"
                    for r in driver.rounds if not r.completed]
    found.race_outcomes = Counter(r.race for r in driver.rounds if r.race)
    found.poison_replies = Counter(f"{p.kind}: {p.reply_code or 'no reply'}"
                                   for p in injector.poison if p.kind.startswith("signed"))
    console.print("waiting for every consumer group to catch up …")
    found.drained_after_s = await wait_drained(settings, plan.drain_bound_s)

    console.print("reading the event log …")
    planted: set[Position] = set()
    logged = await read_events(settings, planted)
    events = [event for _, event in logged]
    ours = {s.citizen_ref for s in driver.sessions}
    effect_list = effect_findings(ledger.sent, events)
    found.effects = [f.describe() for f in effect_list]
    counts = Counter(f.kind for f in effect_list)
    found.lost, found.duplicated = counts["lost"], counts["duplicated"]
    found.unacknowledged = counts["unacknowledged"]
    accepted = {s.request_id for s in ledger.sent if s.outcome == "accepted"}
    effects = [e for e in events if e.causation_id in accepted]
    found.card_invariant = card_violations(events)

    schema = StatusSettings().status_schema
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    try:
        rows = await pool.fetch(f"SELECT citizen_ref, status FROM {schema}.card_status")
        statuses = {r["citizen_ref"]: r["status"] for r in rows}
        timelines = {ref: await fetch_timeline(pool, schema, ref) for ref in sorted(ours)}
    finally:
        await pool.close()
    found.status_invariant = status_violations(open_formal_losses(events), statuses)
    found.timeline = timeline_findings(effects, timelines, {e.event_id for e in events})

    console.print("audit verify …")
    report = await verify_log(settings.kafka_bootstrap, security=client_options(settings))
    this_run = {p.position for p in injector.poison
                if p.position is not None and p.topic.endswith(".events")}
    verdict = verify_verdict(
        (((f.topic, f.partition, f.offset), f.describe()) for f in report.failures),
        planted, must_flag=this_run,
        since={(tp.topic, tp.partition): end for tp, end in events_start.items()})
    found.verify = (f"{report.streams} streams, {report.events} events, {report.duplicates} "
                    f"benign duplicates; {verdict.expected} planted poison flagged, "
                    f"{len(verdict.unexpected)} other failure(s), {verdict.earlier} at"
                    " records from before this run")
    found.verify_problems = verdict.unexpected + [
        f"poison at {t}[{p}]@{o} not flagged" for t, p, o in verdict.unflagged_poison]
    found.verify_problems += [f"topic {t} missing" for t in report.missing_topics]

    console.print("audit replay --all …")
    replay = await replay_log(settings.kafka_bootstrap, settings.database_url, schema=schema,
                              security=client_options(settings))
    skipped = ", ".join(f"{code} {n}" for code, n in sorted(replay.skipped.items())) or "none"
    found.replay = (f"{len(replay.agreed)} agree, {len(replay.disagreeing)} differ; skipped as "
                    f"the live consumer would: {skipped}")
    found.replay_problems = [d.describe() for d in replay.differences]
    found.replay_problems += [f"topic {t} missing" for t in replay.missing_topics]

    letters = await read_dead_letters(settings, dlq_start)
    dlq = dlq_verdict(letters, {p.key: f"{p.topic} {p.kind}" for p in injector.poison})
    found.dlq = {f"{topic} {code}": n for (topic, code), n in sorted(dlq.by_reason.items())}
    found.dlq_problems = ([f"not poison, dead-lettered: {u}" for u in dlq.unexpected]
                          + [f"poison never dead-lettered: {p}"
                             for p in dlq.poison_not_dead_lettered])
    return found


# --- the run --------------------------------------------------------------------------------


async def run(settings: CardDeskSettings, plan: FaultPlan,
              report: Callable[[str], None] = console.print) -> Findings:
    """Seed, load, inject every fault of the plan one at a time, stop, check."""
    rng = random.Random(plan.seed)
    stack = Stack(settings, report=lambda line: console.print(f"[dim]• {line}[/]"))
    await asyncio.to_thread(stack.up)
    # The log keeps what earlier runs and other tests wrote (hostile records among them):
    # audit verify judges the whole log, this run answers for what it appends, seeding on.
    events_start = await end_offsets(settings, list(event_topics("")))
    report(f"seeding {plan.citizens} citizens …")
    people: list[SyntheticCitizen] = await seed(
        settings, plan.citizens, settings.state_dir / "fault-citizens.jsonl",
        report=lambda _: None)  # fresh citizens every run, even with --seed
    pepper = settings.citizen_ref_pepper.get_secret_value()
    sessions = [Session(c, citizen_ref=citizen_ref(pepper, c.id_number)) for c in people]
    dlq_start = await dlq_ends(settings)
    ledger = Ledger()
    async with ChannelSimulator.for_settings(settings) as sim:
        journey = FaultJourney(PatientChannel(sim, ledger, plan), plan)
        driver = LoadDriver(journey, sessions, rng, plan.think_seconds)
        injector = Injector(stack, settings, plan, ledger, sim, driver)
        one_of_each: list[Callable[[], Awaitable[FaultRecord]]] = [
            *(_bind(injector.kill, name) for name in plan.kill_services),
            *([_bind(injector.kill, "kafka")] if plan.kill_kafka else []),
            *([_bind(injector.kill, "postgres")] if plan.kill_postgres else []),
            *(_bind(injector.pause, name) for name in plan.pause),
            *([injector.race] if plan.race_rounds else []),
            *([injector.poison_all] if plan.poison else []),
        ]
        # Timing-dependent faults hide in one run of two: `repeat` rounds, each shuffled.
        faults = []
        for _ in range(plan.repeat):
            rng.shuffle(one_of_each)
            faults += one_of_each
        load = asyncio.create_task(driver.run())
        try:
            for fault in faults:
                await asyncio.sleep(rng.uniform(*plan.gap_seconds))
                if load.done():
                    report("every citizen stopped: no load left to inject faults under")
                    break
                injector.records.append(await fault())
            await asyncio.sleep(rng.uniform(*plan.gap_seconds))
        finally:
            driver.stop.set()
            report("faults done; letting the rounds under way finish …")
            try:
                await asyncio.wait_for(asyncio.shield(load), plan.finish_bound_s)
            except TimeoutError:
                load.cancel()
                report(f"rounds still running after {plan.finish_bound_s:.0f}s were stopped")
        driver.record_unfinished()
        # Everything must be up before the checks (and for whoever uses the stack next).
        final = FaultRecord("after the run", "stack", _now())
        loop = asyncio.get_running_loop()
        if not await injector.heal(final, loop.time() + plan.recovery_bound_s):
            final.progress_after_s = None
            injector.records.append(final)
        return await check(settings, plan, driver, ledger, injector, dlq_start,
                           events_start)


def _bind(method: Callable[[str], Awaitable[FaultRecord]],
          name: str) -> Callable[[], Awaitable[FaultRecord]]:
    async def fault() -> FaultRecord:
        return await method(name)
    return fault


async def _until(predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
                 timeout_s: float, interval: float = 0.5) -> bool:
    """Poll until the predicate holds (True) or `timeout_s` passes (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        outcome = predicate()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def print_findings(plan: FaultPlan, found: Findings) -> None:
    rows = [
        ("citizens", str(plan.citizens)),
        ("journeys (rounds) completed / failed", f"{found.completed} / {len(found.failed)}"),
        ("commands (request ids) / resends after no reply",
         f"{found.commands} / {found.resends}"),
        ("'not yet' refusals retried", ", ".join(f"{k} {n}" for k, n in
                                                  sorted(found.not_yet.items())) or "none"),
        ("race outcomes (ReportLoss while reissued)",
         ", ".join(f"{k} {n}" for k, n in sorted(found.race_outcomes.items())) or "-"),
        ("lost / duplicated / unacknowledged effects",
         f"{found.lost} / {found.duplicated} / {found.unacknowledged}"),
        ("timeline against the log", f"{len(found.timeline)} finding(s)"),
        ("card invariant violations", str(len(found.card_invariant))),
        ("open formal loss not LOST/reissue", str(len(found.status_invariant))),
        ("audit verify", found.verify),
        ("audit replay --all", found.replay),
        ("consumer groups caught up after", _secs(found.drained_after_s)),
    ]
    rows += [(f"DLQ {reason}", str(n)) for reason, n in found.dlq.items()]
    rows += [(f"poison {reason}", str(n)) for reason, n in sorted(found.poison_replies.items())]
    for fault in found.faults:
        back = ("came back by itself" if fault.came_back_by_itself
                else f"stack up ×{fault.stack_up_runs}")
        rows.append((f"{fault.kind} {fault.target}",
                     f"recovered in {_secs(fault.recovery_s)} (healthy "
                     f"{_secs(fault.healthy_after_s)}, progress {_secs(fault.progress_after_s)};"
                     f" {back})" + (f" — {'; '.join(fault.notes)}" if fault.notes else "")))
    print_table(f"fault run, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", rows)
    details = [*found.failed, *found.effects, *found.timeline, *found.card_invariant,
               *found.status_invariant, *found.verify_problems, *found.replay_problems,
               *found.dlq_problems]
    for line in details[:100]:
        console.print(f"  {line}", markup=False)
    if len(details) > 100:
        console.print(f"  … and {len(details) - 100} more", markup=False)
    missed = found.missed()
    if missed:
        console.print("[bold red]targets missed:[/] " + "; ".join(missed))
    else:
        console.print("[bold green]every target met[/]: 0 lost, 0 duplicated, 0 invariant "
                      "violations, verify and replay clean, every journey completed")


def findings_json(plan: FaultPlan, found: Findings) -> dict[str, Any]:
    result = asdict(found)
    # asdict rebuilds a Counter from (key, count) pairs, counting the pairs: keep the originals.
    for name in ("race_outcomes", "poison_replies", "not_yet"):
        result[name] = dict(getattr(found, name))
    result["faults"] = [{**asdict(f), "recovery_s": f.recovery_s} for f in found.faults]
    result["plan"] = {k: v for k, v in asdict(plan).items() if k != "environment"}
    result["missed"] = found.missed()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--citizens", type=int, default=30)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--pause", nargs="*", default=["loss", "status"],
                        help="services to SIGSTOP, one at a time")
    parser.add_argument("--pause-seconds", type=float, default=30.0)
    parser.add_argument("--race-rounds", type=int, default=40)
    parser.add_argument("--kill", nargs="*", default=["status", *COMMAND_SERVICES],
                        help="services to kill -9, one at a time")
    parser.add_argument("--no-kafka-kill", action="store_true")
    parser.add_argument("--no-postgres-kill", action="store_true")
    parser.add_argument("--no-poison", action="store_true")
    parser.add_argument("--repeat", type=int, default=1,
                        help="inject the whole set of faults this many times, each in a new order")
    parser.add_argument("--reply-timeout", type=float, default=10.0)
    parser.add_argument("--come-back", type=float, default=15.0,
                        help="seconds a killed process has to come back by itself")
    parser.add_argument("--recovery-bound", type=float, default=240.0,
                        help="seconds a fault has to be healthy and progressing again")
    args = parser.parse_args()
    plan = FaultPlan(citizens=args.citizens, seed=args.seed, kill_services=tuple(args.kill),
                     kill_kafka=not args.no_kafka_kill, kill_postgres=not args.no_postgres_kill,
                     pause=tuple(args.pause), pause_seconds=args.pause_seconds,
                     race_rounds=args.race_rounds, poison=not args.no_poison,
                     repeat=args.repeat, recovery_bound_s=args.recovery_bound,
                     reply_timeout_s=args.reply_timeout, come_back_s=args.come_back)
    configure_logging("bench", "WARNING")
    # The broker is killed on purpose: its clients' reconnect errors would bury the report.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    # Plumbing (poison, DLQ and log reads, restarts) as the stack's administrator.
    settings = as_principal(CardDeskSettings(), ADMIN)
    started = time.monotonic()
    found = uvloop.run(run(settings, plan))
    print_table("run", [("duration", f"{time.monotonic() - started:.0f} s")])
    print_findings(plan, found)
    console.print(f"written {write_result('faults', findings_json(plan, found))}")
    return 1 if found.missed() else 0


if __name__ == "__main__":
    raise SystemExit(main())
