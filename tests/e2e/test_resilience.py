"""Faults on the real stack (DESIGN section 9, issue 9): every process runs under the
supervisor; a killed service comes back, `up` restarts a wedged one without touching the
infrastructure, and after the database or the broker is killed every consumer consumes
again (a whole journey drives an event through every topic).

Marked `slow`: a few minutes in all; CI runs them (they are not deselected by default).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from cardctl import stack as stack_module
from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Journey, Session
from cardctl.stack import ComponentStatus, ProcessSpec, Stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_S = 120.0
EVERY_TOPIC = ("SessionStarted", "ElectronicCardAuthorized", "LossReported", "ReissueApplied",
               "ReviewApproved", "CardReissued", "CardCollected", "LossClosed")


def spec(stack: Stack, name: str) -> ProcessSpec:
    return next(s for s in stack._every_spec() if s.name == name)


def row(stack: Stack, name: str) -> ComponentStatus:
    return next(r for r in stack.status() if r.name == name)


def wait_until_all_healthy(stack: Stack, timeout_s: float = RECOVERY_S) -> float:
    """Seconds it took; fails naming what was still unhealthy."""
    began = time.monotonic()
    rows: list[ComponentStatus] = []
    while time.monotonic() - began < timeout_s:
        rows = stack.status()
        if all(r.healthy for r in rows):
            return time.monotonic() - began
        time.sleep(1.0)
    raise AssertionError(f"not healthy after {timeout_s}s: "
                         f"{[(r.name, r.last_exit, r.detail) for r in rows if not r.healthy]}")


def kill9(stack: Stack, name: str) -> int:
    pid = stack.running_pid(spec(stack, name))
    assert pid is not None, f"{name} is not running"
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.fixture
def supervised(stack: Stack, services: list[str]) -> Iterator[Stack]:
    """The package's services run under the supervisor; each test leaves them healthy."""
    assert stack.supervisor_pid() is not None
    wait_until_all_healthy(stack)
    yield stack
    wait_until_all_healthy(stack)


async def journey_through_every_topic(journey: Journey, citizen: SyntheticCitizen) -> None:
    session = Session(citizen)
    await journey.whole(session)
    await journey.wait_for_timeline(session.citizen_ref, *EVERY_TOPIC, timeout_s=90)
    await journey.wait_for_status(session.citizen_ref, "ACTIVE", timeout_s=90)


def test_a_service_killed_with_sigkill_is_restarted_healthy_and_counted(
    supervised: Stack,
) -> None:
    before = row(supervised, "loss").restarts
    killed = kill9(supervised, "loss")
    took = wait_until_all_healthy(supervised, timeout_s=60)
    after = row(supervised, "loss")
    assert after.pid not in (None, killed)
    assert after.restarts == before + 1
    assert after.last_exit == "killed by SIGKILL"
    print(f"loss healthy again {took:.0f}s after kill -9")


def test_up_restarts_a_running_but_unhealthy_service_and_leaves_kafka_and_postgres(
    supervised: Stack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stack_module, "RESTART_GRACE_S", 0.0)
    infra = {name: supervised.running_pid(spec(supervised, name)) for name in ("postgres",
                                                                               "kafka")}
    wedged = supervised.running_pid(spec(supervised, "review"))
    assert wedged is not None
    os.kill(wedged, signal.SIGSTOP)  # alive, but answers nothing
    try:
        assert not row(supervised, "review").healthy
        supervised.up()
    finally:
        if stack_module.pid_alive(wedged):
            os.kill(wedged, signal.SIGCONT)
    assert supervised.running_pid(spec(supervised, "review")) not in (None, wedged)
    assert row(supervised, "review").healthy
    assert {name: supervised.running_pid(spec(supervised, name)) for name in infra} == infra


async def test_after_postgres_is_killed_the_status_service_projects_new_events_again(
    supervised: Stack, journey: Journey, citizen: SyntheticCitizen,
) -> None:
    postmaster = kill9(supervised, "postgres")
    # The backends of a killed postmaster linger a moment; the supervisor retries until
    # the new one may start.
    took = wait_until_all_healthy(supervised)
    assert row(supervised, "postgres").pid != postmaster
    await journey_through_every_topic(journey, citizen)
    print(f"healthy again {took:.0f}s after postgres kill -9")


async def test_after_the_broker_is_killed_every_consumer_of_every_service_consumes_again(
    supervised: Stack, journey: Journey, citizen: SyntheticCitizen,
) -> None:
    broker = kill9(supervised, "kafka")
    took = wait_until_all_healthy(supervised)
    assert row(supervised, "kafka").pid != broker
    await journey_through_every_topic(journey, citizen)
    print(f"healthy again {took:.0f}s after broker kill -9")


async def test_two_instances_of_each_service_share_the_partitions_of_their_groups(
    supervised: Stack, journey: Journey, citizen: SyntheticCitizen,
) -> None:
    try:
        supervised.start_services(2)
        names = {r.name for r in supervised.status()}
        assert {"loss", "loss-2", "status", "status-2"} <= names
        pids = {r.name: r.pid for r in supervised.status()}
        assert pids["loss"] != pids["loss-2"]
        # Healthy means every consumer of every instance holds at least one partition.
        wait_until_all_healthy(supervised)
        killed = kill9(supervised, "issuance-2")
        await journey_through_every_topic(journey, citizen)
        wait_until_all_healthy(supervised)
        assert row(supervised, "issuance-2").pid != killed
        seconds = [r.pid for r in supervised.status() if r.name.endswith("-2")]
    finally:
        supervised.start_services(1)
    assert stack_module._wait_gone({pid for pid in seconds if pid}, 60.0)
    assert supervised.instances() == 1
