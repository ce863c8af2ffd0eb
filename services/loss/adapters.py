"""The loss schema's own tables besides the event store: what it learned from other services
(which card a citizen holds, the state of their reissue application) and the durable expiry
timers. Every write joins the caller's transaction."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import asyncpg

from services.loss.domain import ApplicationStatus
from shared.crypto import data_keys_ddl
from shared.locks import locked_read_ddl
from shared.timers import DurableTimers, timers_ddl


def loss_ddl(schema: str) -> str:
    return data_keys_ddl(schema) + timers_ddl(schema, "expiry_timers") + f"""
    CREATE TABLE IF NOT EXISTS {schema}.cards (
        citizen_ref text        PRIMARY KEY,
        card_no     text        NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE IF NOT EXISTS {schema}.applications (
        citizen_ref    text        PRIMARY KEY,
        application_id text        NOT NULL,
        status         text        NOT NULL
            CHECK (status IN ('none', 'pending', 'approved', 'rejected', 'completed')),
        updated_at     timestamptz NOT NULL DEFAULT now()
    );
    """ + locked_read_ddl(  # a command's citizen locked and their facts read: `Facts.locked`
        f"{schema}.locked_facts", "refs text[]",
        "ref text, card_no text, application_id text, status text", "refs",
        _facts_sql(schema, "refs"))


def _facts_sql(schema: str, refs: str) -> str:
    """The card and latest application of each citizen in the text array `refs`."""
    return ("SELECT r.ref, c.card_no, a.application_id, a.status"
            f" FROM unnest({refs}) AS r(ref)"
            f" LEFT JOIN {schema}.cards c ON c.citizen_ref = r.ref"
            f" LEFT JOIN {schema}.applications a ON a.citizen_ref = r.ref")


@dataclass(frozen=True, slots=True)
class Application:
    """A citizen's latest reissue application, as review and issuance told of it."""

    application_id: str
    status: ApplicationStatus


def applied(current: Application | None, application_id: str) -> Application:
    """A new application replaces the one before; the same one again changes nothing."""
    if current is not None and current.application_id == application_id:
        return current
    return Application(application_id, "pending")


def decided(current: Application | None, application_id: str,
            status: ApplicationStatus) -> Application:
    """A decision only touches the application it names, and a completed one (its card was
    reissued) never goes back, whatever order the two topics deliver in."""
    if current is None:
        return Application(application_id, status)
    if current.application_id == application_id and current.status != "completed":
        return Application(application_id, status)
    return current


class Facts:
    """What a loss decision knows from the other services about some citizens (`cards`: the
    card each holds; `applications`: their latest reissue application), read in one
    statement; what changed is written back in one statement per table by `save`."""

    def __init__(self, schema: str, cards: dict[str, str],
                 applications: dict[str, Application], *,
                 covered: Collection[str] = ()) -> None:
        self.schema = schema
        self.cards = cards
        self.applications = applications
        self.covered = frozenset(covered)  # the citizens read (with or without facts)
        self._changed_cards: set[str] = set()
        self._changed_applications: set[str] = set()

    @classmethod
    async def read(cls, conn: asyncpg.Connection, schema: str,
                   citizen_refs: Collection[str]) -> Facts:
        """By a caller that holds the citizens' locks already."""
        return cls.of(schema, await conn.fetch(_facts_sql(schema, "$1::text[]"),
                                               sorted(set(citizen_refs))))

    @classmethod
    async def locked(cls, conn: asyncpg.Connection, schema: str, namespace: str,
                     citizen_refs: Collection[str]) -> Facts:
        """The citizens' locks in `namespace` (`shared.locks`), then `read`, in one round
        trip (`locked_facts`): the read sees what the locks' last holders committed."""
        return cls.of(schema, await conn.fetch(f"SELECT * FROM {schema}.locked_facts($1, $2)",
                                               namespace, sorted(set(citizen_refs))))

    @classmethod
    def of(cls, schema: str, rows: Sequence[asyncpg.Record]) -> Facts:
        return cls(
            schema,
            {row["ref"]: row["card_no"] for row in rows if row["card_no"] is not None},
            {row["ref"]: Application(row["application_id"], row["status"])
             for row in rows if row["application_id"] is not None},
            covered=[row["ref"] for row in rows],
        )

    def covers(self, citizen_ref: str) -> bool:
        """Whether the citizen was read: a citizen not read has no facts here to go by."""
        return citizen_ref in self.covered

    def card_no(self, citizen_ref: str) -> str | None:
        """The card the citizen holds; None before issuance told of one."""
        return self.cards.get(citizen_ref)

    def application_status(self, citizen_ref: str) -> ApplicationStatus:
        application = self.applications.get(citizen_ref)
        return "none" if application is None else application.status

    def hold(self, citizen_ref: str, card_no: str) -> None:
        if self.cards.get(citizen_ref) != card_no:
            self.cards[citizen_ref] = card_no
            self._changed_cards.add(citizen_ref)

    def applied(self, citizen_ref: str, application_id: str) -> None:
        self._set(citizen_ref, applied(self.applications.get(citizen_ref), application_id))

    def decided(self, citizen_ref: str, application_id: str, status: ApplicationStatus) -> None:
        self._set(citizen_ref,
                  decided(self.applications.get(citizen_ref), application_id, status))

    def _set(self, citizen_ref: str, application: Application) -> None:
        if self.applications.get(citizen_ref) != application:
            self.applications[citizen_ref] = application
            self._changed_applications.add(citizen_ref)

    async def save(self, conn: asyncpg.Connection) -> None:
        """Write what changed since `read` (or the last `save`)."""
        if self._changed_cards:
            refs = sorted(self._changed_cards)
            await conn.execute(
                f"INSERT INTO {self.schema}.cards (citizen_ref, card_no)"
                " SELECT * FROM unnest($1::text[], $2::text[])"
                " ON CONFLICT (citizen_ref) DO UPDATE"
                " SET card_no = EXCLUDED.card_no, updated_at = now()",
                refs, [self.cards[ref] for ref in refs],
            )
            self._changed_cards.clear()
        if self._changed_applications:
            refs = sorted(self._changed_applications)
            await conn.execute(
                f"INSERT INTO {self.schema}.applications (citizen_ref, application_id, status)"
                " SELECT * FROM unnest($1::text[], $2::text[], $3::text[])"
                " ON CONFLICT (citizen_ref) DO UPDATE SET application_id ="
                " EXCLUDED.application_id, status = EXCLUDED.status, updated_at = now()",
                refs, [self.applications[ref].application_id for ref in refs],
                [self.applications[ref].status for ref in refs],
            )
            self._changed_applications.clear()


def expiry_timers(schema: str) -> DurableTimers:
    """`expiry_timers`: one per temporary loss in force (key: its loss_id), deleted when it is
    over; re-arming a loss moves its expiry."""
    return DurableTimers(schema, "expiry_timers", rearm="move_due")
