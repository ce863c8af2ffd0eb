"""What ANALYZE reads of an outbox (shared/eventstore.py): a small sample, no payloads."""

from __future__ import annotations

import re

import asyncpg


async def test_analyze_samples_a_tenth_of_the_default_and_skips_the_payloads(
        pool: asyncpg.Pool, schema: str) -> None:
    await pool.execute(
        f"INSERT INTO {schema}.outbox (topic, key, value)"
        " SELECT 'loss.events', convert_to(g::text, 'UTF8'), convert_to(repeat('x', 500), 'UTF8')"
        " FROM generate_series(1, 5000) AS g")
    said: list[str] = []

    def heard(_conn: object, message: object) -> None:
        said.append(str(message))

    async with pool.acquire() as conn:
        conn.add_log_listener(heard)
        try:
            await conn.execute(f"ANALYZE VERBOSE {schema}.outbox")
        finally:
            conn.remove_log_listener(heard)
    sampled = [int(m.group(1)) for line in said
               if (m := re.search(r"(\d+) rows in sample", line))]
    # 300 rows per point of the largest target: 3,000 at 10 (all 5,000 at the default 100).
    assert sampled == [3000]
    columns = {row["attname"] for row in await pool.fetch(
        "SELECT attname FROM pg_stats WHERE schemaname = $1 AND tablename = 'outbox'", schema)}
    assert columns == {"position", "topic", "created_at", "sent_at"}
