"""Per-citizen transaction locks: a service's followers and its commands never interleave on
one citizen, so a decision reads the facts and the stream as one consistent moment."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg


async def lock_citizens(conn: asyncpg.Connection, namespace: str, refs: Iterable[str]) -> None:
    """Take the transaction-scoped advisory lock of each citizen in `namespace`, in key
    order, so that two transactions that both lock several citizens cannot deadlock."""
    await conn.execute(
        "SELECT count(pg_advisory_xact_lock(hashtext($1), key)) FROM"
        " (SELECT DISTINCT hashtext(ref) AS key FROM unnest($2::text[]) AS ref"
        "  ORDER BY key) AS keys",
        namespace, sorted(set(refs)))


def citizen_namespace(schema: str) -> str:
    """The lock namespace of a service's citizens: its followers and commands share it."""
    return f"{schema}.citizen"
