"""`shared.chain.judge`: what a follower does with each event, given what `followed_chain`
holds, including rows that are settled (old) or purged (behind the stream's last)."""

from __future__ import annotations

from shared.chain import ChainView, judge
from shared.contracts.loss import LossCancelled
from shared.envelope import EventEnvelope
from tests.builders import CitizenStreams, sealed


def stream(n: int) -> list[EventEnvelope]:
    return CitizenStreams("c").append_all("s-c", [LossCancelled(loss_id=f"l{i}")
                                                   for i in range(n)])


def recorded(*events: EventEnvelope, settled: bool = False) -> ChainView:
    """A view holding `events`' rows (all settled, or none), the last as the stream's head."""
    view = ChainView(heads={"s-c": max(e.version for e in events)})
    for event in events:
        view.known[(event.stream_id, event.version)] = event.hash
        if settled:
            view.settled.add((event.stream_id, event.version))
    return view


def test_a_recent_redelivery_is_taken_again_so_that_its_processed_row_decides() -> None:
    first, second = stream(2)
    verdicts = judge([second], recorded(first, second))
    assert verdicts.taken == [second]
    assert verdicts.breaks == []
    assert verdicts.settled == []


def test_a_redelivery_of_an_event_taken_long_ago_is_settled_and_skipped() -> None:
    first, second = stream(2)
    verdicts = judge([first, second], recorded(first, second, settled=True))
    assert verdicts.settled == [first, second]
    assert verdicts.taken == []
    assert verdicts.breaks == []


def test_events_whose_rows_were_purged_behind_the_streams_last_are_settled() -> None:
    events = stream(4)
    view = ChainView(heads={"s-c": 3})  # rows 1 and 2 purged, 3 kept (and its read missed)
    view.known[("s-c", 3)] = events[2].hash
    view.settled.add(("s-c", 3))
    verdicts = judge(events, view)
    assert verdicts.settled == events[:3]
    assert verdicts.taken == [events[3]]  # chains onto the kept last row
    assert verdicts.breaks == []


def test_a_fork_at_a_settled_version_is_still_a_break() -> None:
    first, second = stream(2)
    fork = sealed("s-c", "c", LossCancelled(loss_id="x"), version=2, prev_hash=first.hash)
    verdicts = judge([fork], recorded(first, second, settled=True))
    assert [b.envelope for b in verdicts.breaks] == [fork]
    assert "another event holds this version" in str(verdicts.breaks[0])


def test_a_gap_ahead_of_the_streams_last_is_still_a_break() -> None:
    events = stream(4)
    verdicts = judge([events[3]], recorded(events[0], events[1], settled=True))
    assert [b.envelope for b in verdicts.breaks] == [events[3]]
    assert "never seen" in str(verdicts.breaks[0])


def test_a_stream_never_seen_is_taken_from_wherever_it_starts_and_then_holds_its_place() -> None:
    events = stream(4)
    verdicts = judge([events[2], events[3], events[0]], ChainView())
    assert verdicts.taken == [events[2], events[3]]
    assert verdicts.settled == [events[0]]  # behind where the follower started
