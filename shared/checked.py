"""A follower's batch in two statements: read without a lock, write in one checked call.

The locked way (`shared.consumer.EventConsumer`) costs a batch `BEGIN`, the locked chain
view, the chain and processed records, the effects' statements and `COMMIT`. A follower
whose effect is a fold of rows keyed by citizen (the status projection's `card_status`)
can instead

1. read in one statement, without a lock, what the locked way reads (the chain view, which
   of the events its consumers recorded as processed) and the rows its fold starts from,
   each with its row version (`xmin`: every write of a row makes a new one);
2. judge and fold, with no I/O;
3. write in one call of a PL/pgSQL function (`checked_apply_ddl`) that takes the citizens'
   locks, checks that every row read is still that version (or still absent) and every
   stream's last chain row still the one read, and only then records the chain rows, the
   processed rows and the writer's rows.

A single statement is its own transaction, so there is no `BEGIN` or `COMMIT`. Every writer
of those rows holds the citizens' locks until it commits, so what the check reads after
taking them is what the last holder committed; when it differs from what step 1 read
(another instance of the follower, a write between the read and the lock, a rebuild's swap),
the function changes nothing and returns false, and the batch goes the locked way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

import asyncpg

from shared.chain import (
    ChainView,
    chain_columns,
    chain_insert,
    view_arguments,
    view_of,
    view_sql,
)
from shared.envelope import EventEnvelope
from shared.locks import lock_keys_sql

# Where a checked function's bookkeeping arguments end: its own start at `$(N + 1)`.
BOOKKEEPING_ARGUMENTS = 10


@dataclass(slots=True)
class CheckedRead:
    """What one unlocked read of a batch's citizens (`refs`) and streams found: the chain
    view, the (consumer, message id) pairs already processed, and the writer's rows by
    citizen as JSON with their versions."""

    refs: list[str]
    streams: list[str]
    view: ChainView = field(default_factory=ChainView)
    processed: set[tuple[str, str]] = field(default_factory=set)
    rows: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    heads: dict[str, int] = field(default_factory=dict)  # as read, before judging grows them


@dataclass(frozen=True, slots=True)
class Bookkeeping:
    """What a checked write records besides the writer's rows, and what it checks first."""

    refs: list[str]
    versions: list[str | None]  # each ref's row version as read; None: there was no row
    streams: list[str]
    heads: list[int]  # each stream's last chain version as read; 0: none
    processed: list[tuple[str, str]]  # (consumer, message id) of the events applied now
    chained: list[EventEnvelope]  # the events whose chain rows are recorded

    @classmethod
    def of(cls, read: CheckedRead, processed: list[tuple[str, str]],
           chained: list[EventEnvelope]) -> Bookkeeping:
        """What to check: every citizen and stream of the read, as it found them."""
        return cls(read.refs, [read.versions.get(ref) for ref in read.refs], read.streams,
                   [read.heads.get(stream, 0) for stream in read.streams], processed, chained)

    def arguments(self, namespace: str) -> tuple[Any, ...]:
        """The checked function's first `BOOKKEEPING_ARGUMENTS` arguments."""
        return (namespace, self.refs, self.versions, self.streams, self.heads,
                [consumer for consumer, _ in self.processed],
                [message_id for _, message_id in self.processed],
                *chain_columns(self.chained))


class CheckedWriter(Protocol):
    """The effect of one or more followers of a schema (one per topic), as rows keyed by
    `citizen_ref` in `table`, written by the schema's checked function."""

    schema: str
    table: str

    async def apply_checked(self, conn: asyncpg.Connection, namespace: str,
                            read: CheckedRead,
                            batches: Sequence[tuple[str, Sequence[EventEnvelope]]],
                            bookkeeping: Bookkeeping) -> bool:
        """Fold each topic's new events (in order) onto `read.rows` and write them with
        `bookkeeping` in one call; False when the check found a row or head moved."""
        ...


@dataclass(frozen=True, slots=True)
class CheckedFollow:
    """One follower's part in a checked writer: the topic (the contract's name) it folds."""

    writer: CheckedWriter
    topic: str


