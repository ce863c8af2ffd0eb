"""The fault-injection suite, short: a few citizens' journeys while each kind of fault hits
the real stack once — a service killed, the broker killed, the postmaster killed, a service
stopped for 10 s, the follower/command race, poison on every topic — and the same checks as
`python -m bench.faults`. Named to run last in the e2e package: it kills the broker and the
database, and leaves every component healthy again for what follows."""

from __future__ import annotations

import pytest

from bench.faults import FaultPlan, print_findings, run
from shared.settings import CardDeskSettings
from tests.e2e.conftest import E2E_ENVIRONMENT

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SHORT = FaultPlan(
    citizens=4,
    seed=20261129,
    kill_services=("loss",),
    pause=("review",),
    pause_seconds=10.0,
    race_rounds=6,
    gap_seconds=(2.0, 4.0),
    think_seconds=(0.0, 0.3),
    come_back_s=5.0,
    recovery_bound_s=150.0,
    finish_bound_s=300.0,
    # A process the suite restarts gets the settings the e2e package started them with.
    environment=E2E_ENVIRONMENT,
)


async def test_journeys_lose_nothing_and_duplicate_nothing_under_every_kind_of_fault(
    settings: CardDeskSettings, services: list[str],
) -> None:
    found = await run(settings, SHORT, report=print)
    print_findings(SHORT, found)
    assert found.missed() == [], "\n".join(
        [*found.missed(), *found.failed, *found.effects, *found.timeline,
         *found.card_invariant, *found.status_invariant, *found.verify_problems,
         *found.replay_problems, *found.dlq_problems][:60])
    # Every fault was injected and each kind measured, not skipped.
    assert sorted({f.kind.split(" ")[0] for f in found.faults}) == [
        "SIGSTOP", "kill", "poison", "race"]
    assert {f.target for f in found.faults if f.kind == "kill -9"} == {
        "loss", "kafka", "postgres"}
    assert sum(found.race_outcomes.values()) >= SHORT.race_rounds
    assert found.poison_replies and found.dlq
