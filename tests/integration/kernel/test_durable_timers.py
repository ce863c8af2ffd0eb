"""Durable timers on the real PostgreSQL: arming and re-arming, claims that two replicas
never share, disarming, and postponing a timer that failed."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from shared.timers import DurableTimers, Rearm, Timer, timers_ddl

pytestmark = pytest.mark.integration

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def _timer(key: str, citizen_ref: str = "citizen-1", *, due_in: int = 0,
           causation_id: str = "ev-1") -> Timer:
    return Timer(key=key, citizen_ref=citizen_ref, due_at=T0 + timedelta(minutes=due_in),
                 correlation_id="corr-1", causation_id=causation_id)


async def _timers(pool: asyncpg.Pool, schema: str, rearm: Rearm) -> DurableTimers:
    await pool.execute(timers_ddl(schema, "timers"))
    return DurableTimers(schema, "timers", rearm=rearm)


async def _claim(pool: asyncpg.Pool, timers: DurableTimers, now: datetime,
                 limit: int = 10) -> list[Timer]:
    async with pool.acquire() as conn, conn.transaction():
        return await timers.claim_due(conn, now, limit)


@pytest.mark.parametrize(("rearm", "due_in"), [("move_due", 30), ("keep", 10)])
async def test_re_arming_moves_the_due_time_or_keeps_it_and_always_keeps_the_arming_ids(
    pool: asyncpg.Pool, schema: str, rearm: Rearm, due_in: int,
) -> None:
    timers = await _timers(pool, schema, rearm)
    async with pool.acquire() as conn:
        await timers.arm(conn, _timer("key-1", due_in=10))
        await timers.arm(conn, _timer("key-1", due_in=30, causation_id="ev-2"))
    assert await _claim(pool, timers, T0 + timedelta(minutes=due_in - 1)) == []
    assert await _claim(pool, timers, T0 + timedelta(minutes=due_in)) == [
        _timer("key-1", due_in=due_in)]


async def test_a_claim_takes_the_earliest_due_timers_up_to_its_limit_and_none_not_yet_due(
    pool: asyncpg.Pool, schema: str,
) -> None:
    timers = await _timers(pool, schema, "keep")
    async with pool.acquire() as conn:
        for key, due_in in [("c", 3), ("a", 1), ("later", 60), ("b", 2)]:
            await timers.arm(conn, _timer(key, due_in=due_in))
    now = T0 + timedelta(minutes=5)
    assert [t.key for t in await _claim(pool, timers, now, limit=2)] == ["a", "b"]
    assert [t.key for t in await _claim(pool, timers, now)] == ["a", "b", "c"]


async def test_a_second_connection_skips_the_timers_the_first_holds_without_waiting(
    pool: asyncpg.Pool, schema: str,
) -> None:
    timers = await _timers(pool, schema, "keep")
    async with pool.acquire() as conn:
        for key, due_in in [("a", 1), ("b", 2), ("c", 3)]:
            await timers.arm(conn, _timer(key, due_in=due_in))
    now = T0 + timedelta(minutes=5)
    async with pool.acquire() as first, first.transaction():
        held = await timers.claim_due(first, now, 1)
        async with pool.acquire() as second, second.transaction():
            others = await asyncio.wait_for(timers.claim_due(second, now, 10), timeout=5)
        assert [t.key for t in held] == ["a"]
        assert [t.key for t in others] == ["b", "c"]
        await timers.disarm(first, "a")
    # The first committed its disarm: the held timer is gone, the others are claimable again.
    assert [t.key for t in await _claim(pool, timers, now)] == ["b", "c"]


async def test_disarming_removes_one_key_or_every_timer_of_a_citizen(
    pool: asyncpg.Pool, schema: str,
) -> None:
    timers = await _timers(pool, schema, "move_due")
    async with pool.acquire() as conn:
        await timers.arm(conn, _timer("one", "citizen-1"))
        await timers.arm(conn, _timer("two", "citizen-1"))
        await timers.arm(conn, _timer("three", "citizen-2"))
        await timers.arm(conn, _timer("four", "citizen-2"))
        await timers.disarm(conn, "three")
        await timers.disarm_all(conn, "citizen-1")
    assert [t.key for t in await _claim(pool, timers, T0)] == ["four"]


async def test_a_postponed_timer_falls_due_later_with_one_attempt_more(
    pool: asyncpg.Pool, schema: str,
) -> None:
    timers = await _timers(pool, schema, "keep")
    async with pool.acquire() as conn:
        await timers.arm(conn, _timer("app-1"))
        await timers.postpone(conn, "app-1", T0 + timedelta(minutes=5))
    assert await _claim(pool, timers, T0) == []
    [claimed] = await _claim(pool, timers, T0 + timedelta(minutes=5))
    assert (claimed.due_at, claimed.attempts) == (T0 + timedelta(minutes=5), 1)
