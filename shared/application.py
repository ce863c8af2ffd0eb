"""The one generic command path: load the stream, fold, decide, append, retry on conflict.

`Streams` is one service's per-citizen streams: its `Decider`, its schema and events topic,
and the cache of folded states that only this service's process fills.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Generic, TypeVar, cast
from uuid import UUID

import asyncpg
from uuid_utils.compat import uuid7

from shared.decider import Decider
from shared.envelope import GENESIS_HASH, EventEnvelope
from shared.errors import DomainError
from shared.events import DomainEvent, EventMeta, to_pending
from shared.eventstore import ConcurrencyError, EventStore, PostgresEventStore

C = TypeVar("C")
S = TypeVar("S")
E = TypeVar("E")
X = TypeVar("X")

Decision = Callable[[S], Sequence[DomainEvent]]


class StateCache:
    """Folded states of recently used streams, so a command reads one row instead of the
    whole stream. An entry is used only while the stream's head still has the cached version
    *and hash*: the hash chain names the exact history, so a state cached from a write that
    was rolled back can never be mistaken for the committed one. One cache serves one store
    (one schema); `Streams` owns it."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[int, str, object]] = OrderedDict()

    def get(self, stream_id: str) -> tuple[int, str, object] | None:
        entry = self._entries.get(stream_id)
        if entry is not None:
            self._entries.move_to_end(stream_id)
        return entry

    def put(self, stream_id: str, version: int, last_hash: str, state: object) -> None:
        self._entries[stream_id] = (version, last_hash, state)
        self._entries.move_to_end(stream_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


async def current_state(
    store: EventStore, decider: Decider[C, S, E, X], stream_id: str, cache: StateCache,
    *, head: tuple[int, str] | None = None,
) -> tuple[S, int, str]:
    """The stream's state, version and last hash: from the cache when the head matches,
    else by folding only the events after the cached version (or all of them). `head` is
    the stream's head when the caller has just read it."""
    version, last_hash = head or await store.head(stream_id)
    cached = cache.get(stream_id)
    if cached is not None and cached[0] == version and cached[1] == last_hash:
        return cast(S, cached[2]), version, last_hash
    state, after, expected_prev = decider.initial, 0, GENESIS_HASH
    if version == 0:  # no events: nothing to read (a new citizen's first command)
        cache.put(stream_id, version, last_hash, state)
        return state, version, last_hash
    if cached is not None and cached[0] < version:
        state, after, expected_prev = cast(S, cached[2]), cached[0], cached[1]
    envelopes = await store.read_stream(stream_id, after_version=after)
    if after and (not envelopes or envelopes[0].prev_hash != expected_prev):
        # The cached history is not this stream's history: fold it all again.
        state, envelopes = decider.initial, await store.read_stream(stream_id)
    state = decider.fold([decider.decode(e) for e in envelopes], state)
    if envelopes:
        version, last_hash = envelopes[-1].version, envelopes[-1].hash
    cache.put(stream_id, version, last_hash, state)
    return state, version, last_hash


async def handle_command(
    store: EventStore,
    decider: Decider[C, S, E, X],
    stream_id: str,
    decide: Decision[S],
    meta: EventMeta,
    cache: StateCache,
    *,
    new_id: Callable[[], UUID] = uuid7,
    max_attempts: int = 5,
) -> list[EventEnvelope]:
    """Decide against the latest state; a concurrent writer makes us re-read and decide again.

    A cached state is tried first without reading the stream's head: the append only
    succeeds if that state's last event is committed and nothing follows it, which proves
    the state was the latest. Any other outcome of an unproven state (a refusal, nothing to
    append, a lost race) is decided again on the state the head names.

    Domain errors raised by `decide` propagate unchanged; a conflict that persists past
    `max_attempts` propagates as `ConcurrencyError`, never as a silent merge.
    """
    cached = cache.get(stream_id)
    if cached is not None:
        version, last_hash, state = cached[0], cached[1], cast(S, cached[2])
        with contextlib.suppress(DomainError, ConcurrencyError):
            pending = [to_pending(event, meta, new_id()) for event in decide(state)]
            if pending:
                appended = await store.append(stream_id, version, pending, last_hash=last_hash)
                _remember(cache, decider, stream_id, state, appended)
                return appended
    for attempt in range(1, max_attempts + 1):
        state, version, last_hash = await current_state(store, decider, stream_id, cache)
        pending = [to_pending(event, meta, new_id()) for event in decide(state)]
        try:
            appended = await store.append(stream_id, version, pending, last_hash=last_hash)
        except ConcurrencyError:
            if attempt == max_attempts:
                raise
            continue
        if appended:
            _remember(cache, decider, stream_id, state, appended)
        return appended
    raise AssertionError("unreachable")


def _remember(cache: StateCache, decider: Decider[C, S, E, X], stream_id: str, state: S,
              appended: Sequence[EventEnvelope]) -> None:
    """Cache the state after an append, under the new head's version and hash."""
    cache.put(stream_id, appended[-1].version, appended[-1].hash,
              decider.fold([decider.decode(e) for e in appended], state))


class Streams(Generic[C, S, E, X]):
    """One service's per-citizen streams in its schema: read, decide and append them."""

    def __init__(self, decider: Decider[C, S, E, X], schema: str, events_topic: str,
                 cache: StateCache | None = None) -> None:
        self.decider = decider
        self.schema = schema
        self.events_topic = events_topic
        self.cache = cache or StateCache()

    def store(self, conn: asyncpg.Connection) -> PostgresEventStore:
        return PostgresEventStore(conn, self.schema, self.events_topic)

    async def state(self, conn: asyncpg.Connection, citizen_ref: str) -> S:
        state, _, _ = await current_state(self.store(conn), self.decider,
                                          self.decider.stream_id(citizen_ref), self.cache)
        return state

    async def erased(self, conn: asyncpg.Connection, citizen_ref: str) -> bool:
        """Whether the citizen's stream here records an erasure."""
        return self.decider.is_erased(await self.state(conn, citizen_ref))

    def stream_id(self, citizen_ref: str) -> str:
        """The citizen's stream here."""
        return self.decider.stream_id(citizen_ref)

    async def warm(self, conn: asyncpg.Connection, citizen_refs: Collection[str]) -> None:
        """Cache the states of the citizens' streams the cache lacks, all read in one
        statement, so that a batch's commands decide without a read each. The cache's rule
        holds for them as for any entry: an append proves its state was the latest, else the
        command is decided again on the head (`handle_command`)."""
        missing = {stream_id for ref in citizen_refs
                   if self.cache.get(stream_id := self.decider.stream_id(ref)) is None}
        if not missing:
            return
        found = await self.store(conn).read_streams(missing)
        for stream_id in missing:
            envelopes = found.get(stream_id, [])
            state = self.decider.fold([self.decider.decode(e) for e in envelopes],
                                      self.decider.initial)
            version, last_hash = ((envelopes[-1].version, envelopes[-1].hash) if envelopes
                                  else (0, GENESIS_HASH))
            self.cache.put(stream_id, version, last_hash, state)

    async def erased_among(self, conn: asyncpg.Connection, citizen_refs: Collection[str],
                           heads: Mapping[str, tuple[int, str]] | None = None) -> set[str]:
        """Those of `citizen_refs` whose stream here records an erasure: every head in one
        statement (or those in `heads`, just read under the citizens' locks: a stream not
        in it has no events), each state from the cache when it holds that head (else
        folded; a stream without events is in the initial state)."""
        store = self.store(conn)
        streams = {ref: self.decider.stream_id(ref) for ref in citizen_refs}
        if heads is None:
            heads = await store.heads(streams.values())
        erased: set[str] = set()
        for ref, stream_id in streams.items():
            head = heads.get(stream_id, (0, GENESIS_HASH))
            state = self.decider.initial
            if head[0] > 0:
                state, _, _ = await current_state(store, self.decider, stream_id, self.cache,
                                                  head=head)
            if self.decider.is_erased(state):
                erased.add(ref)
        return erased

    async def decide(self, conn: asyncpg.Connection, command: C, context: X,
                     meta: EventMeta) -> list[EventEnvelope]:
        """Decide `command` for `meta.citizen_ref` and append what it decided."""
        return await self.apply(
            conn, lambda state: self.decider.decide(command, state, context), meta)

    async def apply(self, conn: asyncpg.Connection, decide: Decision[S],
                    meta: EventMeta) -> list[EventEnvelope]:
        """Append what `decide` makes of the citizen's latest state (one decision that is
        not the decider's own, such as erasure or several commands in turn)."""
        return await handle_command(self.store(conn), self.decider,
                                    self.decider.stream_id(meta.citizen_ref), decide, meta,
                                    self.cache)
