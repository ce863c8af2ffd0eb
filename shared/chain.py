"""Followers check that each event continues its stream as the events before it did: the
hash of an event covers its own envelope only, so a forged event can be self-consistent;
its place in the chain it claims cannot be."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg

from shared.envelope import GENESIS_HASH, EventEnvelope
from shared.locks import locked_read_ddl


class ChainBreak(Exception):  # noqa: N818 - a verdict on one event, as `Rejected` is
    """The event does not continue its stream as recorded: it forks or skips."""

    def __init__(self, envelope: EventEnvelope, reason: str) -> None:
        super().__init__(f"{envelope.stream_id} v{envelope.version}: {reason}")
        self.envelope = envelope


@dataclass(slots=True)
class ChainView:
    """What `followed_chain` holds about a batch's events: the hash recorded at each of
    their versions and the one before, and which of their streams were ever seen."""

    known: dict[tuple[str, int], str] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Verdicts:
    """The events of a batch that continue their chains (in order), and the others."""

    taken: list[EventEnvelope]
    breaks: list[ChainBreak]


class FollowedChains:
    """`followed_chain`: (stream_id, version, hash) of every event a follower took as authentic.

    An event is taken when its (stream, version) is recorded with the same hash (a
    redelivery), or when it chains onto the recorded previous version (or genesis at
    version 1). A stream never seen before is taken from wherever it starts (a follower that
    starts mid-history); from then on, forks and gaps are breaks.

    `view` reads, `judge` decides (no I/O), `chain_insert` records in the caller's statement;
    `take` is the three in a row."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def view(self, conn: asyncpg.Connection,
                   envelopes: Sequence[EventEnvelope]) -> ChainView:
        """One statement: the recorded rows at each event's version and the one before (an
        index range each), then one row without a version for every stream seen at all."""
        return _view_of(await conn.fetch(
            view_sql(self.schema, "$1::text[]", "$2::int[]", "$3::text[]"),
            *_view_arguments(envelopes)))

    async def locked_view(self, conn: asyncpg.Connection, namespace: str,
                          envelopes: Sequence[EventEnvelope]) -> ChainView:
        """The citizens' locks in `namespace` (`shared.locks`), then `view`, in one round
        trip: the schema's `locked_chain_view` function reads after the locks are taken, in
        a snapshot of its own, so it sees what their last holders committed."""
        return _view_of(await conn.fetch(
            f"SELECT * FROM {self.schema}.locked_chain_view($1, $2, $3, $4, $5)",
            namespace, sorted({e.citizen_ref for e in envelopes}),
            *_view_arguments(envelopes)))

    async def take(self, conn: asyncpg.Connection,
                   envelopes: Sequence[EventEnvelope]) -> list[ChainBreak]:
        """Record the events that continue their chains (in order); the others' breaks."""
        if not envelopes:
            return []
        verdicts = judge(envelopes, await self.view(conn, envelopes))
        if verdicts.taken:
            await conn.execute(chain_insert(self.schema, 1), *chain_columns(verdicts.taken))
        return verdicts.breaks


def view_sql(schema: str, ids: str, versions: str, streams: str) -> str:
    """`view`'s query over the arrays `ids` and `versions` (each event's stream and version)
    and `streams` (the distinct streams), given as parameters or names."""
    return ("SELECT c.stream_id, c.version, c.hash"
            f" FROM unnest({ids}, {versions}) AS w(stream_id, version)"
            f" JOIN {schema}.followed_chain c ON c.stream_id = w.stream_id"
            "  AND c.version BETWEEN w.version - 1 AND w.version"
            " UNION ALL"
            f" SELECT s.stream_id, NULL, NULL FROM unnest({streams}) AS s(stream_id)"
            f" WHERE EXISTS (SELECT FROM {schema}.followed_chain c"
            "  WHERE c.stream_id = s.stream_id)")


def chain_ddl(schema: str) -> str:
    """`followed_chain`, and the function that takes the citizens' locks and then reads it
    (`FollowedChains.locked_view`, `shared.locks.locked_read_ddl`)."""
    return f"""
    -- Every event a follower has taken as authentic, so the next one must chain onto it.
    CREATE TABLE IF NOT EXISTS {schema}.followed_chain (
        stream_id text    NOT NULL,
        version   integer NOT NULL,
        hash      text    NOT NULL,
        PRIMARY KEY (stream_id, version)
    );
    """ + locked_read_ddl(f"{schema}.locked_chain_view",
                          "refs text[], ids text[], versions integer[], streams text[]",
                          "stream_id text, version integer, hash text", "refs",
                          view_sql(schema, "ids", "versions", "streams"))


def _view_arguments(envelopes: Sequence[EventEnvelope],
                    ) -> tuple[list[str], list[int], list[str]]:
    return ([e.stream_id for e in envelopes], [e.version for e in envelopes],
            sorted({e.stream_id for e in envelopes}))


def _view_of(rows: Sequence[asyncpg.Record]) -> ChainView:
    view = ChainView()
    for row in rows:
        view.seen.add(row["stream_id"])
        if row["version"] is not None:
            view.known[(row["stream_id"], row["version"])] = row["hash"]
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


def judge(envelopes: Sequence[EventEnvelope], view: ChainView) -> Verdicts:
    """Each event in order against what is recorded and what the batch took before it
    (`view` grows with the events taken)."""
    taken: list[EventEnvelope] = []
    breaks: list[ChainBreak] = []
    for envelope in envelopes:
        reason = _verdict(envelope, view.known, envelope.stream_id in view.seen)
        if reason is not None:
            breaks.append(ChainBreak(envelope, reason))
            continue
        view.known[(envelope.stream_id, envelope.version)] = envelope.hash
        view.seen.add(envelope.stream_id)
        taken.append(envelope)
    return Verdicts(taken, breaks)


def _verdict(envelope: EventEnvelope, known: dict[tuple[str, int], str],
             stream_seen: bool) -> str | None:
    """None when the event continues its chain; else why it does not."""
    recorded = known.get((envelope.stream_id, envelope.version))
    if recorded is not None:
        return None if recorded == envelope.hash else "another event holds this version"
    if envelope.version == 1:
        return None if envelope.prev_hash == GENESIS_HASH else "version 1 must start at genesis"
    previous = known.get((envelope.stream_id, envelope.version - 1))
    if previous is not None:
        return None if envelope.prev_hash == previous else "prev_hash is not the previous hash"
    return "the previous version was never seen" if stream_seen else None
