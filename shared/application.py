"""The one generic command handler: load the stream, fold, decide, append, retry on conflict."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar
from uuid import UUID, uuid4

from shared.envelope import GENESIS_HASH, EventEnvelope
from shared.events import DomainEvent, EventMeta, to_pending
from shared.eventstore import ConcurrencyError, EventStore

S = TypeVar("S")
E = TypeVar("E")


def fold(initial: S, evolve: Callable[[S, E], S], events: Sequence[E]) -> S:
    state = initial
    for event in events:
        state = evolve(state, event)
    return state


async def load(
    store: EventStore,
    stream_id: str,
    decode: Callable[[EventEnvelope], E],
    initial: S,
    evolve: Callable[[S, E], S],
) -> tuple[S, int]:
    """The stream's current state and version."""
    envelopes = await store.read_stream(stream_id)
    return fold(initial, evolve, [decode(e) for e in envelopes]), len(envelopes)


async def handle_command(
    store: EventStore,
    stream_id: str,
    *,
    decode: Callable[[EventEnvelope], E],
    initial: S,
    evolve: Callable[[S, E], S],
    decide: Callable[[S], Sequence[DomainEvent]],
    meta: EventMeta,
    new_id: Callable[[], UUID] = uuid4,
    max_attempts: int = 5,
) -> list[EventEnvelope]:
    """Decide against the latest state; a concurrent writer makes us re-read and decide again.

    Domain errors raised by `decide` propagate unchanged; a conflict that persists past
    `max_attempts` propagates as `ConcurrencyError`, never as a silent merge.
    """
    for attempt in range(1, max_attempts + 1):
        envelopes = await store.read_stream(stream_id)
        state = fold(initial, evolve, [decode(e) for e in envelopes])
        pending = [to_pending(event, meta, new_id()) for event in decide(state)]
        last_hash = envelopes[-1].hash if envelopes else GENESIS_HASH
        try:
            return await store.append(stream_id, len(envelopes), pending, last_hash=last_hash)
        except ConcurrencyError:
            if attempt == max_attempts:
                raise
    raise AssertionError("unreachable")
