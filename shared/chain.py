"""Followers check that each event continues its stream as the events before it did: the
hash of an event covers its own envelope only, so a forged event can be self-consistent;
its place in the chain it claims cannot be."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from shared.envelope import GENESIS_HASH, EventEnvelope


class ChainBreak(Exception):  # noqa: N818 - a verdict on one event, as `Rejected` is
    """The event does not continue its stream as recorded: it forks or skips."""

    def __init__(self, envelope: EventEnvelope, reason: str) -> None:
        super().__init__(f"{envelope.stream_id} v{envelope.version}: {reason}")
        self.envelope = envelope


class FollowedChains:
    """`followed_chain`: (stream_id, version, hash) of every event a follower took as authentic.

    An event is taken when its (stream, version) is recorded with the same hash (a
    redelivery), or when it chains onto the recorded previous version (or genesis at
    version 1). A stream never seen before is taken from wherever it starts (a follower that
    starts mid-history); from then on, forks and gaps are breaks."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def take(self, conn: asyncpg.Connection,
                   envelopes: Sequence[EventEnvelope]) -> list[ChainBreak]:
        """Record the events that continue their chains (in order); the others' breaks."""
        if not envelopes:
            return []
        streams = sorted({e.stream_id for e in envelopes})
        rows = await conn.fetch(
            f"SELECT DISTINCT ON (c.stream_id, c.version) c.stream_id, c.version, c.hash"
            f" FROM {self.schema}.followed_chain c"
            " JOIN unnest($1::text[], $2::int[]) AS w(stream_id, version)"
            "   ON c.stream_id = w.stream_id AND c.version IN (w.version, w.version - 1)",
            [e.stream_id for e in envelopes], [e.version for e in envelopes])
        known: dict[tuple[str, int], str] = {(r["stream_id"], r["version"]): r["hash"]
                                             for r in rows}
        seen_streams = set(await conn.fetchval(
            f"SELECT coalesce(array_agg(DISTINCT stream_id), '{{}}')"
            f" FROM {self.schema}.followed_chain WHERE stream_id = ANY($1::text[])", streams))
        breaks: list[ChainBreak] = []
        taken: list[EventEnvelope] = []
        for envelope in envelopes:
            reason = _verdict(envelope, known, envelope.stream_id in seen_streams)
            if reason is not None:
                breaks.append(ChainBreak(envelope, reason))
                continue
            known[(envelope.stream_id, envelope.version)] = envelope.hash
            seen_streams.add(envelope.stream_id)
            taken.append(envelope)
        if taken:
            await conn.execute(
                f"INSERT INTO {self.schema}.followed_chain (stream_id, version, hash)"
                " SELECT * FROM unnest($1::text[], $2::int[], $3::text[])"
                " ON CONFLICT DO NOTHING",
                [e.stream_id for e in taken], [e.version for e in taken],
                [e.hash for e in taken])
        return breaks


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
