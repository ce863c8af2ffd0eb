"""The running stack matches the contract: topics, partitions, retention, and the database."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import (
    ConfigResource,
    ConfigResourceType,
)

from cardctl.stack import Stack, StackError, contract_topics
from shared.settings import CardDeskSettings
from tests.support import kafka_options

pytestmark = pytest.mark.integration


async def test_every_contract_topic_exists_with_the_configured_partition_count(
    settings: CardDeskSettings,
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **kafka_options())
    await admin.start()
    try:
        expected = {t.name: t.partitions for t in contract_topics(settings)}
        described = await admin.describe_topics(list(expected))
    finally:
        await admin.close()
    actual = {d["topic"]: len(d["partitions"]) for d in described if d["error_code"] == 0}
    assert actual == expected


async def _topic_configs(settings: CardDeskSettings, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, **kafka_options())
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    finally:
        await admin.close()
    found = {}
    for response in responses:
        for _code, _msg, _type, name, entries in response.resources:
            found[name] = {entry[0]: entry[1] for entry in entries}
    return found


async def test_event_topics_keep_their_data_forever(settings: CardDeskSettings) -> None:
    forever = [t.name for t in contract_topics(settings) if t.name.endswith(".events")]
    assert len(forever) == 4
    found = await _topic_configs(settings, forever)
    for name in forever:
        assert found[name]["retention.ms"] == "-1", name
        assert found[name]["retention.bytes"] == "-1", name


async def test_command_topics_keep_personal_data_for_days_not_forever(
    settings: CardDeskSettings,
) -> None:
    commands = [t.name for t in contract_topics(settings)
                if t.name.endswith(".commands") or t.name.startswith("channel.replies.")]
    assert "channel.replies.wechat-oa" in commands
    found = await _topic_configs(settings, commands)
    for name in commands:
        assert found[name]["retention.ms"] == str(7 * 86_400_000), name


async def test_the_application_role_owns_its_database(settings: CardDeskSettings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        owner = await conn.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        )
        assert owner == await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()


def test_a_second_up_on_a_running_stack_starts_nothing(stack: Stack) -> None:
    if not all(s.alive for s in stack.status() if s.name in ("postgres", "kafka")):
        pytest.skip("Kafka and PostgreSQL were started outside this stack's state dir")
    assert stack.up(services=False) == []


def test_a_failed_up_stops_nothing_that_ran_before_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch,
) -> None:
    infra = {s.name: s.pid for s in stack.status() if s.name in ("postgres", "kafka")}
    if not all(infra.values()):
        pytest.skip("Kafka and PostgreSQL were started outside this stack's state dir")

    def broken(_self: Stack, _instances: int | None = None) -> list[str]:
        raise StackError("a service did not become healthy")

    monkeypatch.setattr(Stack, "start_services", broken)
    with pytest.raises(StackError):
        stack.up()
    assert {s.name: s.pid for s in stack.status() if s.name in infra} == infra
    assert all(s.healthy for s in stack.status() if s.name in infra)


def test_more_instances_than_partitions_are_refused(stack: Stack) -> None:
    with pytest.raises(StackError, match="CARDDESK_PARTITIONS"):
        stack.up(instances=stack.settings.partitions + 1)
