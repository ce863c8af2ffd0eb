"""End-to-end: every service runs as its own process against the real Kafka and PostgreSQL.

The services are started once for this package with short, test-friendly regional
settings, and stopped when the package is done, so the in-process integration tests that
follow do not share topics with them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cardctl.channel import ChannelSimulator
from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Journey, Session
from cardctl.operations import seed, status_url
from cardctl.stack import Stack
from shared.settings import CardDeskSettings

# Per-region settings for the journeys under test (DESIGN: configuration, never literals).
E2E_ENVIRONMENT = {
    "CARDDESK_LOSS_TEMPORARY_PERIOD": "PT4S",
    "CARDDESK_LOSS_EXPIRY_SCAN_INTERVAL": "PT0.5S",
    "CARDDESK_ISSUANCE_PRODUCTION_SECONDS": "0",
}


@pytest.fixture(scope="package")
def services(stack: Stack) -> Iterator[list[str]]:
    # A developer's running services have other settings: replace them for this package.
    stack.down(only=[spec.name for spec in stack.service_specs()])
    saved = {key: os.environ.get(key) for key in E2E_ENVIRONMENT}
    os.environ.update(E2E_ENVIRONMENT)
    try:
        started = stack.start_services()
    except BaseException:
        # One that never became healthy must not leave the others answering later tests.
        stack.down(only=[spec.name for spec in stack.service_specs()])
        raise
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield started
    stack.down(only=started)


@pytest.fixture
async def sim(settings: CardDeskSettings, services: list[str]) -> AsyncIterator[ChannelSimulator]:
    async with ChannelSimulator.for_settings(settings) as simulator:
        yield simulator


@pytest.fixture
def journey(sim: ChannelSimulator, settings: CardDeskSettings) -> Journey:
    return Journey(sim, status_url(settings))


@pytest.fixture
async def citizen(settings: CardDeskSettings, services: list[str],
                  tmp_path: Path) -> SyntheticCitizen:
    [one] = await seed(settings, 1, tmp_path / "citizen.jsonl", report=lambda _: None)
    return one


@pytest.fixture
async def other_citizen(settings: CardDeskSettings, services: list[str],
                        tmp_path: Path) -> SyntheticCitizen:
    [one] = await seed(settings, 1, tmp_path / "other.jsonl", report=lambda _: None)
    return one


@pytest.fixture
async def logged_in(journey: Journey, citizen: SyntheticCitizen) -> Session:
    session = Session(citizen)
    await journey.log_in(session)
    await journey.wait_for_status(session.citizen_ref, "ACTIVE")
    return session
