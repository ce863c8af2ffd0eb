"""Followers check that each event continues its stream as the events before it did: the
hash of an event covers its own envelope only, so a forged event can be self-consistent;
its place in the chain it claims cannot be."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from shared.envelope import GENESIS_HASH, EventEnvelope
from shared.locks import locked_read_ddl
from shared.purge import delete_in_one_pass


class ChainBreak(Exception):  # noqa: N818 - a verdict on one event, as `Rejected` is
    """The event does not continue its stream as recorded: it forks or skips."""

    def __init__(self, envelope: EventEnvelope, reason: str) -> None:
        super().__init__(f"{envelope.stream_id} v{envelope.version}: {reason}")
        self.envelope = envelope


@dataclass(slots=True)
class ChainView:
    """What `followed_chain` holds about a batch's events: the hash recorded at each of
    their versions and the one before, which of those rows are settled (taken longer ago
    than the settling age), and the last version recorded of each of their streams (a
    stream without one was never seen)."""

    known: dict[tuple[str, int], str] = field(default_factory=dict)
    settled: set[tuple[str, int]] = field(default_factory=set)
    heads: dict[str, int] = field(default_factory=dict)
    # The last (version, hash) of each of the service's own streams asked for that has one.
    own_heads: dict[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdicts:
    """The events of a batch that continue their chains (in order), the others, and the
    settled: redeliveries of events taken long ago, which are skipped."""

    taken: list[EventEnvelope]
    breaks: list[ChainBreak]
    settled: list[EventEnvelope] = field(default_factory=list)


class FollowedChains:
    """`followed_chain`: (stream_id, version, hash) of the events a follower took as authentic.

    An event is taken when its (stream, version) is recorded with the same hash (a
    redelivery), or when it chains onto the recorded previous version (or genesis at
    version 1). A stream never seen before is taken from wherever it starts (a follower that
    starts mid-history); from then on, forks and gaps are breaks.

    The table is bounded: `purge` deletes rows older than `retention`, but each stream's
    last. A row older than half the retention is settled: a redelivery of its event, or of
    any event at or behind the stream's last recorded version whose row is gone, is skipped
    (`Verdicts.settled`) without its `processed` row being looked at, since those are purged
    as old (`shared.idempotency.ProcessedMessages.purge`).

    `view` reads, `judge` decides (no I/O), `chain_insert` records in the caller's statement;
    `take` is the three in a row."""

    def __init__(self, schema: str, retention: timedelta) -> None:
        self.schema = schema
        self.retention = retention
        self.settled_after = retention / 2

    async def view(self, conn: asyncpg.Connection,
                   envelopes: Sequence[EventEnvelope]) -> ChainView:
        """One statement: the recorded rows at each event's version and the one before (an
        index range each), then each stream's last version (`view_sql`)."""
        return view_of(await conn.fetch(
            view_sql(self.schema, "$1::text[]", "$2::int[]", "$3::text[]", "$4::interval"),
            *view_arguments(envelopes), self.settled_after))

    async def locked_view(self, conn: asyncpg.Connection, namespace: str,
                          envelopes: Sequence[EventEnvelope],
                          own: Collection[str] = ()) -> ChainView:
        """The citizens' locks in `namespace` (`shared.locks`), then `view` and the heads
        of the service's `own` streams (`ChainView.own_heads`), in one round trip: the
        schema's `locked_chain_view` function reads after the locks are taken, in a snapshot
        of its own, so it sees what their last holders committed."""
        return view_of(await conn.fetch(
            f"SELECT * FROM {self.schema}.locked_chain_view($1, $2, $3, $4, $5, $6, $7)",
            namespace, sorted({e.citizen_ref for e in envelopes}),
            *view_arguments(envelopes), self.settled_after, sorted(set(own))))

    async def take(self, conn: asyncpg.Connection,
                   envelopes: Sequence[EventEnvelope]) -> Verdicts:
        """Record the events that continue their chains (in order); the verdicts."""
        if not envelopes:
            return Verdicts([], [])
        verdicts = judge(envelopes, await self.view(conn, envelopes))
        if verdicts.taken:
            await conn.execute(chain_insert(self.schema, 1), *chain_columns(verdicts.taken))
        return verdicts

    async def purge(self, pool: asyncpg.Pool) -> int:
        """Delete rows recorded longer ago than the retention, but each stream's last, in one
        pass of bounded statements; returns how many went."""
        return await delete_in_one_pass(
            pool, f"{self.schema}.followed_chain",
            "t.recorded_at < now() - $1::interval"
            f" AND EXISTS (SELECT FROM {self.schema}.followed_chain n"
            "  WHERE n.stream_id = t.stream_id AND n.version > t.version)",
            self.retention)


def view_sql(schema: str, ids: str, versions: str, streams: str, settled_after: str,
             own: str | None = None) -> str:
    """`view`'s query over the arrays `ids` and `versions` (each event's stream and version)
    and `streams` (the distinct streams), and the interval `settled_after`, given as
    parameters or names: the rows at each version and the one before (with whether each is
    settled), then each stream's last version (without a hash); with `own` (an array of the
    service's own stream ids), then each of those streams' last event (with its hash, and
    neither settled nor not: `view_of` tells the three kinds of row apart so)."""
    query = ("SELECT c.stream_id, c.version, c.hash,"
             f"  c.recorded_at < now() - {settled_after} AS settled"
             f" FROM unnest({ids}, {versions}) AS w(stream_id, version)"
             f" JOIN {schema}.followed_chain c ON c.stream_id = w.stream_id"
             "  AND c.version BETWEEN w.version - 1 AND w.version"
             " UNION ALL"
             " SELECT s.stream_id, h.version, NULL, NULL FROM unnest("
             f"{streams}) AS s(stream_id)"
             f" CROSS JOIN LATERAL (SELECT c.version FROM {schema}.followed_chain c"
             "  WHERE c.stream_id = s.stream_id ORDER BY c.version DESC LIMIT 1) AS h")
    if own is None:
        return query
    return (query + " UNION ALL"
            f" SELECT o.stream_id, e.version, e.hash, NULL FROM unnest({own}) AS o(stream_id)"
            f" CROSS JOIN LATERAL (SELECT e.version, e.hash FROM {schema}.events e"
            "  WHERE e.stream_id = o.stream_id ORDER BY e.version DESC LIMIT 1) AS e")


