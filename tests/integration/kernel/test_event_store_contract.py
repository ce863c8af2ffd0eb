"""One contract, two stores: the in-memory fake must behave as the PostgreSQL store does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime

import asyncpg
import pytest

from shared.application import StateCache, handle_command
from shared.contracts.loss import LossCancelled
from shared.envelope import GENESIS_HASH, EventEnvelope, verify_stream
from shared.events import EventMeta
from shared.eventstore import ConcurrencyError, EventStore, InMemoryEventStore, PostgresEventStore
from tests.builders import COUNTER, pending

pytestmark = pytest.mark.integration

StoreFactory = Callable[[], AbstractAsyncContextManager[EventStore]]


@pytest.fixture(params=["memory", "postgres"])
def store_factory(request: pytest.FixtureRequest, pool: asyncpg.Pool, schema: str) -> StoreFactory:
    if request.param == "memory":
        memory = InMemoryEventStore()

        @asynccontextmanager
        async def memory_store() -> AsyncIterator[EventStore]:
            yield memory

        return memory_store

    @asynccontextmanager
    async def pg_store() -> AsyncIterator[EventStore]:
        async with pool.acquire() as conn, conn.transaction():
            yield PostgresEventStore(conn, schema, "probe.events")

    return pg_store


async def test_appended_events_are_read_back_in_version_order_with_a_valid_chain(
    store_factory: StoreFactory,
) -> None:
    async with store_factory() as store:
        await store.append("s-1", 0, pending(2))
    async with store_factory() as store:
        await store.append("s-1", 2, pending(1))
        events = await store.read_stream("s-1")
    assert [e.version for e in events] == [1, 2, 3]
    assert events[0].prev_hash == GENESIS_HASH
    assert verify_stream("s-1", [e.to_json_dict() for e in events]) == []


async def test_heads_gives_each_streams_last_version_and_hash_and_an_empty_ones_genesis(
    store_factory: StoreFactory,
) -> None:
    async with store_factory() as store:
        first = await store.append("h-1", 0, pending(2))
        second = await store.append("h-2", 0, pending(1))
        heads = await store.heads(["h-1", "h-2", "h-none"])
    assert heads == {"h-1": (2, first[-1].hash), "h-2": (1, second[-1].hash),
                     "h-none": (0, GENESIS_HASH)}


async def test_appending_at_a_stale_expected_version_raises_the_concurrency_error(
    store_factory: StoreFactory,
) -> None:
    async with store_factory() as store:
        await store.append("s-2", 0, pending(1))
    with pytest.raises(ConcurrencyError):
        async with store_factory() as store:
            await store.append("s-2", 0, pending(1))


async def test_an_expected_version_ahead_of_the_stream_is_refused_so_versions_stay_gapless(
    store_factory: StoreFactory,
) -> None:
    with pytest.raises(ConcurrencyError):
        async with store_factory() as store:
            await store.append("s-3", 4, pending(1))


async def test_read_all_returns_every_stream_in_append_order(store_factory: StoreFactory) -> None:
    async with store_factory() as store:
        await store.append("a", 0, pending(1, "x"))
        await store.append("b", 0, pending(1, "y"))
        await store.append("a", 1, pending(1, "x"))
        everything = await store.read_all()
    assert [(e.stream_id, e.version) for e in everything] == [("a", 1), ("b", 1), ("a", 2)]


async def test_two_concurrent_appends_at_the_same_version_one_wins_the_other_gets_the_error(
    pool: asyncpg.Pool, schema: str,
) -> None:
    both_read = asyncio.Barrier(2)

    async def writer() -> str:
        async with pool.acquire() as conn, conn.transaction():
            store = PostgresEventStore(conn, schema, "probe.events")
            version = len(await store.read_stream("hot"))
            await both_read.wait()
            try:
                await store.append("hot", version, pending(1))
            except ConcurrencyError:
                return "conflict"
            return "won"

    # Bounded: a writer that fails before the barrier would leave the other waiting.
    outcomes = await asyncio.wait_for(asyncio.gather(writer(), writer()), 30)
    assert sorted(outcomes) == ["conflict", "won"]
    async with pool.acquire() as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.events") == 1
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox") == 1


async def test_a_lost_race_in_the_one_round_trip_append_inserts_nothing_and_raises(
    pool: asyncpg.Pool, schema: str,
) -> None:
    both_read = asyncio.Barrier(2)

    async def writer() -> str:
        async with pool.acquire() as conn, conn.transaction():
            store = PostgresEventStore(conn, schema, "probe.events")
            events = await store.read_stream("hot2")
            await both_read.wait()
            try:
                await store.append("hot2", len(events), pending(2), last_hash=GENESIS_HASH)
            except ConcurrencyError:
                return "conflict"
            return "won"

    outcomes = await asyncio.wait_for(asyncio.gather(writer(), writer()), 30)
    assert sorted(outcomes) == ["conflict", "won"]
    async with pool.acquire() as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.events") == 2
        assert await conn.fetchval(f"SELECT count(*) FROM {schema}.outbox") == 2


async def test_an_append_onto_a_head_that_was_rolled_back_inserts_nothing(
    store_factory: StoreFactory,
) -> None:
    async with store_factory() as store:
        [first] = await store.append("rb", 0, pending(1), last_hash=GENESIS_HASH)
    rolled_back = "f" * 64  # the hash a write that never committed gave version 2
    for version, last_hash in ((2, rolled_back), (1, rolled_back), (1, GENESIS_HASH)):
        with pytest.raises(ConcurrencyError):
            async with store_factory() as store:
                await store.append("rb", version, pending(1), last_hash=last_hash)
    async with store_factory() as store:
        assert [e.version for e in await store.read_stream("rb")] == [1]
        [second] = await store.append("rb", 1, pending(1), last_hash=first.hash)
    assert second.prev_hash == first.hash


async def test_a_command_decided_on_a_cached_state_of_a_rolled_back_write_is_decided_again(
    pool: asyncpg.Pool, schema: str,
) -> None:
    cache = StateCache()
    meta = EventMeta("ref", datetime.now(UTC), "c", "c")

    async def append_one() -> list[EventEnvelope]:
        async with pool.acquire() as conn, conn.transaction():
            return await handle_command(
                PostgresEventStore(conn, schema, "probe.events"), COUNTER, "cached",
                lambda _: [LossCancelled(loss_id="l")], meta, cache)

    await append_one()
    # A second write that was rolled back left its state in the cache: version 2.
    with contextlib.suppress(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await handle_command(
                PostgresEventStore(conn, schema, "probe.events"), COUNTER, "cached",
                lambda _: [LossCancelled(loss_id="l")], meta, cache)
            raise RuntimeError("rolled back")
    [appended] = await append_one()
    assert appended.version == 2
    async with pool.acquire() as conn:
        events = await PostgresEventStore(conn, schema, "probe.events").read_stream("cached")
    assert verify_stream("cached", [e.to_json_dict() for e in events]) == []
