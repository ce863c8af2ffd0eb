"""An auth schema of the test session's own on its PostgreSQL, shared by the auth tests
(citizens and captchas are unique per test, so parallel runs do not collide), and the kit the
handlers are built from."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.auth.adapters import auth_ddl
from services.auth.settings import AuthSettings
from shared.eventstore import migrate
from shared.service import Kit
from tests.support import drop_schema, unique


@pytest.fixture(scope="session")
def auth_settings(stack: object) -> AuthSettings:
    return AuthSettings()


@pytest.fixture(scope="session")
async def auth_schema(auth_settings: AuthSettings) -> AsyncIterator[str]:
    schema = unique("auth_test")
    yield schema
    await drop_schema(auth_settings, schema)


@pytest.fixture
def kit(auth_settings: AuthSettings, auth_schema: str) -> Kit[AuthSettings]:
    return Kit(auth_settings, auth_schema, auth_settings.event_topic("auth"))


@pytest.fixture
async def pool(auth_settings: AuthSettings, auth_schema: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(auth_settings.database_url, min_size=1, max_size=5)
    await migrate(pool, auth_schema, auth_ddl(auth_schema))
    yield pool
    await pool.close()