def chain_ddl(schema: str) -> str:
    """`followed_chain`, and the function that takes the citizens' locks and then reads it
    (`FollowedChains.locked_view`, `shared.locks.locked_read_ddl`)."""
    return f"""
    -- The events a follower has taken as authentic, so the next one must chain onto it;
    -- rows older than the retention are purged, but each stream's last.
    CREATE TABLE IF NOT EXISTS {schema}.followed_chain (
        stream_id   text        NOT NULL,
        version     integer     NOT NULL,
        hash        text        NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream_id, version)
    );
    ALTER TABLE {schema}.followed_chain
        ADD COLUMN IF NOT EXISTS recorded_at timestamptz NOT NULL DEFAULT now();
    -- Before the settled rows, the function returned three columns; before the own
    -- streams' heads, it took one argument fewer.
    DROP FUNCTION IF EXISTS {schema}.locked_chain_view(text, text[], text[], integer[], text[]);
    DROP FUNCTION IF EXISTS
        {schema}.locked_chain_view(text, text[], text[], integer[], text[], interval);
    """ + locked_read_ddl(
        f"{schema}.locked_chain_view",
        "refs text[], ids text[], versions integer[], streams text[], settled_after interval,"
        " own text[]",
        "stream_id text, version integer, hash text, settled boolean", "refs",
        view_sql(schema, "ids", "versions", "streams", "settled_after", "own"))


def view_arguments(envelopes: Sequence[EventEnvelope],
                   ) -> tuple[list[str], list[int], list[str]]:
    """`view_sql`'s arrays for `envelopes`: each event's stream and version, and the
    distinct streams in order."""
    return ([e.stream_id for e in envelopes], [e.version for e in envelopes],
            sorted({e.stream_id for e in envelopes}))


def view_of(rows: Iterable[Sequence[Any]]) -> ChainView:
    """The view `view_sql`'s rows (stream id, version, hash, settled) make: a chain row has
    a hash and is settled or not, a chain head has no hash, an own stream's head has a hash
    and no settled."""
    view = ChainView()
    for stream_id, version, hash_, settled in rows:
        if hash_ is None:
            view.heads[stream_id] = version
        elif settled is None:
            view.own_heads[stream_id] = (version, hash_)
        else:
            view.known[(stream_id, version)] = hash_
            if settled:
                view.settled.add((stream_id, version))
    return view


def chain_insert(schema: str, first: int) -> str:
    """The INSERT of taken events' chain rows from three arrays (stream ids, versions,
    hashes) at parameters `$first`.., to run alone or as a CTE of the caller's statement."""
    return (f"INSERT INTO {schema}.followed_chain (stream_id, version, hash)"
            f" SELECT * FROM unnest(${first}::text[], ${first + 1}::int[], ${first + 2}::text[])"
            " ON CONFLICT DO NOTHING")


def chain_columns(taken: Sequence[EventEnvelope]) -> tuple[list[str], list[int], list[str]]:
    """The arguments of `chain_insert` for `taken`."""
    return [e.stream_id for e in taken], [e.version for e in taken], [e.hash for e in taken]


SETTLED = "settled"
"""`_verdict`'s word for a redelivery of an event taken long ago: skipped."""


def judge(envelopes: Sequence[EventEnvelope], view: ChainView) -> Verdicts:
    """Each event in order against what is recorded and what the batch took before it
    (`view` grows with the events taken)."""
    verdicts = Verdicts([], [])
    for envelope in envelopes:
        reason = _verdict(envelope, view)
        if reason is SETTLED:
            verdicts.settled.append(envelope)
        elif reason is not None:
            verdicts.breaks.append(ChainBreak(envelope, reason))
        else:
            view.known[(envelope.stream_id, envelope.version)] = envelope.hash
            view.heads[envelope.stream_id] = max(envelope.version,
                                                 view.heads.get(envelope.stream_id, 0))
            verdicts.taken.append(envelope)
    return verdicts


def _verdict(envelope: EventEnvelope, view: ChainView) -> str | None:
    """None when the event continues its chain (or is a recent redelivery); `SETTLED` for a
    redelivery of one taken long ago (its row settled, or purged behind the stream's last);
    else why it does not."""
    key = (envelope.stream_id, envelope.version)
    recorded = view.known.get(key)
    if recorded is not None:
        if recorded != envelope.hash:
            return "another event holds this version"
        return SETTLED if key in view.settled else None
    head = view.heads.get(envelope.stream_id)
    if head is not None and envelope.version <= head:
        return SETTLED
    if envelope.version == 1:
        return None if envelope.prev_hash == GENESIS_HASH else "version 1 must start at genesis"
    previous = view.known.get((envelope.stream_id, envelope.version - 1))
    if previous is not None:
        return None if envelope.prev_hash == previous else "prev_hash is not the previous hash"
    return "the previous version was never seen" if head is not None else None
