"""Each service is a declaration, `ServiceSpec`; `bootstrap` builds every one the same way.

A spec names the service, its settings, its tables and its secrets, and says how to `wire`
its handlers from a `Kit` (settings, schema, events topic, clock, id source) into a `Wiring`:
the command routes of `<name>.commands`, the event topics it follows with their handlers,
and its background loops. `bootstrap` makes the runtime (pool, producer, relay, dead
letters), the command intake, one follower per followed topic (one Kafka consumer feeds
them all), the barrier that holds commands until the followers have caught up, and the
loops; schema, consumer group and topics are named the same way for every service:

    schema          the service's name (a test passes its own)
    consumer group  carddesk-<name> (a test passes its own)
    commands        <name>.commands (DESIGN section 3)
    follower        <name>:<followed topic>, the name its processed rows are kept under
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import asyncpg

from shared.channels import ChannelRegistry
from shared.checked import CheckedFollow
from shared.commands import CommandIntake, CommandRoute
from shared.consumer import (
    BatchConsumer,
    BatchEventHandler,
    Erasures,
    EventConsumer,
    EventHandler,
    Inbound,
    purge_bookkeeping_loop,
)
from shared.contracts import KNOWN_EVENT_TYPES
from shared.decider import Clock, IdSource, new_uuid, utc_now
from shared.envelope import EventEnvelope
from shared.intake.prepare import BatchPrepare
from shared.runtime import ServiceRuntime, run_service
from shared.settings import CardDeskSettings
from shared.topics import command_topic

T = TypeVar("T", bound=CardDeskSettings)

# A background loop: runs for ever on the service's pool (timers, purges); restarted with
# backoff if it fails.
Loop = Callable[[asyncpg.Pool], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Kit(Generic[T]):
    """What a service's handlers are made of."""

    settings: T
    schema: str
    events_topic: str
    clock: Clock = utc_now
    ids: IdSource = new_uuid


def follower_name(service: str, topic: str) -> str:
    """The name `service`'s follower of `topic` keeps its processed rows under (a projection
    rebuilt out of process writes the same)."""
    return f"{service}:{topic}"


@dataclass(frozen=True, slots=True)
class Follow:
    """An event topic the service follows: each event applied once, in the transaction that
    records it (`shared.consumer.EventConsumer`)."""

    topic: str  # the contract's name, e.g. `issuance.events`
    handler: EventHandler
    description: str
    # Where the events are actually read (a projection rebuild reads copies).
    source: str | None = None
    batch_handler: BatchEventHandler | None = None
    on_applied: Callable[[Sequence[tuple[Inbound, EventEnvelope]]], None] | None = None
    log_applied: bool = False
    # A batch first tried in two statements, then the locked way (`shared.checked`).
    checked: CheckedFollow | None = None


@dataclass(frozen=True, slots=True)
class Wiring:
    """A service's handlers, put where its messages arrive."""

    routes: Mapping[str, CommandRoute] = field(default_factory=dict)
    commands: str = ""  # what `<name>.commands` carries, for the AsyncAPI document
    follows: Sequence[Follow] = ()
    loops: Sequence[Loop] = ()
    # Citizens erased here, whose followed events change nothing (`Streams`).
    erased: Erasures | None = None
    # Reads for a command batch's citizens at once, before its commands run (their routes'
    # `citizen`; `shared.intake.prepare`).
    prepare: BatchPrepare | None = None


@dataclass(frozen=True, slots=True)
class ServiceSpec(Generic[T]):
    """One service, declared."""

    name: str
    settings: Callable[[], T]
    wire: Callable[[Kit[T]], Wiring]
    health_port: int
    # The secret settings the service reads; production refuses their shipped values.
    secrets: Collection[str] = ()
    # The service's own tables, in its schema.
    ddl: Callable[[str], str] = lambda _schema: ""
    # Its own settings found holding a shipped (development) value.
    shipped_in_use: Callable[[T], Iterable[str]] = lambda _settings: ()


