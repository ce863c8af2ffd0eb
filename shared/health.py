"""Honest health: a service is healthy only while its database runs a query within a bound
and every one of its consumers is consuming (a live loop, partitions assigned, fetching,
its offsets committed).

The watchdog turns a lasting failure into an exit, so the supervisor restarts the process:
a consumer that lost its assignment or a pool that never recovers costs one restart, not a
silent outage.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import structlog

from shared.commits import COMMITS, DeferredCommits

log = structlog.get_logger()

OK = "ok"
# The exit status of a process the watchdog ended (EX_SOFTWARE); the supervisor shows it.
EXIT_UNHEALTHY = 70


class ConsumerWatch:
    """What one subscription did lately, and whether that still counts as consuming.

    `subscriber` is FastStream's Kafka subscriber (its `consumer`, `running` and `tasks`);
    it is reached through a callable so a watch exists before the broker starts.
    """

    def __init__(self, topic: str, subscriber: Callable[[], Any], stall_s: float,
                 clock: Callable[[], float] = time.time,
                 commits: DeferredCommits = COMMITS) -> None:
        self.topic = topic
        self.subscriber = subscriber
        self.stall_s = stall_s
        self.clock = clock
        self.commits = commits
        self.created_at = clock()
        self.unassigned_since: float | None = None
        self.in_flight_since: float | None = None
        self.last_batch_done: float | None = None
        self.failing_since: float | None = None

    def batch_started(self) -> None:
        self.in_flight_since = self.clock()

    def batch_done(self, *, failed: bool = False) -> None:
        """A batch ended; a failed one is redelivered, so it is not progress."""
        now = self.clock()
        self.in_flight_since = None
        self.last_batch_done = now
        if not failed:
            self.failing_since = None
        elif self.failing_since is None:
            self.failing_since = now

    def problem(self) -> str | None:
        """None while consuming; else a short phrase saying what is wrong."""
        now = self.clock()
        sub = self.subscriber()
        consumer = running_consumer(sub)
        if consumer is None:
            return "stopped"
        tasks = getattr(sub, "tasks", [])
        if not tasks or all(task.done() for task in tasks):
            return "consume loop ended"
        if self.in_flight_since is not None and now - self.in_flight_since > self.stall_s:
            return f"one batch in progress for {now - self.in_flight_since:.0f}s"
        if self.failing_since is not None and now - self.failing_since > self.stall_s:
            return f"every batch failing for {now - self.failing_since:.0f}s"
        # Batches handled and replied to, but their offsets never committed: the group's
        # lag grows, and a restart would redo all of it (a coordinator aiokafka lost).
        uncommitted = self.commits.failing_since(consumer)
        if uncommitted is not None and now - uncommitted > self.stall_s:
            return f"offsets not committed for {now - uncommitted:.0f}s"
        assignment = consumer.assignment()
        if not assignment:
            if self.unassigned_since is None:
                self.unassigned_since = self.created_at if self.last_batch_done is None else now
            if now - self.unassigned_since > self.stall_s:
                return f"no partition assigned for {now - self.unassigned_since:.0f}s"
            return None
        self.unassigned_since = None
        fetched = [consumer.last_poll_timestamp(tp) for tp in assignment]
        latest = max([ts / 1000 for ts in fetched if ts is not None]
                     + [self.last_batch_done or self.created_at])
        if now - latest > self.stall_s:
            return f"nothing fetched for {now - latest:.0f}s"
        return None


async def database_problem(pool: Callable[[], asyncpg.Pool], timeout_s: float) -> str | None:
    """None when the pool runs `SELECT 1` within the bound; else why not."""
    async def probe() -> object:
        async with pool().acquire(timeout=timeout_s) as conn:
            return await conn.fetchval("SELECT 1", timeout=timeout_s)

    try:
        # asyncpg's own timeouts cancel the query on the server and keep the connection
        # usable; cancelling a query from outside (a bare wait_for) can hand the pool a
        # connection still busy with it ("another operation is in progress"). The outer
        # bound is only a backstop.
        value = await asyncio.wait_for(probe(), timeout_s * 3)
    except AssertionError:
        return "not started"
    except TimeoutError:
        return f"no answer within {timeout_s:g}s"
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        return type(error).__name__
    return None if value == 1 else "unexpected answer"


def summarise(problems: Mapping[str, str | None]) -> tuple[bool, dict[str, str]]:
    """(healthy, the checks as the /health body shows them)."""
    checks = {name: problem or OK for name, problem in problems.items()}
    return all(problem is None for problem in problems.values()), checks


async def watchdog(service: str, problems: Callable[[], Awaitable[Mapping[str, str | None]]],
                   *, exit_after_s: float, every_s: float = 5.0,
                   exit: Callable[[int], object] = os._exit) -> None:
    """Exit the process once it has been unhealthy for `exit_after_s` without a break.

    `os._exit` and not an exception: a wedged consumer or pool is what is being escaped, and
    nothing acknowledged is lost by dying (offsets are committed after the transactions).
    """
    unhealthy_since: float | None = None
    while True:
        await asyncio.sleep(every_s)
        try:
            found = await asyncio.wait_for(problems(), every_s * 2)
        except Exception as error:  # a probe that cannot run counts as failing
            found = {"probe": type(error).__name__}
        failing = {name: problem for name, problem in found.items() if problem is not None}
        now = time.monotonic()
        if not failing:
            if unhealthy_since is not None:
                log.info("health.recovered", service=service)
            unhealthy_since = None
            continue
        if unhealthy_since is None:
            unhealthy_since = now
            log.warning("health.failing", service=service, checks=failing)
        if now - unhealthy_since >= exit_after_s:
            log.error("health.watchdog_exit", service=service, checks=failing,
                      unhealthy_s=round(now - unhealthy_since), exit_status=EXIT_UNHEALTHY)
            sys.stdout.flush()
            sys.stderr.flush()
            exit(EXIT_UNHEALTHY)
            return


def running_consumer(subscriber: Any) -> Any:
    """The Kafka consumer of FastStream's `subscriber` while it runs; None while stopped."""
    consumer = getattr(subscriber, "consumer", None)
    return consumer if consumer is not None and getattr(subscriber, "running", False) else None
