"""Bounded deletes of old bookkeeping rows, so that a purge never holds a long transaction."""

from __future__ import annotations

from datetime import timedelta

import asyncpg


async def delete_in_batches(pool: asyncpg.Pool, delete: str, older_than: timedelta,
                            batch: int) -> int:
    """Run `delete` (parameters: age, batch size) until a batch comes back short; returns
    how many rows went."""
    total = 0
    while True:
        deleted: int = await pool.fetchval(
            f"WITH gone AS ({delete} RETURNING 1) SELECT count(*) FROM gone", older_than, batch)
        total += deleted
        if deleted < batch:
            return total
