"""A throwaway schema per test module, on the session's real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.eventstore import migrate
from shared.settings import CardDeskSettings
from tests.support import unique


@pytest.fixture
async def pool(settings: CardDeskSettings, stack: object) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture
async def schema(pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = unique("kt")
    await migrate(pool, name)
    yield name
    await pool.execute(f"DROP SCHEMA {name} CASCADE")
