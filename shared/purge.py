"""Bounded deletes of old bookkeeping rows, so that a purge never holds a long transaction."""

from __future__ import annotations

from datetime import timedelta

import asyncpg


async def delete_in_batches(pool: asyncpg.Pool | asyncpg.Connection, delete: str,
                            older_than: timedelta, batch: int) -> int:
    """Run `delete` (parameters: age, batch size) until a batch comes back short; returns
    how many rows went."""
    total = 0
    while True:
        deleted: int = await pool.fetchval(
            f"WITH gone AS ({delete} RETURNING 1) SELECT count(*) FROM gone", older_than, batch)
        total += deleted
        if deleted < batch:
            return total


async def delete_in_one_pass(pool: asyncpg.Pool, table: str, condition: str,
                             older_than: timedelta, blocks: int = 1024) -> int:
    """Delete the rows of `table` that meet `condition` (its parameter `$1`: the age; the
    table's alias `t`), one range of `blocks` pages per statement, from the first page to
    the last there was when it began; returns how many rows went.

    One pass over the table whatever it holds: each statement reads its pages once (a TID
    range scan), so rows deleted by an earlier statement are never read again, and no index
    on the age is needed for the scan to stop early. Rows written meanwhile land at the end
    (or in pages already passed) and wait for the next purge."""
    pages: int = await pool.fetchval(
        "SELECT pg_relation_size($1::regclass) / current_setting('block_size')::int", table)
    total = 0
    for first in range(0, pages, blocks):
        deleted: int = await pool.fetchval(
            f"WITH gone AS (DELETE FROM {table} AS t"
            " WHERE t.ctid >= format('(%s,0)', $2::bigint)::tid"
            f" AND t.ctid < format('(%s,0)', $3::bigint)::tid AND ({condition})"
            " RETURNING 1) SELECT count(*) FROM gone",
            older_than, first, first + blocks)
        total += deleted
    return total
