"""A citizen's lock and the read that must follow it, in one round trip (a PL/pgSQL function
each): the read still sees what the lock's holder wrote and committed while it waited, as a
statement of its own after the lock would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import asyncpg
import pytest

from services.loss.adapters import Facts, loss_ddl
from services.review.adapters import ReviewTables, review_ddl
from services.review.domain import LossView
from shared.chain import FollowedChains, chain_columns, chain_insert
from shared.contracts.loss import LossCancelled
from shared.eventstore import migrate
from shared.locks import citizen_namespace, lock_citizens
from tests.builders import CitizenStreams
from tests.support import unique

pytestmark = pytest.mark.integration

T = TypeVar("T")
WAIT_S = 10.0


@pytest.fixture
async def schema(pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = unique("lr")
    await migrate(pool, name, loss_ddl(name) + review_ddl(name))
    yield name
    await pool.execute(f"DROP SCHEMA {name} CASCADE")


async def read_behind_the_lock(pool: asyncpg.Pool, namespace: str, ref: str,
                               write: Callable[[asyncpg.Connection], Awaitable[object]],
                               read: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`read` started while another transaction holds `ref`'s lock and has written nothing
    yet; that transaction then runs `write` and commits. What `read` returned."""
    async with pool.acquire() as holder, pool.acquire() as reader:
        transaction = holder.transaction()
        await transaction.start()
        try:
            await lock_citizens(holder, namespace, [ref])

            async def locked_read() -> T:
                async with reader.transaction():
                    return await read(reader)

            waiting = asyncio.create_task(locked_read())
            await asyncio.sleep(0.2)
            assert not waiting.done(), "the read did not wait for the citizen's lock"
            await write(holder)
        except BaseException:
            await transaction.rollback()
            raise
        await transaction.commit()
        return await asyncio.wait_for(waiting, WAIT_S)


async def test_a_followers_chain_read_sees_the_chain_row_committed_while_it_waited(
    pool: asyncpg.Pool, schema: str,
) -> None:
    streams = CitizenStreams()
    first = streams.append("s-1", LossCancelled(loss_id="l"))
    second = streams.append("s-1", LossCancelled(loss_id="l"))
    view = await read_behind_the_lock(
        pool, citizen_namespace(schema), streams.citizen_ref,
        lambda conn: conn.execute(chain_insert(schema, 1), *chain_columns([first])),
        lambda conn: FollowedChains(schema, timedelta(hours=24)).locked_view(
            conn, citizen_namespace(schema), [second]))
    assert view.known == {("s-1", 1): first.hash}
    assert view.heads == {"s-1": 1}


async def test_a_loss_commands_facts_include_the_card_committed_while_it_waited(
    pool: asyncpg.Pool, schema: str,
) -> None:
    facts = await read_behind_the_lock(
        pool, citizen_namespace(schema), "ref-1",
        lambda conn: conn.execute(f"INSERT INTO {schema}.cards (citizen_ref, card_no)"
                                  " VALUES ('ref-1', 'c-new')"),
        lambda conn: Facts.locked(conn, schema, citizen_namespace(schema), ["ref-1"]))
    assert (facts.card_no("ref-1"), facts.application_status("ref-1")) == ("c-new", "none")


async def test_a_review_commands_loss_case_is_the_one_committed_while_it_waited(
    pool: asyncpg.Pool, schema: str,
) -> None:
    case = await read_behind_the_lock(
        pool, citizen_namespace(schema), "ref-2",
        lambda conn: conn.execute(f"INSERT INTO {schema}.losses"
                                  " (citizen_ref, loss_id, kind, card_no, in_force)"
                                  " VALUES ('ref-2', 'l-2', 'formal', 'c-2', true)"),
        lambda conn: ReviewTables(schema).locked_loss_of(conn, citizen_namespace(schema),
                                                         "ref-2"))
    assert case == LossView("l-2", "formal", "c-2", True)
