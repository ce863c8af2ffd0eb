"""`cardctl audit verify` on copies of the log in Kafka: an untouched copy passes, and each
tampered copy fails naming the exact stream and version."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from typer.testing import CliRunner

from cardctl.audit import CONTRACT_TOPICS, audit_app
from shared.outbox import make_producer
from shared.settings import CardDeskSettings
from tests.support import create_topics, kafka_options
from tests.unit.test_audit import Record, a_log, altered, removed, stream_of, swapped

pytestmark = pytest.mark.integration



class LogCopies:
    """Writes copies of a log to isolated topics (`<prefix>auth.events`…), keyed by
    citizen_ref as the outbox relay does, and deletes them all at the end."""

    def __init__(self, settings: CardDeskSettings) -> None:
        self.settings = settings
        self.prefixes: list[str] = []

    async def write(self, records: Sequence[Record]) -> str:
        prefix = f"audit-{uuid.uuid4().hex[:10]}."
        self.prefixes.append(prefix)
        await create_topics(self.settings.kafka_bootstrap,
                            [f"{prefix}{t}" for t in CONTRACT_TOPICS], self.settings.partitions)
        producer = make_producer(self.settings)
        await producer.start()
        try:
            for r in records:  # one at a time: the log order is the order written
                await producer.send_and_wait(f"{prefix}{r.topic}", value=r.value, key=r.key)
        finally:
            await producer.stop()
        return prefix

    async def delete(self) -> None:
        if not self.prefixes:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap,
                                    **kafka_options())
        await admin.start()
        try:
            await admin.delete_topics([f"{p}{t}" for p in self.prefixes for t in CONTRACT_TOPICS])
        finally:
            await admin.close()


@pytest.fixture
async def copies(settings: CardDeskSettings) -> AsyncIterator[LogCopies]:
    copies = LogCopies(settings)
    try:
        yield copies
    finally:
        await copies.delete()


def verify(settings: CardDeskSettings, prefix: str) -> tuple[int, str]:
    result = CliRunner().invoke(audit_app, ["verify", "--topic-prefix", prefix,
                                            "--bootstrap", settings.kafka_bootstrap])
    return result.exit_code, result.output


async def run_verify(settings: CardDeskSettings, prefix: str) -> tuple[int, str]:
    # The command runs its own event loop: keep it off this test's loop.
    return await asyncio.to_thread(verify, settings, prefix)


async def test_an_untouched_copy_of_the_log_verifies(copies: LogCopies,
                                                     settings: CardDeskSettings) -> None:
    log = a_log(citizens=4)
    prefix = await copies.write(log)

    code, output = await run_verify(settings, prefix)

    assert code == 0, output
    assert f"16 streams, {len(log)} events, 0 benign duplicates, 0 failures" in output
    for topic in CONTRACT_TOPICS:
        assert f"topic {prefix}{topic}:" in output


async def test_a_redelivered_batch_in_the_copy_is_benign(copies: LogCopies,
                                                         settings: CardDeskSettings) -> None:
    log = a_log(citizens=2)
    auth_records = [r for r in log if r.topic == "auth.events"][:2]
    prefix = await copies.write([*log, *auth_records])

    code, output = await run_verify(settings, prefix)

    assert code == 0, output
    assert "2 benign duplicates, 0 failures" in output


@pytest.mark.parametrize(("tamper", "expected"), [
    (lambda log, s: altered(log, s, 2), [(2, "hash does not match the event's content")]),
    (lambda log, s: removed(log, s, 2), [(3, "expected version 2"),
                                         (3, "prev_hash does not link to the previous event")]),
    (lambda log, s: swapped(log, s, 2, 3), [(3, "expected version 2"), (2, "expected version 4")]),
], ids=["payload-altered", "event-removed", "events-swapped"])
async def test_a_tampered_copy_fails_naming_the_stream_and_version(
    copies: LogCopies, settings: CardDeskSettings,
    tamper: Callable[[list[Record], str], list[Record]], expected: list[tuple[int, str]],
) -> None:
    log = a_log(citizens=3)
    stream = stream_of(log, "auth-")
    prefix = await copies.write(tamper(log, stream))

    code, output = await run_verify(settings, prefix)

    assert code == 1, output
    for version, reason in expected:
        assert any(line.startswith(f"  FAIL {stream} v{version} at {prefix}auth.events[")
                   and line.endswith(reason) for line in output.splitlines()), output
    failing = {line.split()[1] for line in output.splitlines() if line.startswith("  FAIL")}
    assert failing == {stream}