@dataclass(slots=True)
class Service(Generic[T]):
    """A bootstrapped service: its runtime, and its consumers once the runtime has started."""

    runtime: ServiceRuntime
    kit: Kit[T]
    wiring: Wiring
    intake: CommandIntake | None = None
    followers: dict[str, EventConsumer] = field(default_factory=dict)

    def follower(self, topic: str) -> EventConsumer:
        return self.followers[topic]


def bootstrap(
    spec: ServiceSpec[T],
    settings: T | None = None,
    *,
    schema: str | None = None,
    group: str | None = None,
    clock: Clock = utc_now,
    ids: IdSource = new_uuid,
) -> Service[T]:
    """The service `spec` declares, unstarted: `run(spec)` runs it, tests start its runtime
    in-process (with their own `schema` and `group` to stay isolated)."""
    settings = settings or spec.settings()
    schema = schema or spec.name
    runtime = ServiceRuntime(spec.name, settings, schema=schema, group=group,
                             extra_ddl=spec.ddl(schema), secrets=spec.secrets,
                             shipped_in_use=spec.shipped_in_use(settings))
    kit = Kit(settings, schema, runtime.events_topic, clock, ids)
    service = Service(runtime, kit, spec.wire(kit))
    wiring = service.wiring
    # Commands of a service that follows others wait until its followers have caught up.
    barrier = (runtime.barrier([f.source or f.topic for f in wiring.follows])
               if wiring.routes and wiring.follows else None)

    async def ready() -> None:
        if wiring.routes:
            service.intake = CommandIntake(
                runtime.pool, schema, ChannelRegistry.from_file(settings.channels_file),
                wiring.routes, runtime.dead_letters, clock,
                settings=settings, barrier=barrier, ids=ids, prepare=wiring.prepare)
        for follow in wiring.follows:
            service.followers[follow.topic] = EventConsumer(
                runtime.pool, schema, follower_name(spec.name, follow.topic), follow.handler,
                runtime.dead_letters, known_types=KNOWN_EVENT_TYPES[follow.topic],
                settings=settings,
                batch_handler=follow.batch_handler, on_applied=follow.on_applied,
                log_applied=follow.log_applied, erased=wiring.erased, checked=follow.checked)

    runtime.on_ready(ready)
    if wiring.routes:
        runtime.subscribe(command_topic(spec.name), lambda: _intake(service),
                          description=wiring.commands)
        runtime.background(_named("purge_stored_replies",
                                  lambda: _intake(service).purge_loop()))
    if wiring.follows:  # one Kafka consumer for every followed topic
        runtime.subscribe_all(
            {follow.source or follow.topic: _follower(service, follow.topic)
             for follow in wiring.follows},
            description=" ".join(follow.description for follow in wiring.follows))
        runtime.background(_named("purge_bookkeeping", lambda: purge_bookkeeping_loop(
            runtime.pool, schema, settings)))
    for loop in wiring.loops:
        runtime.background(_on_pool(runtime, loop))
    return service


def run(spec: ServiceSpec[T]) -> None:
    """The body of `python -m services.<name>.main`."""
    service = bootstrap(spec)
    run_service(service.runtime, default_health_port=spec.health_port)


def _intake(service: Service[T]) -> CommandIntake:
    assert service.intake is not None, "the runtime has not started"
    return service.intake


def _follower(service: Service[T], topic: str) -> Callable[[], BatchConsumer]:
    return lambda: service.follower(topic)


def _on_pool(runtime: ServiceRuntime, loop: Loop) -> Callable[[], Awaitable[None]]:
    return _named(getattr(loop, "__name__", "loop"), lambda: loop(runtime.pool))


def _named(name: str, loop: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """`loop` under `name`, which the runtime's supervisor logs a crash with."""

    async def run_loop() -> None:
        await loop()

    run_loop.__name__ = name
    return run_loop
