"""Per-citizen transaction locks: a service's followers and its commands never interleave on
one citizen, so a decision reads the facts and the stream as one consistent moment."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg


def lock_keys_sql(namespace: str, refs: str, *, verb: str = "SELECT") -> str:
    """The statement that takes the locks of the citizens in the text array `refs` (a
    parameter or a name) in `namespace` (likewise), in key order, so that two transactions
    that both lock several citizens cannot deadlock. `verb="PERFORM"` for PL/pgSQL."""
    return (f"{verb} count(pg_advisory_xact_lock(hashtext({namespace}), key)) FROM"
            f" (SELECT DISTINCT hashtext(ref) AS key FROM unnest({refs}) AS ref"
            "  ORDER BY key) AS keys")


async def lock_citizens(conn: asyncpg.Connection, namespace: str, refs: Iterable[str]) -> None:
    """Take the transaction-scoped advisory lock of each citizen in `namespace`."""
    await conn.execute(lock_keys_sql("$1", "$2::text[]"), namespace, sorted(set(refs)))


def citizen_namespace(schema: str) -> str:
    """The lock namespace of a service's citizens: its followers and commands share it."""
    return f"{schema}.citizen"


def locked_read_ddl(function: str, params: str, returns: str, refs: str, query: str) -> str:
    """A PL/pgSQL function `function(lock_namespace text, <params>)` that takes the locks of
    the citizens in the array expression `refs`, then returns `query`'s rows (`returns`):
    a lock and the read that must follow it in one round trip. The read is a statement of
    its own in a volatile function, so under READ COMMITTED it has a fresh snapshot and
    sees what the locks' last holders committed. Column names win over parameter names."""
    return f"""
    CREATE OR REPLACE FUNCTION {function}(lock_namespace text, {params})
    RETURNS TABLE ({returns})
    LANGUAGE plpgsql VOLATILE AS $fn$
    #variable_conflict use_column
    BEGIN
        {lock_keys_sql("lock_namespace", refs, verb="PERFORM")};
        RETURN QUERY {query};
    END
    $fn$;
    """
