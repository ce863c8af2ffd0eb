"""Audit runs started from the console read the real log to its end, one at a time."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from services.console.audits import AuditBusyError, AuditRunner
from services.status.adapters import status_ddl
from shared.eventstore import migrate
from shared.settings import CardDeskSettings
from tests.support import unique

pytestmark = pytest.mark.integration


@pytest.fixture
async def status_schema(settings: CardDeskSettings) -> AsyncIterator[str]:
    """An empty status projection of its own: the replay compares the log with it."""
    schema = unique("st")
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        await migrate(pool, schema, status_ddl(schema))
        yield schema
    finally:
        await pool.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await pool.close()


async def test_a_verification_runs_to_its_end_with_progress_and_a_summary(
        settings: CardDeskSettings, status_schema: str) -> None:
    runner = AuditRunner(settings, status_schema, lambda: datetime.now(UTC))
    job = runner.start("verify", None, "auditor-1")
    with pytest.raises(AuditBusyError):
        runner.start("replay", None, "auditor-2")
    async with asyncio.timeout(120):
        await runner.wait(job)
    assert job.state in ("passed", "failed"), job.summary
    assert re.fullmatch(r"\d+ streams, \d+ events, \d+ benign duplicates, \d+ failures",
                        job.summary[0])
    done, total = job.done_total
    assert total is not None and done == total
    assert job.percent == 100
    assert job.finished_at is not None and job.started_by == "auditor-1"
    # Finished: the next run may start.
    second = runner.start("replay", "0" * 64, "auditor-2")
    async with asyncio.timeout(120):
        await runner.wait(second)
    assert second.state == "failed"  # nobody has that citizen_ref: an unknown citizen
    assert any(line.startswith("unknown citizen") for line in second.summary)
