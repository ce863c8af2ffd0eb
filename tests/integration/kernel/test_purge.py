"""`shared.purge.delete_in_one_pass`: one pass over a table, a range of pages per statement."""

from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from shared.purge import delete_in_one_pass

pytestmark = pytest.mark.integration


async def test_one_pass_deletes_every_old_row_on_every_page_and_nothing_else(
    pool: asyncpg.Pool, schema: str,
) -> None:
    table = f"{schema}.aged"
    await pool.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, at timestamptz NOT NULL,"
                       " filler text NOT NULL)")
    # Old and young rows interleaved over some forty pages.
    await pool.execute(
        f"INSERT INTO {table} SELECT g, now() - CASE WHEN g % 3 = 0 THEN interval '2 days'"
        " ELSE interval '1 minute' END, repeat('x', 100) FROM generate_series(1, 3000) g")
    pages = await pool.fetchval(
        f"SELECT pg_relation_size('{table}') / current_setting('block_size')::int")
    assert pages > 10

    deleted = await delete_in_one_pass(pool, table, "t.at < now() - $1::interval",
                                       timedelta(days=1), blocks=3)

    assert deleted == 1000
    assert await pool.fetchval(f"SELECT count(*) FROM {table} WHERE n % 3 = 0") == 0
    assert await pool.fetchval(f"SELECT count(*) FROM {table}") == 2000
    assert await delete_in_one_pass(pool, table, "t.at < now() - $1::interval",
                                    timedelta(days=1), blocks=3) == 0
