"""A throwaway schema per test, on the session's real PostgreSQL (the pool:
tests/integration/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.eventstore import migrate
from shared.runtime import keep_session
from shared.settings import CardDeskSettings
from tests.support import unique


@pytest.fixture
async def schema(pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = unique("kt")
    await migrate(pool, name)
    yield name
    await pool.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
async def counted(settings: CardDeskSettings) -> AsyncIterator[tuple[asyncpg.Pool, list[str]]]:
    """A pool of one connection that notes every statement it sends (`BEGIN` and `COMMIT`
    too); asyncpg sends one statement per round trip."""
    sent: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda query: sent.append(query.query))

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1, init=init,
                                     reset=keep_session)
    yield pool, sent
    await pool.close()
