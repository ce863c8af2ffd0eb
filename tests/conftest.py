"""Session-wide fixtures: settings, and Kafka + PostgreSQL brought up once per test session.

If both already answer on the configured addresses (CI or a developer ran
`cardctl stack up`), the session uses them and leaves them running. Otherwise it starts
them with `cardctl.stack` and stops at the end exactly what it started.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

# The tests run in development (development secrets, the dev channels file), whatever the
# shell says; the services they start as processes inherit it.
os.environ["CARDDESK_ENV"] = "development"

from cardctl.stack import Stack
from shared.settings import CardDeskSettings


@pytest.fixture(scope="session")
def settings(stack: Stack) -> CardDeskSettings:
    """The session's settings, with the administrator's Kafka credentials once the stack runs
    (tests are plumbing: they create topics and play every role)."""
    return CardDeskSettings()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """Kafka and PostgreSQL answering, with every topic of the contract created; for the
    session, CARDDESK_KAFKA_USER/PASSWORD name the stack's administrator, so that every
    settings object a test builds authenticates."""
    local = Stack(CardDeskSettings(), report=lambda line: print(f"[stack] {line}"))
    if local.infra_answers():
        # Tests run services in-process on the contract's topics; a running local service
        # would process their commands too. The e2e package starts its own.
        local.down(only=[spec.name for spec in local.service_specs()])
        local.ensure_topics_and_access()
        with admin_environment(local):
            yield local
        return
    # Services are not started here: integration tests drive the code in-process.
    started = local.up(services=False)
    try:
        with admin_environment(local):
            yield local
    finally:
        local.down(only=started)


@contextlib.contextmanager
def admin_environment(local: Stack) -> Iterator[None]:
    admin = local.admin_settings()
    if admin.kafka_user is None or "CARDDESK_KAFKA_USER" in os.environ:
        yield
        return
    password = admin.kafka_password.get_secret_value() if admin.kafka_password else ""
    os.environ["CARDDESK_KAFKA_USER"], os.environ["CARDDESK_KAFKA_PASSWORD"] = (
        admin.kafka_user, password)
    try:
        yield
    finally:
        os.environ.pop("CARDDESK_KAFKA_USER", None)
        os.environ.pop("CARDDESK_KAFKA_PASSWORD", None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test marked `integration` gets the stack without asking for it."""
    for item in items:
        if not isinstance(item, pytest.Function) or not item.get_closest_marker("integration"):
            continue
        if "stack" not in item.fixturenames:
            item.fixturenames.insert(0, "stack")  # before module fixtures that need it
