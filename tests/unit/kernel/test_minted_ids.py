"""The ids the services mint are time-ordered: an index keyed by them (the followers'
`processed` rows, the events' `event_id`, the timeline) takes each new key beside the last
one instead of on a random page, which after every checkpoint would cost a full page in
PostgreSQL's write-ahead log."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from shared.application import StateCache, handle_command
from shared.contracts.loss import LossCancelled
from shared.decider import Decider, new_uuid
from shared.envelope import EventEnvelope
from shared.events import EventMeta
from shared.eventstore import InMemoryEventStore

META = EventMeta("ref", datetime(2026, 1, 1, tzinfo=UTC), "c", "c")
COUNTER: Decider[None, int, EventEnvelope, None] = Decider(
    initial=0, evolve=lambda state, _e: state + 1, decide=lambda _c, _s, _x: [],
    decode=lambda envelope: envelope, stream_id=lambda ref: ref, is_erased=lambda _s: False)


def minted_apart(mint: Callable[[], object], times: int = 4) -> list[str]:
    ids = []
    for _ in range(times):
        ids.append(str(mint()))
        time.sleep(0.002)  # the next millisecond at least
    return ids


def test_the_services_id_source_mints_version_7_ids_in_the_order_minted() -> None:
    ids = minted_apart(new_uuid)
    assert {uuid.UUID(i).version for i in ids} == {7}
    assert sorted(ids) == ids
    assert len(set(ids)) == len(ids)


async def test_event_ids_sort_in_the_order_the_events_were_appended() -> None:
    store, cache = InMemoryEventStore(), StateCache()
    appended: list[str] = []
    for _ in range(4):
        envelopes = await handle_command(store, COUNTER, "s", lambda _: [LossCancelled(
            loss_id="l")], META, cache)
        appended.extend(str(e.event_id) for e in envelopes)
        await asyncio.sleep(0.002)
    assert {uuid.UUID(i).version for i in appended} == {7}
    assert sorted(appended) == appended
