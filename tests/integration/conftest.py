"""What the integration tests share beyond the session's stack (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.runtime import keep_session
from shared.settings import CardDeskSettings


@pytest.fixture
async def pool(settings: CardDeskSettings, stack: object) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session's PostgreSQL, for one test."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
async def counted(settings: CardDeskSettings,
                  stack: object) -> AsyncIterator[tuple[asyncpg.Pool, list[str]]]:
    """A pool of one connection that notes every statement it sends (`BEGIN` and `COMMIT`
    too); asyncpg sends one statement per round trip."""
    sent: list[str] = []

    async def init(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda query: sent.append(query.query))

    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1, init=init,
                                     reset=keep_session)
    yield pool, sent
    await pool.close()
