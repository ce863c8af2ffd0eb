"""The one generic command handler: load the stream, fold, decide, append, retry on conflict."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TypeVar, cast
from uuid import UUID, uuid4

from shared.envelope import GENESIS_HASH, EventEnvelope
from shared.errors import DomainError
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
    state, version, _ = await current_state(store, stream_id, decode, initial, evolve)
    return state, version


class StateCache:
    """Folded states of recently used streams, so a command reads one row instead of the
    whole stream. An entry is used only while the stream's head still has the cached version
    *and hash*: the hash chain names the exact history, so a state cached from a write that
    was rolled back can never be mistaken for the committed one."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[object, ...], tuple[int, str, object]] = OrderedDict()

    def get(self, key: tuple[object, ...]) -> tuple[int, str, object] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple[object, ...], version: int, last_hash: str, state: object) -> None:
        self._entries[key] = (version, last_hash, state)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


STATES = StateCache()


def _key(store: EventStore, stream_id: str, evolve: object) -> tuple[object, ...]:
    return (getattr(store, "schema", id(store)), stream_id, evolve)


async def current_state(
    store: EventStore,
    stream_id: str,
    decode: Callable[[EventEnvelope], E],
    initial: S,
    evolve: Callable[[S, E], S],
    cache: StateCache = STATES,
) -> tuple[S, int, str]:
    """The stream's state, version and last hash: from the cache when the head matches,
    else by folding only the events after the cached version (or all of them)."""
    key = _key(store, stream_id, evolve)
    version, last_hash = await store.head(stream_id)
    cached = cache.get(key)
    if cached is not None and cached[0] == version and cached[1] == last_hash:
        return cast(S, cached[2]), version, last_hash
    state, after, expected_prev = initial, 0, GENESIS_HASH
    if cached is not None and cached[0] < version:
        state, after, expected_prev = cast(S, cached[2]), cached[0], cached[1]
    envelopes = await store.read_stream(stream_id, after_version=after)
    if after and (not envelopes or envelopes[0].prev_hash != expected_prev):
        # The cached history is not this stream's history: fold it all again.
        state, envelopes = initial, await store.read_stream(stream_id)
    state = fold(state, evolve, [decode(e) for e in envelopes])
    if envelopes:
        version, last_hash = envelopes[-1].version, envelopes[-1].hash
    cache.put(key, version, last_hash, state)
    return state, version, last_hash


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
    cache: StateCache = STATES,
) -> list[EventEnvelope]:
    """Decide against the latest state; a concurrent writer makes us re-read and decide again.

    A cached state is tried first without reading the stream's head: the append only
    succeeds if that state's last event is committed and nothing follows it, which proves
    the state was the latest. Any other outcome of an unproven state (a refusal, nothing to
    append, a lost race) is decided again on the state the head names.

    Domain errors raised by `decide` propagate unchanged; a conflict that persists past
    `max_attempts` propagates as `ConcurrencyError`, never as a silent merge.
    """
    key = _key(store, stream_id, evolve)
    cached = cache.get(key)
    if cached is not None:
        version, last_hash, state = cached[0], cached[1], cast(S, cached[2])
        with contextlib.suppress(DomainError, ConcurrencyError):
            pending = [to_pending(event, meta, new_id()) for event in decide(state)]
            if pending:
                appended = await store.append(stream_id, version, pending, last_hash=last_hash)
                _remember(cache, key, state, evolve, decode, appended)
                return appended
    for attempt in range(1, max_attempts + 1):
        state, version, last_hash = await current_state(store, stream_id, decode, initial,
                                                        evolve, cache)
        pending = [to_pending(event, meta, new_id()) for event in decide(state)]
        try:
            appended = await store.append(stream_id, version, pending, last_hash=last_hash)
        except ConcurrencyError:
            if attempt == max_attempts:
                raise
            continue
        if appended:
            _remember(cache, key, state, evolve, decode, appended)
        return appended
    raise AssertionError("unreachable")


def _remember(cache: StateCache, key: tuple[object, ...], state: S, evolve: Callable[[S, E], S],
              decode: Callable[[EventEnvelope], E], appended: Sequence[EventEnvelope]) -> None:
    """Cache the state after an append, under the new head's version and hash."""
    cache.put(key, appended[-1].version, appended[-1].hash,
              fold(state, evolve, [decode(e) for e in appended]))
