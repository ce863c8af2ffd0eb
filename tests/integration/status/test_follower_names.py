"""Each follower of the status service keeps its processed rows under its own name
(`status:<topic>`); rows a schema kept under the name the four followers once shared move to
their follower's at start-up, so that an upgrade applies no event twice."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.status.adapters import FORMER_FOLLOWER, status_ddl, status_follower
from shared.eventstore import migrate
from shared.settings import CardDeskSettings
from tests.support import drop_schema, unique

pytestmark = pytest.mark.integration


@pytest.fixture
async def pool(settings: CardDeskSettings) -> AsyncIterator[tuple[asyncpg.Pool, str]]:
    schema = unique("names")
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        await migrate(pool, schema, status_ddl(schema))
        yield pool, schema
    finally:
        await pool.close()
        await drop_schema(settings, schema)


async def test_rows_of_the_former_shared_name_move_to_their_followers_at_start_up(
    pool: tuple[asyncpg.Pool, str],
) -> None:
    db, schema = pool
    events = {topic: str(uuid.uuid4()) for topic in ("auth.events", "loss.events")}
    orphan, other = str(uuid.uuid4()), str(uuid.uuid4())
    await db.executemany(
        f"INSERT INTO {schema}.card_timeline VALUES ('cr', $1, 'T', $2, 'd', $3, 's', 1)",
        [(event_id, datetime.now(UTC), topic) for topic, event_id in events.items()])
    await db.executemany(
        f"INSERT INTO {schema}.processed (consumer, message_id) VALUES ($1, $2)",
        [*((FORMER_FOLLOWER, event_id) for event_id in (*events.values(), orphan)),
         ("another", other)])

    await migrate(db, schema, status_ddl(schema))  # the next start
    await migrate(db, schema, status_ddl(schema))  # and the one after: nothing left to move

    rows = {(r["consumer"], r["message_id"])
            for r in await db.fetch(f"SELECT consumer, message_id FROM {schema}.processed")}
    assert rows == {*((status_follower(topic), event_id) for topic, event_id in events.items()),
                    (FORMER_FOLLOWER, orphan),  # no timeline row says its topic: left be
                    ("another", other)}
