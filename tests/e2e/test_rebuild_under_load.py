"""A projection rebuild while every service runs as its own process and journeys keep sending
commands: after the swap no status row is stale and no timeline misses an event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from cardctl.journey import Journey, Session
from cardctl.operations import seed
from services.status.rebuild import RebuildSettings, rebuild
from shared.masking import mask_card_no
from shared.settings import CardDeskSettings
from shared.topics import SERVICES

pytestmark = pytest.mark.integration

CITIZENS = 30
AT_ONCE = 10  # three waves, so that commands flow before, during and after the rebuild


def steps_done(sessions: list[Session]) -> int:
    return sum(len(s.log) for s in sessions)


async def test_a_rebuild_amid_thirty_journeys_leaves_no_row_stale_and_no_event_lost(
    journey: Journey, settings: CardDeskSettings, tmp_path: Path,
) -> None:
    citizens = await seed(settings, CITIZENS, tmp_path / "rebuild.jsonl", report=lambda _: None)
    sessions = [Session(c) for c in citizens]
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(session: Session) -> None:
        async with gate:
            await journey.whole(session)

    driving = asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)
    while steps_done(sessions) < AT_ONCE * 3:  # under way
        await asyncio.sleep(0.05)
    started_at = steps_done(sessions)

    async def commands_kept_flowing() -> None:
        while steps_done(sessions) < started_at + AT_ONCE and not driving.done():
            await asyncio.sleep(0.05)

    report = await rebuild(RebuildSettings(), before_swap=commands_kept_flowing)
    outcomes = await driving

    assert [o for o in outcomes if isinstance(o, BaseException)] == []
    assert report.applied > 0
    assert report.old_tables == []
    conn = await asyncpg.connect(settings.database_url)
    try:
        for session in sessions:
            row = await journey.wait_for_status(session.citizen_ref, "ACTIVE", timeout_s=120)
            assert row["card_no_masked"] != mask_card_no(session.citizen.card_no)
            stored = {str(r["event_id"]) for r in await conn.fetch(
                " UNION ALL ".join(f"SELECT event_id FROM {schema}.events WHERE citizen_ref = $1"
                                   for schema in SERVICES),
                session.citizen_ref)}
            timeline = await journey.wait_for_timeline(session.citizen_ref, "CardCollected",
                                                       "LossClosed")
            ids = [e["event_id"] for e in timeline]
            for _ in range(100):  # other topics may still be on their way
                if set(ids) >= stored:
                    break
                await asyncio.sleep(0.1)
                ids = [e["event_id"] for e in await journey.timeline(session.citizen_ref)]
            assert sorted(ids) == sorted(stored)  # every event once: none lost, none twice
    finally:
        await conn.close()
