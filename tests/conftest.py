"""Session-wide fixtures: settings, and Kafka + PostgreSQL brought up once per test session.

If both already answer on the configured addresses (CI or a developer ran
`cardctl stack up`), the session uses them and leaves them running. Otherwise it starts
them with `cardctl.stack` and stops at the end exactly what it started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# The tests run in development (development secrets, the dev channels file), whatever the
# shell says; the services they start as processes inherit it.
os.environ["CARDDESK_ENV"] = "development"

from cardctl.stack import Stack, contract_topics, ensure_topics, run_sync
from shared.settings import CardDeskSettings


@pytest.fixture(scope="session")
def settings() -> CardDeskSettings:
    return CardDeskSettings()


@pytest.fixture(scope="session")
def stack(settings: CardDeskSettings) -> Iterator[Stack]:
    """Kafka and PostgreSQL answering, with every topic of the contract created."""
    local = Stack(settings, report=lambda line: print(f"[stack] {line}"))
    if local.infra_answers():
        # Tests run services in-process on the contract's topics; a running local service
        # would process their commands too. The e2e package starts its own.
        local.down(only=[spec.name for spec in local.service_specs()])
        run_sync(lambda: ensure_topics(settings.kafka_bootstrap, contract_topics(settings)))
        yield local
        return
    # Services are not started here: integration tests drive the code in-process.
    started = local.up(services=False)
    try:
        yield local
    finally:
        local.down(only=started)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test marked `integration` gets the stack without asking for it."""
    for item in items:
        if not isinstance(item, pytest.Function) or not item.get_closest_marker("integration"):
            continue
        if "stack" not in item.fixturenames:
            item.fixturenames.insert(0, "stack")  # before module fixtures that need it
