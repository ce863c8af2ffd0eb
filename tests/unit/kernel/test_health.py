"""A consumer counts as consuming only while its loop lives, it holds partitions and it
fetches or finishes batches; the watchdog exits a process that stays unhealthy."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka.errors import KafkaConnectionError

from shared.commits import DeferredCommits
from shared.health import EXIT_UNHEALTHY, ConsumerWatch, summarise, watchdog

STALL_S = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)  # hashable, as aiokafka's consumer is
class FakeConsumer:
    partitions: set[str] = field(default_factory=lambda: {"t-0"})
    fetched_at_ms: int | None = None
    commit_error: Exception | None = None

    async def commit(self, _offsets: dict[str, int]) -> None:
        if self.commit_error is not None:
            raise self.commit_error

    def assignment(self) -> set[str]:
        return self.partitions

    def last_poll_timestamp(self, _tp: str) -> int | None:
        return self.fetched_at_ms


class FakeTask:
    def __init__(self, done: bool = False) -> None:
        self._done = done

    def done(self) -> bool:
        return self._done


@dataclass
class FakeSubscriber:
    consumer: FakeConsumer | None = field(default_factory=FakeConsumer)
    running: bool = True
    tasks: list[Any] = field(default_factory=lambda: [FakeTask()])


def watched(sub: FakeSubscriber) -> tuple[ConsumerWatch, Clock]:
    clock = Clock()
    return ConsumerWatch("loss.commands", lambda: sub, STALL_S, clock), clock


def test_a_consumer_that_fetched_lately_is_consuming() -> None:
    sub = FakeSubscriber()
    watch, clock = watched(sub)
    assert sub.consumer is not None
    sub.consumer.fetched_at_ms = int((clock.now - 1) * 1000)
    assert watch.problem() is None


def test_a_stopped_subscriber_is_not_consuming() -> None:
    watch, _ = watched(FakeSubscriber(consumer=None, running=False))
    assert watch.problem() == "stopped"


def test_a_subscriber_whose_loop_task_ended_is_not_consuming() -> None:
    watch, _ = watched(FakeSubscriber(tasks=[FakeTask(done=True)]))
    assert watch.problem() == "consume loop ended"


def test_no_assignment_is_forgiven_for_the_stall_bound_then_reported() -> None:
    sub = FakeSubscriber(consumer=FakeConsumer(partitions=set()))
    watch, clock = watched(sub)
    clock.now += STALL_S - 1
    assert watch.problem() is None
    clock.now += 2
    assert watch.problem() == "no partition assigned for 31s"


def test_a_consumer_whose_assignment_was_lost_after_work_is_reported_after_the_bound() -> None:
    sub = FakeSubscriber()
    watch, clock = watched(sub)
    watch.batch_started()
    watch.batch_done()
    assert sub.consumer is not None
    sub.consumer.partitions = set()
    clock.now += 100
    assert watch.problem() is None  # the loss is first seen now
    clock.now += STALL_S + 1
    assert watch.problem() == "no partition assigned for 31s"


def test_an_assigned_consumer_that_fetches_nothing_is_reported() -> None:
    sub = FakeSubscriber()
    watch, clock = watched(sub)
    assert sub.consumer is not None
    sub.consumer.fetched_at_ms = int(clock.now * 1000)
    clock.now += STALL_S + 5
    assert watch.problem() == "nothing fetched for 35s"


def test_a_batch_stuck_in_its_handler_is_reported() -> None:
    sub = FakeSubscriber()
    watch, clock = watched(sub)
    watch.batch_started()
    assert sub.consumer is not None
    clock.now += STALL_S + 2
    sub.consumer.fetched_at_ms = int(clock.now * 1000)
    assert watch.problem() == "one batch in progress for 32s"


def test_batches_that_keep_failing_are_not_progress() -> None:
    sub = FakeSubscriber()
    watch, clock = watched(sub)
    assert sub.consumer is not None
    for _ in range(4):
        watch.batch_started()
        clock.now += 10
        sub.consumer.fetched_at_ms = int(clock.now * 1000)
        watch.batch_done(failed=True)
    assert watch.problem() is None  # failing for exactly the bound: not yet
    clock.now += 5
    sub.consumer.fetched_at_ms = int(clock.now * 1000)
    assert watch.problem() == "every batch failing for 35s"
    watch.batch_started()
    watch.batch_done()
    assert watch.problem() is None


def test_the_health_summary_names_each_failing_check() -> None:
    healthy, checks = summarise({"database": None, "consumer:loss.commands": "stopped"})
    assert not healthy
    assert checks == {"database": "ok", "consumer:loss.commands": "stopped"}
    assert summarise({"database": None}) == (True, {"database": "ok"})


async def test_the_watchdog_exits_once_unhealthy_for_its_bound() -> None:
    exits: list[int] = []

    async def failing() -> dict[str, str | None]:
        return {"database": "ConnectionRefusedError"}

    await asyncio.wait_for(
        watchdog("loss", failing, exit_after_s=0.05, every_s=0.02, exit=exits.append), 2.0)
    assert exits == [EXIT_UNHEALTHY]


async def test_the_watchdog_leaves_a_process_that_recovers_in_time() -> None:
    exits: list[int] = []
    down: dict[str, str | None] = {"database": "down"}
    up: dict[str, str | None] = {"database": None}
    answers = iter([down, up] * 50)

    async def flapping() -> dict[str, str | None]:
        return next(answers)

    task = asyncio.create_task(
        watchdog("loss", flapping, exit_after_s=0.05, every_s=0.02, exit=exits.append))
    await asyncio.sleep(0.5)
    task.cancel()
    assert exits == []


async def test_a_probe_that_raises_counts_as_failing() -> None:
    exits: list[int] = []

    async def broken() -> dict[str, str | None]:
        raise RuntimeError("probe bug")

    await asyncio.wait_for(
        watchdog("loss", broken, exit_after_s=0.05, every_s=0.02, exit=exits.append), 2.0)
    assert exits == [EXIT_UNHEALTHY]


async def test_offsets_that_fail_to_commit_past_the_stall_bound_are_reported() -> None:
    """A consumer that fetches and handles but cannot commit (a coordinator aiokafka lost
    track of) looks busy, while its group's lag grows: a restart is the way out."""
    clock = Clock()
    commits = DeferredCommits(interval_s=10, clock=clock)
    sub = FakeSubscriber()
    watch = ConsumerWatch("loss.commands", lambda: sub, STALL_S, clock, commits=commits)
    consumer = sub.consumer
    assert consumer is not None
    consumer.commit_error = KafkaConnectionError()
    await commits.handled(consumer, {"t-0": 5})
    await commits.flush(consumer)
    assert commits.owed(consumer) == {"t-0": 5}
    clock.now += STALL_S - 1
    consumer.fetched_at_ms = int(clock.now * 1000)
    assert watch.problem() is None
    clock.now += 2
    consumer.fetched_at_ms = int(clock.now * 1000)
    assert watch.problem() == "offsets not committed for 31s"
    consumer.commit_error = None  # the coordinator answers again
    await commits.flush(consumer)
    assert watch.problem() is None
    await commits.flush_all()
