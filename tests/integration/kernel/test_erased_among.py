"""Which citizens a service has erased, for a whole follower batch in one statement (or
none of its own: the heads come with the locked chain view)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.loss.domain import DECIDER
from shared.application import Streams
from shared.chain import FollowedChains
from shared.contracts.common import SubjectErased
from shared.contracts.loss import LossCancelled
from shared.events import DomainEvent, EventMeta
from shared.locks import citizen_namespace
from tests.builders import CitizenStreams

pytestmark = pytest.mark.integration

CITIZENS = {"gone", "kept", "never"}


async def record(pool: asyncpg.Pool, streams: Streams[Any, Any, Any, Any], ref: str,
                 event: DomainEvent) -> None:
    meta = EventMeta(citizen_ref=ref, occurred_at=datetime.now(UTC), correlation_id="c",
                     causation_id="c")
    async with pool.acquire() as conn, conn.transaction():
        await streams.apply(conn, lambda _state: [event], meta)


async def gone_and_kept(pool: asyncpg.Pool, schema: str) -> Streams[Any, Any, Any, Any]:
    """Loss's streams in `schema`: "gone" erased, "kept" with a cancellation, both states
    cached."""
    streams = Streams(DECIDER, schema, "loss.events")
    await record(pool, streams, "gone", SubjectErased(reason="asked"))
    await record(pool, streams, "kept", LossCancelled(loss_id="l"))
    return streams


async def test_the_erased_are_named_from_one_read_of_every_head_when_the_cache_holds_them(
    counted: tuple[asyncpg.Pool, list[str]], schema: str,
) -> None:
    pool, sent = counted
    streams = await gone_and_kept(pool, schema)

    sent.clear()
    async with pool.acquire() as conn:
        assert await streams.erased_among(conn, CITIZENS) == {"gone"}
    assert len(sent) == 1, sent  # the heads; both states were cached at those heads

    cold = Streams(DECIDER, schema, "loss.events")  # another process: nothing cached
    async with pool.acquire() as conn:
        assert await cold.erased_among(conn, CITIZENS) == {"gone"}


async def test_an_erasure_another_instance_recorded_is_seen_past_the_cached_state(
    pool: asyncpg.Pool, schema: str,
) -> None:
    here, there = (Streams(DECIDER, schema, "loss.events") for _ in range(2))
    await record(pool, here, "kept", LossCancelled(loss_id="l"))  # cached here, not erased
    await record(pool, there, "kept", SubjectErased(reason="asked"))

    async with pool.acquire() as conn:
        assert await here.erased_among(conn, CITIZENS) == {"kept"}


async def test_the_heads_come_with_the_locked_chain_view_and_the_check_reads_nothing_more(
    counted: tuple[asyncpg.Pool, list[str]], schema: str,
) -> None:
    pool, sent = counted
    streams = await gone_and_kept(pool, schema)
    followed = [CitizenStreams(ref).append(f"card-{ref}", LossCancelled(loss_id="x"))
                for ref in sorted(CITIZENS)]

    own = [streams.stream_id(ref) for ref in CITIZENS]
    async with pool.acquire() as conn:
        recorded = await streams.store(conn).heads(own)

    sent.clear()
    async with pool.acquire() as conn, conn.transaction():
        view = await FollowedChains(schema, timedelta(days=1)).locked_view(
            conn, citizen_namespace(schema), followed, own)
        assert await streams.erased_among(conn, CITIZENS, view.own_heads) == {"gone"}
    # BEGIN, the locked view, COMMIT: the states were cached at those heads, so the check
    # read nothing of its own.
    assert len(sent) == 3, sent
    assert view.own_heads == {s: head for s, head in recorded.items() if head[0] > 0}
    assert len(view.own_heads) == 2 and view.heads == {} and view.known == {}
