"""What the integration tests share beyond the session's stack (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.settings import CardDeskSettings


@pytest.fixture
async def pool(settings: CardDeskSettings, stack: object) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the session's PostgreSQL, for one test."""
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()
