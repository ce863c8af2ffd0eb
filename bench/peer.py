"""The peer: pyeventsourcing 9.5.6 doing the same work on the same PostgreSQL, in the same run.

Two phases, each run `--runs` times, every run in a schema of its own (`peer_<tag>`, dropped
afterwards: the peer never touches Card Desk's tables):

1. writers: `--cards` card aggregates are registered, then `--writers` processes (each
   single-threaded, as the library's applications are used) run commands for `--seconds`:
   load one card (`repository.get`), decide (report it lost if active, else recover it:
   one event), save. Each writer has its own cards, so no write conflicts. Commands/s.
2. projection: the library's `ProjectionRunner` catches a `Projection` up from nothing over
   the log the writers left, upserting each card's status and tracking position into a
   `card_status` table in the view's own schema (one transaction per event, as the
   library's materialised views do). Events/s.

Needs the `bench` extra (`pip install -e '.[bench]'`: `eventsourcing[postgres]==9.5.6`).

    python -m bench.peer [--runs 3] [--seconds 20] [--writers 2] [--cards 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import uuid
from collections.abc import Mapping, Sequence
from functools import singledispatchmethod
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

import psycopg
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Tracking
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.projection import Projection, ProjectionRunner
from psycopg.sql import SQL, Identifier

from bench.common import console, print_table, spread, write_result
from shared.settings import CardDeskSettings

# How long a projection run may take to catch up before it counts as failed.
CATCH_UP_TIMEOUT_S = 600.0
# How long writer processes get to start (import the library, connect) before the clock runs.
WRITER_START_S = 3.0


class Card(Aggregate):
    """A citizen's card: active or lost, as many times as the writers make it."""

    class Registered(Aggregate.Created):
        citizen_ref: str

    class LossReported(Aggregate.Event):
        pass

    class Recovered(Aggregate.Event):
        pass

    @event(Registered)
    def __init__(self, citizen_ref: str) -> None:
        self.citizen_ref = citizen_ref
        self.status = "ACTIVE"
        self.losses = 0

    @event(LossReported)
    def _loss_reported(self) -> None:
        self.status = "LOST"
        self.losses += 1

    @event(Recovered)
    def _recovered(self) -> None:
        self.status = "ACTIVE"

    def decide(self) -> None:
        """One command, one event: report an active card lost, recover a lost one."""
        if self.status == "ACTIVE":
            self._loss_reported()
        else:
            self._recovered()


class PeerCards(Application[UUID]):
    def register(self, count: int) -> list[UUID]:
        ids: list[UUID] = []
        for start in range(0, count, 500):
            cards = [Card(uuid.uuid4().hex) for _ in range(min(500, count - start))]
            self.save(*cards)
            ids += [card.id for card in cards]
        return ids

    def command(self, card_id: UUID) -> None:
        card: Card = self.repository.get(card_id)
        card.decide()
        self.save(card)


class CardStatusView(PostgresTrackingRecorder):
    """The status table and the tracking position, written in one transaction per event."""

    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.sql_create_statements.append(SQL(
            "CREATE TABLE IF NOT EXISTS {0}.card_status (card_id uuid PRIMARY KEY, "
            "status text NOT NULL, losses int NOT NULL)").format(
                Identifier(self.datastore.schema)))
        self.upsert = SQL(
            "INSERT INTO {0}.card_status AS c VALUES (%s, %s, %s) ON CONFLICT (card_id) "
            "DO UPDATE SET status = excluded.status, losses = c.losses + excluded.losses"
        ).format(Identifier(self.datastore.schema))

    def apply(self, card_id: UUID, status: str, losses: int, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(self.upsert, (card_id, status, losses), prepare=True)
            self._insert_tracking(curs, tracking)


class CardStatusProjection(Projection[CardStatusView]):
    name = "peer_view"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)

    @process_event.register
    def _(self, domain_event: Card.Registered, tracking: Tracking) -> None:
        self.view.apply(domain_event.originator_id, "ACTIVE", 0, tracking)

    @process_event.register
    def _(self, domain_event: Card.LossReported, tracking: Tracking) -> None:
        self.view.apply(domain_event.originator_id, "LOST", 1, tracking)

    @process_event.register
    def _(self, domain_event: Card.Recovered, tracking: Tracking) -> None:
        self.view.apply(domain_event.originator_id, "ACTIVE", 0, tracking)


def peer_environment(database_url: str, schema: str, view_schema: str) -> dict[str, str]:
    """The library's settings for our PostgreSQL, in schemas of its own."""
    url = urlsplit(database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": url.path.lstrip("/"),
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        # The library insists on one; a local stack that trusts its user ignores it.
        "POSTGRES_PASSWORD": unquote(url.password or "unused"),
        "POSTGRES_SCHEMA": schema,
        "PEER_VIEW_POSTGRES_SCHEMA": view_schema,
        "POSTGRES_POOL_SIZE": "2",
    }


