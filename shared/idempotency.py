"""What makes redelivery harmless, in one place: the replies each `(channel, request_id)` got
(a repeated command gets its stored reply) and the messages each follower has processed (a
redelivered event changes nothing). Both are written in the transaction of the effect.

Stored replies are sealed under a key derived from the channel's secret and the request id,
so the table alone reveals no captcha code or session token; they are purged once a repeat
would be refused as stale anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Collection, Sequence
from datetime import timedelta

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.chain import chain_columns, chain_insert
from shared.channels import Channel
from shared.envelope import EventEnvelope
from shared.eventstore import AlsoWritten
from shared.intake.messages import Reply
from shared.outbox import (
    OutboxMessage,
    delete_sent_sql,
    notify_channel,
    outbox_columns,
    outbox_insert,
)
from shared.purge import delete_in_batches, delete_in_one_pass
from shared.topics import REPLY_TOPIC_PREFIX

ReplyKey = tuple[str, str]  # (channel id, request id)


class StoredReplies:
    """`<schema>.stored_replies`: the reply each request got, sealed."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def lookup(self, conn: asyncpg.Connection,
                     requests: Sequence[tuple[Channel, str]]) -> dict[ReplyKey, Reply]:
        """The stored replies of these requests (those that have one), opened."""
        rows = await conn.fetch(
            f"SELECT channel, request_id, reply FROM {self.schema}.stored_replies"
            " WHERE (channel, request_id) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
            [channel.channel_id for channel, _ in requests],
            [request_id for _, request_id in requests])
        sealed = {(r["channel"], r["request_id"]): bytes(r["reply"]) for r in rows}
        return {(channel.channel_id, request_id): open_reply(channel, request_id, found)
                for channel, request_id in requests
                if (found := sealed.get((channel.channel_id, request_id))) is not None}

    async def record(self, conn: asyncpg.Connection, new: Sequence[tuple[Channel, Reply]],
                     queued: Sequence[OutboxMessage]) -> None:
        """Store the `new` replies and queue `queued` on the outbox, in one statement."""
        await conn.execute(
            f"WITH stored AS ({self._insert(1)}),"
            f" queued AS ({outbox_insert(self.schema, 4)})"
            f" SELECT pg_notify('{notify_channel(self.schema)}', '')",
            *self._columns(new), *outbox_columns(queued),
        )

    def written_with(self, new: Sequence[tuple[Channel, Reply]],
                     queued: Sequence[OutboxMessage]) -> AlsoWritten:
        """`record` as a part of the statement that writes a batch's held appends
        (`HeldAppends.flush`): `queued` go on the outbox after the events."""
        return AlsoWritten(self._insert, self._columns(new), queued)

    def _insert(self, first: int) -> str:
        return (f"INSERT INTO {self.schema}.stored_replies (channel, request_id, reply)"
                f" SELECT * FROM unnest(${first}::text[], ${first + 1}::text[],"
                f" ${first + 2}::bytea[])")

    @staticmethod
    def _columns(new: Sequence[tuple[Channel, Reply]],
                 ) -> tuple[list[str], list[str], list[bytes]]:
        return ([channel.channel_id for channel, _ in new],
                [reply.request_id for _, reply in new],
                [seal_reply(channel, reply) for channel, reply in new])

    async def purge(self, pool: asyncpg.Pool, older_than: timedelta, batch: int) -> int:
        """Delete stored replies older than `older_than`, and the outbox rows of replies sent
        that long ago (they hold captcha codes and session tokens in clear), a bounded batch
        at a time; returns how many stored replies went.

        The reply rows are taken in position order (`delete_sent_sql`, over the index
        `outbox_replies`). Asking instead for reply rows sent before the cutoff, `LIMIT`
        batch, walked every younger reply row whenever fewer than a batch were old, which was
        every purge: 113,000 rows and 470 ms for 2,400 deleted on the benchmark's stack
        (README, Performance)."""
        replies = (f"DELETE FROM {self.schema}.stored_replies WHERE ctid IN"
                   f"  (SELECT ctid FROM {self.schema}.stored_replies"
                   "   WHERE created_at < now() - $1::interval LIMIT $2)")
        sent = delete_sent_sql(self.schema, f"topic LIKE '{REPLY_TOPIC_PREFIX}%'")
        purged = await delete_in_batches(pool, replies, older_than, batch)
        await delete_in_batches(pool, sent, older_than, batch)
        return purged


def _reply_key(channel: Channel, request_id: str) -> AESGCM:
    """The key a stored reply is sealed under: derived from the channel's secret and the
    request id."""
    material = f"carddesk stored reply v1\x00{request_id}".encode()
    return AESGCM(hmac.new(channel.secret.encode(), material, hashlib.sha256).digest())


def seal_reply(channel: Channel, reply: Reply) -> bytes:
    nonce = os.urandom(12)
    aad = f"{channel.channel_id}\x00{reply.request_id}".encode()
    return nonce + _reply_key(channel, reply.request_id).encrypt(nonce, reply.to_bytes(), aad)


def open_reply(channel: Channel, request_id: str, sealed: bytes) -> Reply:
    aad = f"{channel.channel_id}\x00{request_id}".encode()
    plain = _reply_key(channel, request_id).decrypt(sealed[:12], sealed[12:], aad)
    return Reply.model_validate_json(plain)


class ProcessedMessages:
    """`<schema>.processed`: the messages one consumer has applied, by id."""

    def __init__(self, schema: str, consumer: str) -> None:
        self.schema = schema
        self.consumer = consumer

    async def first_time(self, conn: asyncpg.Connection, message_id: str) -> bool:
        """Record one message; whether it was new."""
        return bool(await conn.fetchval(
            f"INSERT INTO {self.schema}.processed (consumer, message_id) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING true", self.consumer, message_id))

    async def new_of(self, conn: asyncpg.Connection, message_ids: Collection[str],
                     chained: Sequence[EventEnvelope] = ()) -> set[str]:
        """Record several messages, and the chain rows of the `chained` events a follower
        took (`shared.chain`), in one statement; the ids that were new."""
        return set(await conn.fetchval(
            f"WITH chained AS ({chain_insert(self.schema, 3)}),"
            f" new AS (INSERT INTO {self.schema}.processed (consumer, message_id)"
            " SELECT $1, id FROM unnest($2::text[]) AS id"
            " ON CONFLICT DO NOTHING RETURNING message_id)"
            " SELECT coalesce(array_agg(message_id), '{}') FROM new",
            self.consumer, list(message_ids), *chain_columns(chained)))

    @staticmethod
    async def purge(pool: asyncpg.Pool, schema: str, older_than: timedelta) -> int:
        """Delete every consumer's rows in `schema` recorded longer ago than `older_than`, in
        one pass of bounded statements; returns how many went. Only for consumers whose
        redeliveries that old are recognised otherwise (`shared.chain.FollowedChains`:
        settled)."""
        return await delete_in_one_pass(pool, f"{schema}.processed",
                                        "t.processed_at < now() - $1::interval", older_than)
