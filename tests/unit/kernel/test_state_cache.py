"""The state cache: one row read per command, never a stale or foreign history."""

from __future__ import annotations

from datetime import UTC, datetime

from shared.application import StateCache, current_state, handle_command
from shared.contracts.loss import LossCancelled
from shared.decider import Decider
from shared.envelope import EventEnvelope
from shared.errors import DomainError
from shared.events import EventMeta
from shared.eventstore import InMemoryEventStore

META = EventMeta("ref", datetime(2026, 1, 1, tzinfo=UTC), "c", "c")


def count(state: int, _event: EventEnvelope) -> int:
    return state + 1


def identity(envelope: EventEnvelope) -> EventEnvelope:
    return envelope


# A stream whose state counts its events.
COUNTER: Decider[None, int, EventEnvelope, None] = Decider(
    initial=0, evolve=count, decide=lambda _c, _s, _x: [], decode=identity,
    stream_id=lambda ref: ref, is_erased=lambda _s: False)


class CountingStore(InMemoryEventStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads: list[int] = []

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[EventEnvelope]:
        self.reads.append(after_version)
        return await super().read_stream(stream_id, after_version)


async def append_one(store: InMemoryEventStore, cache: StateCache) -> None:
    await handle_command(store, COUNTER, "s", lambda _: [LossCancelled(loss_id="l")], META,
                         cache)


async def test_a_stream_unchanged_since_the_last_command_is_not_read_again() -> None:
    store, cache = CountingStore(), StateCache()
    await append_one(store, cache)
    await append_one(store, cache)
    state, version, _ = await current_state(store, COUNTER, "s", cache)
    assert (state, version) == (2, 2)
    assert store.reads == []  # the first found the stream empty by its head; none read it


async def test_a_stream_emptied_under_a_cached_state_is_the_initial_state() -> None:
    store, cache = CountingStore(), StateCache()
    cache.put("s", 3, "f" * 64, 999)  # what a write that was rolled back would leave
    state, version, _ = await current_state(store, COUNTER, "s", cache)
    assert (state, version) == (0, 0)
    assert store.reads == []


async def test_events_written_by_another_process_are_folded_onto_the_cached_state() -> None:
    store, cache = CountingStore(), StateCache()
    await append_one(store, cache)
    await append_one(store, StateCache())  # another process, another cache
    state, version, _ = await current_state(store, COUNTER, "s", cache)
    assert (state, version) == (2, 2)
    assert store.reads[-1] == 1  # only what came after the cached version


async def test_a_cached_state_whose_hash_differs_from_the_stream_is_never_used() -> None:
    store, cache = CountingStore(), StateCache()
    await append_one(store, cache)
    # What a rolled-back write would leave: the right version, another history.
    cache.put("s", 1, "f" * 64, 999)
    state, version, _ = await current_state(store, COUNTER, "s", cache)
    assert (state, version) == (1, 1)


async def test_a_cache_never_grows_past_its_capacity() -> None:
    cache = StateCache(capacity=3)
    for i in range(10):
        cache.put(f"k{i}", 1, "h", i)
    assert cache.get("k9") is not None
    assert cache.get("k0") is None


async def test_a_refusal_decided_on_an_unproven_cached_state_is_decided_again() -> None:
    store, cache = CountingStore(), StateCache()
    await append_one(store, cache)
    cache.put("s", 1, "f" * 64, 999)  # left by a write rolled back

    def decide(state: int) -> list[LossCancelled]:
        if state == 999:
            raise DomainError("only the stale state refuses this")
        return [LossCancelled(loss_id="l")]

    [appended] = await handle_command(store, COUNTER, "s", decide, META, cache)
    assert appended.version == 2