def writer(env: dict[str, str], cards: Sequence[UUID], start_at: float, seconds: float,
           done: Any) -> None:
    """One writer process: commands round its own cards from `start_at` for `seconds`. The
    tables exist by then (`run_writers`): two writers creating them at once can fail in
    PostgreSQL's catalog (`tuple concurrently updated`)."""
    app = PeerCards({**env, "CREATE_TABLE": "no"})
    app.repository.get(cards[0])  # connected and warm before the clock runs
    while time.time() < start_at:
        time.sleep(0.001)
    count, end = 0, start_at + seconds
    while time.time() < end:
        app.command(cards[count % len(cards)])
        count += 1
    app.close()
    done.put(count)


def run_writers(env: dict[str, str], writers: int, cards: int, seconds: float) -> float:
    app = PeerCards(env)
    ids = app.register(cards)
    app.close()
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    start_at = time.time() + WRITER_START_S
    processes = [context.Process(target=writer,
                                 args=(env, ids[k::writers], start_at, seconds, done))
                 for k in range(writers)]
    for process in processes:
        process.start()
    counts: list[int] = [done.get(timeout=WRITER_START_S + seconds + 60) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    return sum(counts) / seconds


def run_projection(env: dict[str, str]) -> tuple[int, float]:
    """(events, seconds) for a projection catching up from nothing over the whole log."""
    app = PeerCards(env)
    last = app.recorder.max_notification_id() or 0
    app.close()
    started = time.monotonic()
    with ProjectionRunner(application_class=PeerCards, projection_class=CardStatusProjection,
                          view_class=CardStatusView, env=env) as runner:
        while (runner.view.max_tracking_id(runner.app_name) or 0) < last:
            if time.monotonic() - started > CATCH_UP_TIMEOUT_S:
                raise TimeoutError(f"peer projection not caught up in {CATCH_UP_TIMEOUT_S} s")
            runner.run_forever(timeout=0.02)
        elapsed = time.monotonic() - started
    return last, elapsed


def create_schemas(database_url: str, *schemas: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(SQL("CREATE SCHEMA {0}").format(Identifier(schema)))


def drop_schemas(database_url: str, *schemas: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        for schema in schemas:
            conn.execute(SQL("DROP SCHEMA IF EXISTS {0} CASCADE").format(Identifier(schema)))


def one_run(database_url: str, writers: int, cards: int, seconds: float) -> dict[str, float]:
    tag = uuid.uuid4().hex[:6]
    schema, view_schema = f"peer_{tag}", f"peer_{tag}_view"
    create_schemas(database_url, schema, view_schema)
    try:
        env = peer_environment(database_url, schema, view_schema)
        commands_per_s = run_writers(env, writers, cards, seconds)
        events, elapsed = run_projection(env)
    finally:
        drop_schemas(database_url, schema, view_schema)
    return {"commands_per_s": commands_per_s, "projection_events": events,
            "projection_seconds": elapsed, "projection_events_per_s": events / elapsed}


def summary(runs: Sequence[Mapping[str, float]], figure: str) -> dict[str, float]:
    return spread([run[figure] for run in runs])


def require_postgres(database_url: str) -> None:
    """Stop with what to do when the stack's PostgreSQL is not up: `python -m bench` starts
    it before the peer, and run alone the peer starts nothing."""
    try:
        psycopg.connect(database_url, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        where = urlsplit(database_url)
        raise SystemExit(
            f"PostgreSQL is not reachable at {where.hostname}:{where.port}; start it with "
            f"`cardctl stack up --no-services` ({str(exc).splitlines()[0]})") from None


def main(runs: int, seconds: float, writers: int, cards: int) -> None:
    settings = CardDeskSettings()
    require_postgres(settings.database_url)
    results = []
    for k in range(runs):
        console.print(f"peer run {k + 1}/{runs}: {writers} writers × {seconds:.0f} s over "
                      f"{cards:,} cards, then the projection's catch-up …")
        results.append(one_run(settings.database_url, writers, cards, seconds))
        console.print(f"  {results[-1]['commands_per_s']:.0f} commands/s, projection "
                      f"{results[-1]['projection_events_per_s']:.0f} events/s "
                      f"({results[-1]['projection_events']:,.0f} events)")
    commands, projection = summary(results, "commands_per_s"), summary(
        results, "projection_events_per_s")
    figures = {"library": "eventsourcing 9.5.6", "writers": writers, "cards": cards,
               "seconds": seconds, "runs": results, "commands_per_s": commands,
               "projection_events_per_s": projection}
    print_table(f"peer: pyeventsourcing 9.5.6, same PostgreSQL, {runs} run(s), "
                "min / median / max", [
                    (f"commands/s ({writers} writer processes, load-decide-save)",
                     _spread(commands)),
                    ("projection catch-up events/s", _spread(projection)),
                ])
    console.print(f"written {write_result('peer', figures)}")


def _spread(s: Mapping[str, float]) -> str:
    return f"{s['min']:,.0f} / {s['median']:,.0f} / {s['max']:,.0f}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--cards", type=int, default=2000)
    args = parser.parse_args()
    main(args.runs, args.seconds, args.writers, args.cards)
