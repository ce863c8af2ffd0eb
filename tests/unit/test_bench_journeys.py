"""bench.journeys: a poll the server cut off is asked again, and a citizen a phase left
half-way sits out the later phases instead of stretching them."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from bench import journeys
from bench.journeys import Meter, paced, still_going, visible_after
from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Session


def citizen(n: int) -> SyntheticCitizen:
    # Synthetic: no one's data.
    return SyntheticCitizen(id_number=f"synthetic-{n}", name=f"citizen {n}",
                            face_embedding=[0.0], card_no=f"card-{n}")


async def test_a_poll_cut_off_by_the_server_is_asked_again() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json={"status": "LOST"})

    meter = Meter()
    session = Session(citizen(1), citizen_ref="ref-1")
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer),
                                 base_url="http://status") as client:
        await visible_after(client, meter, session, time.monotonic())
    assert calls == 2
    assert len(meter.visible_latencies) == 1
    assert meter.failures == []


class StubJourney:
    """A journey whose loss report is refused for one citizen, as for a loss in force."""

    def __init__(self, refused: str) -> None:
        self.api_headers: dict[str, str] = {}
        self.refused = refused
        self.started: list[str] = []

    async def log_in(self, s: Session) -> None:
        self.started.append(s.citizen.id_number)

    async def verify_portrait(self, s: Session) -> None:
        return None

    async def report_loss(self, s: Session, kind: str) -> None:
        if s.citizen.id_number == self.refused:
            raise RuntimeError("already_lost")

    async def apply_for_reissue(self, s: Session) -> None:
        return None

    async def collect(self, s: Session) -> None:
        return None


async def test_a_citizen_left_half_way_sits_out_the_later_phases(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def seen_at_once(client: httpx.AsyncClient, meter: Meter, session: Session,
                           sent: float) -> None:
        meter.visible_latencies.append(0.0)

    monkeypatch.setattr(journeys, "visible_after", seen_at_once)
    monkeypatch.setattr(journeys, "IDLE_WAIT_S", 1.0)
    left_behind: set[str] = set()
    sessions = [Session(citizen(1)), Session(citizen(2))]
    journey: Any = StubJourney(refused="synthetic-1")

    first = Meter(left_behind=left_behind)
    await paced(journey, first, sessions, rate=60.0, seconds=0.35, status="http://status")
    assert left_behind == {"synthetic-1"}
    assert len(first.failures) == 1 and "report_loss" in first.failures[0]
    assert first.journeys >= 2  # the other citizen went round again

    journey.started.clear()
    second = Meter(left_behind=left_behind)
    await paced(journey, second, still_going(sessions, left_behind), rate=60.0,
                seconds=0.35, status="http://status")
    assert second.failures == []
    assert set(journey.started) == {"synthetic-2"}
