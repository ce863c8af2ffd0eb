"""The auth schema on the session's PostgreSQL, shared by the auth tests (citizens and
captchas are unique per test, so parallel runs do not collide)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.auth.adapters import AUTH_DDL, SCHEMA
from services.auth.settings import AuthSettings
from shared.eventstore import migrate


@pytest.fixture(scope="session")
def auth_settings(stack: object) -> AuthSettings:
    return AuthSettings()


@pytest.fixture
async def pool(auth_settings: AuthSettings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(auth_settings.database_url, min_size=1, max_size=5)
    await migrate(pool, SCHEMA, AUTH_DDL)
    yield pool
    await pool.close()
