"""A throwaway schema per test, on the session's real PostgreSQL (the pool:
tests/integration/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.eventstore import migrate
from tests.support import unique


@pytest.fixture
async def schema(pool: asyncpg.Pool) -> AsyncIterator[str]:
    name = unique("kt")
    await migrate(pool, name)
    yield name
    await pool.execute(f"DROP SCHEMA {name} CASCADE")