def read_sql(schema: str, table: str) -> str:
    """The unlocked read over $1 ids, $2 versions, $3 streams (`view_sql`'s arrays), $4 the
    settling age, $5/$6 (consumer, message id) pairs, $7 the citizens."""
    return ("SELECT 'chain' AS kind, v.stream_id AS key, v.version, v.hash AS detail,"
            "  v.settled, NULL::jsonb AS body"
            f" FROM ({view_sql(schema, '$1::text[]', '$2::int[]', '$3::text[]', '$4::interval')})"
            "  AS v"
            " UNION ALL SELECT 'processed', p.message_id, NULL, p.consumer, NULL, NULL"
            f" FROM {schema}.processed p WHERE (p.consumer, p.message_id) IN"
            "  (SELECT * FROM unnest($5::text[], $6::text[]))"
            " UNION ALL SELECT 'row', r.citizen_ref, NULL, r.xmin::text, NULL, to_jsonb(r)"
            f" FROM {schema}.{table} r WHERE r.citizen_ref = ANY($7::text[])")


async def read(conn: asyncpg.Connection, writer: CheckedWriter, settled_after: timedelta,
               envelopes: Sequence[EventEnvelope],
               consumed: Iterable[tuple[str, str]]) -> CheckedRead:
    """One statement: what the batch of `envelopes` needs, `consumed` being each event's
    (consumer, message id)."""
    pairs = list(consumed)
    ids, versions, streams = view_arguments(envelopes)
    found = CheckedRead(sorted({e.citizen_ref for e in envelopes}), streams)
    records = await conn.fetch(
        read_sql(writer.schema, writer.table), ids, versions, streams, settled_after,
        [consumer for consumer, _ in pairs], [message_id for _, message_id in pairs],
        found.refs)
    chain: list[tuple[str, int, str | None, bool | None]] = []
    for kind, key, version, detail, settled, body in records:
        if kind == "chain":
            chain.append((key, version, detail, settled))
        elif kind == "processed":
            found.processed.add((detail, key))
        else:
            found.rows[key] = body
            found.versions[key] = detail
    found.view = view_of(chain)
    found.heads = dict(found.view.heads)
    return found


def checked_apply_ddl(function: str, schema: str, table: str, params: str,
                      writes: str) -> str:
    """The checked function `function(<bookkeeping>, <params>) RETURNS boolean`: the
    citizens' locks, the check, the processed and chain rows, then `writes` (statements
    that read `params` as `$11`.., `BOOKKEEPING_ARGUMENTS` after the first). A processed row
    found recorded raises `serialization_failure`, which undoes the statement: only a
    writer that broke the locks' rule could have put it there."""
    return f"""
    CREATE OR REPLACE FUNCTION {function}(
        lock_namespace text, refs text[], versions text[], streams text[], heads integer[],
        consumers text[], message_ids text[],
        chain_ids text[], chain_versions integer[], chain_hashes text[], {params})
    RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $fn$
    #variable_conflict use_column
    DECLARE
        recorded integer;
    BEGIN
        {lock_keys_sql("lock_namespace", "refs", verb="PERFORM")};
        IF EXISTS (SELECT FROM unnest(refs, versions) AS w(ref, version)
                   LEFT JOIN {schema}.{table} r ON r.citizen_ref = w.ref
                   WHERE r.xmin::text IS DISTINCT FROM w.version) THEN
            RETURN false;
        END IF;
        IF EXISTS (SELECT FROM unnest(streams, heads) AS s(stream_id, head)
                   WHERE coalesce((SELECT c.version FROM {schema}.followed_chain c
                                   WHERE c.stream_id = s.stream_id
                                   ORDER BY c.version DESC LIMIT 1), 0) <> s.head) THEN
            RETURN false;
        END IF;
        INSERT INTO {schema}.processed (consumer, message_id)
            SELECT * FROM unnest(consumers, message_ids) ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS recorded = ROW_COUNT;
        IF recorded <> cardinality(message_ids) THEN
            RAISE EXCEPTION 'a message of the batch was recorded as processed meanwhile'
                USING ERRCODE = 'serialization_failure';
        END IF;
        {chain_insert(schema, 8)};
        {writes};
        RETURN true;
    END
    $fn$;
    """
