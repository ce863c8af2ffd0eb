"""The review schema's own tables besides the event store: the loss cases it has heard of and
which citizen each application belongs to (so a decision finds its stream)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import asyncpg

from services.review.domain import LossView
from shared.crypto import data_keys_ddl
from shared.locks import locked_read_ddl


def review_ddl(schema: str) -> str:
    return f"""
    CREATE TABLE IF NOT EXISTS {schema}.losses (
        citizen_ref text        PRIMARY KEY,
        loss_id     text        NOT NULL,
        kind        text        NOT NULL CHECK (kind IN ('temporary', 'formal')),
        card_no     text,
        in_force    boolean     NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS {schema}.applications (
        application_id text        PRIMARY KEY,
        citizen_ref    text        NOT NULL,
        created_at     timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS applications_by_citizen ON {schema}.applications (citizen_ref);
    """ + locked_read_ddl(  # a command's citizen locked and their loss case read
        f"{schema}.locked_loss", "citizen text",
        "loss_id text, kind text, card_no text, in_force boolean", "ARRAY[citizen]",
        _loss_sql(schema, "citizen")) + locked_read_ddl(  # a command batch's, at once
        f"{schema}.locked_losses", "refs text[]",
        "citizen_ref text, loss_id text, kind text, card_no text, in_force boolean", "refs",
        f"SELECT citizen_ref, loss_id, kind, card_no, in_force FROM {schema}.losses"
        " WHERE citizen_ref = ANY(refs)") + data_keys_ddl(schema)


def _loss_sql(schema: str, ref: str) -> str:
    return (f"SELECT loss_id, kind, card_no, in_force FROM {schema}.losses"
            f" WHERE citizen_ref = {ref}")


@dataclass(frozen=True, slots=True)
class LockedLosses:
    """Some citizens' loss cases, read under their locks (`covered`: the citizens read,
    with a case or without)."""

    cases: Mapping[str, LossView]
    covered: frozenset[str]

    def covers(self, citizen_ref: str) -> bool:
        return citizen_ref in self.covered


class ReviewTables:
    """Queries on one review schema, run on the caller's connection (and transaction)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    async def locked_loss_of(self, conn: asyncpg.Connection, namespace: str,
                             citizen_ref: str) -> LossView | None:
        """The citizen's lock in `namespace` (`shared.locks`), then their loss case, in one
        round trip (`locked_loss`)."""
        row = await conn.fetchrow(
            f"SELECT * FROM {self.schema}.locked_loss($1, $2)", namespace, citizen_ref)
        return None if row is None else _loss_view(row)

    async def locked_losses_of(self, conn: asyncpg.Connection, namespace: str,
                               citizen_refs: Collection[str]) -> LockedLosses:
        """`locked_loss_of` for several citizens at once (a command batch's)."""
        refs = sorted(set(citizen_refs))
        rows = await conn.fetch(f"SELECT * FROM {self.schema}.locked_losses($1, $2)",
                                namespace, refs)
        return LockedLosses({row["citizen_ref"]: _loss_view(row) for row in rows},
                            frozenset(refs))

    async def losses_of(self, conn: asyncpg.Connection,
                        citizen_refs: Collection[str]) -> dict[str, LossView]:
        """The loss case of each of `citizen_refs` that has one, in one statement."""
        rows = await conn.fetch(
            f"SELECT citizen_ref, loss_id, kind, card_no, in_force FROM {self.schema}.losses"
            " WHERE citizen_ref = ANY($1::text[])",
            sorted(set(citizen_refs)),
        )
        return {row["citizen_ref"]: _loss_view(row) for row in rows}

    async def save_losses(self, conn: asyncpg.Connection, losses: Mapping[str, LossView]) -> None:
        """Record each citizen's loss case, in one statement."""
        if not losses:
            return
        await conn.execute(
            f"INSERT INTO {self.schema}.losses (citizen_ref, loss_id, kind, card_no, in_force)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[])"
            " ON CONFLICT (citizen_ref) DO UPDATE SET loss_id = EXCLUDED.loss_id,"
            " kind = EXCLUDED.kind, card_no = EXCLUDED.card_no, in_force = EXCLUDED.in_force,"
            " updated_at = now()",
            list(losses), [loss.loss_id for loss in losses.values()],
            [loss.kind for loss in losses.values()], [loss.card_no for loss in losses.values()],
            [loss.in_force for loss in losses.values()],
        )

    async def record_application(
        self, conn: asyncpg.Connection, application_id: str, citizen_ref: str
    ) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.applications (application_id, citizen_ref)"
            " VALUES ($1, $2)",
            application_id, citizen_ref,
        )

    async def citizen_of(self, conn: asyncpg.Connection, application_id: str) -> str | None:
        citizen_ref: str | None = await conn.fetchval(
            f"SELECT citizen_ref FROM {self.schema}.applications WHERE application_id = $1",
            application_id,
        )
        return citizen_ref


def _loss_view(row: asyncpg.Record) -> LossView:
    return LossView(row["loss_id"], row["kind"], row["card_no"], row["in_force"])
