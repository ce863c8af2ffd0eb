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
from shared.identity import citizen_ref
from shared.masking import mask_card_no
from shared.settings import CardDeskSettings
from shared.topics import SERVICES
from tests.support import eventually

pytestmark = pytest.mark.integration

CITIZENS = 30
AT_ONCE = 10  # three waves, so that commands flow before, during and after the rebuild


def steps_done(sessions: list[Session]) -> int:
    return sum(len(s.log) for s in sessions)


async def stored_events(conn: asyncpg.Connection, ref: str) -> set[str]:
    """Every event the services stored for one citizen."""
    records = await conn.fetch(
        " UNION ALL ".join(f"SELECT event_id FROM {schema}.events WHERE citizen_ref = $1"
                           for schema in SERVICES), ref)
    return {str(r["event_id"]) for r in records}


async def assert_projected_completely(journey: Journey, conn: asyncpg.Connection,
                                      session: Session) -> None:
    """The citizen's row shows the new card, and the timeline every stored event once."""
    row = await journey.wait_for_status(session.citizen_ref, "ACTIVE", timeout_s=120)
    assert row["card_no_masked"] != mask_card_no(session.citizen.card_no)
    stored = await stored_events(conn, session.citizen_ref)
    timeline = await journey.wait_for_timeline(session.citizen_ref, "CardCollected",
                                               "LossClosed")
    ids = [e["event_id"] for e in timeline]
    for _ in range(100):  # other topics may still be on their way
        if set(ids) >= stored:
            break
        await asyncio.sleep(0.1)
        ids = [e["event_id"] for e in await journey.timeline(session.citizen_ref)]
    assert sorted(ids) == sorted(stored)  # every event once: none lost, none twice


async def test_a_rebuild_amid_thirty_journeys_leaves_no_row_stale_and_no_event_lost(
    journey: Journey, settings: CardDeskSettings, tmp_path: Path,
) -> None:
    citizens = await seed(settings, CITIZENS, tmp_path / "rebuild.jsonl", report=lambda _: None)
    sessions = [Session(c) for c in citizens]
    pepper = settings.citizen_ref_pepper.get_secret_value()
    refs = [citizen_ref(pepper, c.id_number) for c in citizens]
    for ref in refs:  # the live consumer is at work (its group has settled)
        await journey.wait_for_status(ref, "ACTIVE")
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(session: Session) -> None:
        async with gate:
            await journey.whole(session)

    driving = asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)

    async def under_way() -> bool:
        return steps_done(sessions) >= AT_ONCE * 3 or driving.done()

    await eventually(under_way, timeout_s=120)
    started_at = steps_done(sessions)

    async def more_steps_done() -> bool:
        return steps_done(sessions) >= started_at + AT_ONCE or driving.done()

    conn = await asyncpg.connect(settings.database_url)

    async def commands_kept_flowing_and_were_projected_live() -> None:
        """Events the live consumer applied to the old tables after the load's snapshot: only
        the swap's last read brings them into the new ones."""
        await eventually(more_steps_done, timeout_s=120)
        stored = {ref: await stored_events(conn, ref) for ref in refs}

        async def projected() -> bool:
            for ref, ids in stored.items():
                if not ids <= {e["event_id"] for e in await journey.timeline(ref)}:
                    return False
            return True

        await eventually(projected, timeout_s=60)

    try:
        # Two load processes, as a log of 100,000 events or more would have.
        report = await rebuild(RebuildSettings(rebuild_processes=2, rebuild_split_min_events=0),
                               before_swap=commands_kept_flowing_and_were_projected_live)
        outcomes = await driving

        assert [o for o in outcomes if isinstance(o, BaseException)] == []
        assert report.applied > 0
        assert report.old_tables == []
        for session in sessions:
            await assert_projected_completely(journey, conn, session)
    finally:
        await conn.close()
