"""The auditor's checks on in-memory logs: an untouched log passes, and every kind of tampering
is reported with the exact stream and version."""

from __future__ import annotations

import json
import uuid
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from cardctl.audit import (
    CitizenState,
    Failure,
    LogReplayer,
    compare_citizen,
    event_topics,
    timeline_rows,
    verify_messages,
)
from services.status.projection import project
from services.status.timeline import (
    ERASED_DESCRIPTIONS,
    ListedEntry,
    listed_timeline,
    timeline_entry,
)
from shared.consumer import Inbound
from shared.contracts import auth, issuance, loss, review
from shared.contracts.common import SubjectErased
from shared.envelope import EventEnvelope
from tests.builders import CitizenStreams, sealed

PARTITIONS = 6


@dataclass(frozen=True)
class Record:
    """A message as a producer sends it: topic, key, value."""

    topic: str
    key: bytes
    value: bytes

    @property
    def body(self) -> dict[str, object]:
        body: dict[str, object] = json.loads(self.value)
        return body

    def at(self, stream_id: str, version: int) -> bool:
        return self.body["stream_id"] == stream_id and self.body["version"] == version


def citizen_streams(ref: str) -> list[Record]:
    """One citizen's four streams, as the services would publish them, topic by topic."""
    citizen = CitizenStreams(ref)
    streams = {
        "issuance.events": citizen.emit_all("issuance.events",
                                            [issuance.CardIssued(card_no="A0012345")]),
        "auth.events": citizen.emit_all("auth.events", [
            auth.SessionStarted(session_id="s1", channel="wechat-oa",
                                expires_at=datetime(2030, 1, 1, tzinfo=UTC)),
            auth.IdentityVerified(method="realname", session_id="s1"),
            auth.ElectronicCardAuthorized(session_id="s1", channel="wechat-oa"),
        ]),
        "loss.events": citizen.emit_all("loss.events", [loss.LossReported(
            loss_id="l1", kind="formal", card_no="A0012345", expires_at=None,
            financial_freeze=True, channel="wechat-oa")]),
        "review.events": citizen.emit_all("review.events", [
            review.ReissueApplied(application_id="a1", loss_id="l1", old_card_no="enc:v1:x",
                                  address="enc:v1:x", phone="enc:v1:x", photo_ref="enc:v1:x",
                                  pickup_bureau="bureau-001", channel="wechat-oa"),
            review.ReviewApproved(application_id="a1", reviewer_id="r7",
                                  pickup_bureau="bureau-001", old_card_no="enc:v1:x"),
        ]),
    }
    return [Record(topic, ref.encode(), e.to_bytes())
            for topic, events in streams.items() for e in events]


def a_log(citizens: int = 3) -> list[Record]:
    """Several citizens, their events interleaved as concurrent journeys would be."""
    per_citizen = [citizen_streams(f"cr-{uuid.uuid4().hex}") for _ in range(citizens)]
    longest = max(len(records) for records in per_citizen)
    return [records[i] for i in range(longest) for records in per_citizen if i < len(records)]


def as_messages(records: Sequence[Record]) -> list[Inbound]:
    """Records placed on partitions by key, with offsets, as Kafka would store them."""
    next_offset: dict[tuple[str, int], int] = defaultdict(int)
    messages = []
    for r in records:
        partition = zlib.crc32(r.key) % PARTITIONS
        offset = next_offset[r.topic, partition]
        next_offset[r.topic, partition] += 1
        messages.append(Inbound(r.topic, partition, offset, r.key, r.value))
    return messages


def find(records: Sequence[Record], stream_id: str, version: int) -> int:
    return next(i for i, r in enumerate(records) if r.at(stream_id, version))


def altered(records: Sequence[Record], stream_id: str, version: int) -> list[Record]:
    """The event's data changed after it was sealed, its hash left as it was."""
    i = find(records, stream_id, version)
    body = records[i].body | {"data": {"tampered": True}}
    changed = Record(records[i].topic, records[i].key, json.dumps(body).encode())
    return [*records[:i], changed, *records[i + 1:]]


def removed(records: Sequence[Record], stream_id: str, version: int) -> list[Record]:
    i = find(records, stream_id, version)
    return [*records[:i], *records[i + 1:]]


def swapped(records: Sequence[Record], stream_id: str, first: int, second: int) -> list[Record]:
    out = list(records)
    i, j = find(records, stream_id, first), find(records, stream_id, second)
    out[i], out[j] = out[j], out[i]
    return out


def stream_of(records: Sequence[Record], prefix: str) -> str:
    return next(str(r.body["stream_id"]) for r in records
                if str(r.body["stream_id"]).startswith(prefix))


def where(failures: Sequence[Failure]) -> set[tuple[str | None, int | None]]:
    return {(f.stream_id, f.version) for f in failures}


# --- verify -------------------------------------------------------------------------------


def test_an_untouched_log_passes_with_every_stream_and_event_counted() -> None:
    log = a_log(citizens=3)

    report = verify_messages(as_messages(log))

    assert report.ok
    assert report.failures == []
    assert report.streams == 12
    assert report.events == len(log) == 21
    assert report.duplicates == 0
    assert sum(report.messages.values()) == 21


def test_an_altered_payload_is_reported_at_that_stream_and_version_only() -> None:
    log = a_log()
    stream = stream_of(log, "auth-")

    report = verify_messages(as_messages(altered(log, stream, 2)))

    assert not report.ok
    assert where(report.failures) == {(stream, 2)}
    assert "hash does not match" in report.failures[0].reason


def test_a_removed_event_is_reported_at_the_version_after_the_gap() -> None:
    log = a_log()
    stream = stream_of(log, "auth-")

    report = verify_messages(as_messages(removed(log, stream, 2)))

    assert where(report.failures) == {(stream, 3)}
    reasons = {f.reason for f in report.failures}
    assert "expected version 2" in reasons
    assert "prev_hash does not link to the previous event" in reasons


def test_two_swapped_events_are_reported_at_both_of_them() -> None:
    log = a_log()
    stream = stream_of(log, "auth-")

    report = verify_messages(as_messages(swapped(log, stream, 2, 3)))

    assert where(report.failures) == {(stream, 3), (stream, 2)}
    first = report.failures[0]
    assert (first.stream_id, first.version, first.reason) == (stream, 3, "expected version 2")


def test_an_event_id_reused_with_different_content_is_a_failure_at_the_second_use() -> None:
    log = a_log()
    original = log[0].body
    ref = f"cr-{uuid.uuid4().hex}"
    same_id = uuid.UUID(str(original["event_id"]))
    reuse = sealed(f"card-{ref}", ref, issuance.CardIssued(card_no="B0099999"), event_id=same_id)

    report = verify_messages(as_messages([*log, Record("issuance.events", ref.encode(),
                                                       reuse.to_bytes())]))

    assert where(report.failures) == {(f"card-{ref}", 1)}
    assert "reused with different content" in report.failures[0].reason


def test_an_identical_redelivery_is_a_benign_duplicate_and_skipped() -> None:
    log = a_log()
    stream = stream_of(log, "auth-")
    again = [log[find(log, stream, 2)], log[find(log, stream, 3)]]  # the relay re-sent a batch

    report = verify_messages(as_messages([*log, *again]))

    assert report.ok
    assert report.duplicates == 2
    assert report.events == len(log)


def test_an_unparseable_message_is_a_failure_with_its_topic_partition_and_offset() -> None:
    log = as_messages(a_log())
    garbage = Inbound("loss.events", 4, 99, b"k", b"{not json")
    no_envelope = Inbound("loss.events", 4, 100, b"k", json.dumps({"type": "X"}).encode())
    too_deep = Inbound("loss.events", 4, 101, b"k", b"[" * 100_000)  # json.loads recurses

    report = verify_messages([*log, garbage, no_envelope, too_deep])

    assert [(f.topic, f.partition, f.offset, f.stream_id) for f in report.failures] == [
        ("loss.events", 4, 99, None), ("loss.events", 4, 100, None),
        ("loss.events", 4, 101, None)]
    assert report.failures[0].reason.startswith("unparseable")
    assert report.failures[2].reason.startswith("unparseable")


def test_a_stream_continued_on_another_partition_is_a_failure() -> None:
    log = a_log()
    stream = stream_of(log, "auth-")
    messages = as_messages(log)
    i = find(log, stream, 3)
    moved = messages[i]
    messages[i] = Inbound(moved.topic, (moved.partition + 1) % PARTITIONS, 500, moved.key,
                          moved.value)

    report = verify_messages(messages)

    assert where(report.failures) == {(stream, 3)}
    assert "stream is on" in report.failures[0].reason


# --- replay -------------------------------------------------------------------------------


def replayed(records: Sequence[Record], only: str | None = None) -> LogReplayer:
    replayer = LogReplayer(event_topics(""), only)
    for msg in as_messages(records):
        replayer.feed(msg)
    return replayer


def test_replay_folds_each_citizen_as_the_live_projection_does_and_skips_redeliveries() -> None:
    log = a_log(citizens=2)
    ref = str(log[0].body["citizen_ref"])
    mine = [r for r in log if r.body["citizen_ref"] == ref]

    replayer = replayed([*log, mine[0]], only=ref)

    assert set(replayer.citizens) == {ref}
    assert replayer.duplicates == 1
    state = replayer.citizens[ref]
    row = None
    for r in mine:
        row = project(row, EventEnvelope.model_validate_json(r.value))
    assert state.row == row
    assert state.row.status == "REISSUE_APPLIED"
    assert [e.event_id for e in state.entries] == [str(r.body["event_id"]) for r in mine]


def test_replay_skips_what_the_live_consumer_would_dead_letter() -> None:
    log = a_log(citizens=1)
    stream = stream_of(log, "loss-")

    replayer = replayed(altered(log, stream, 1))

    assert replayer.skipped == {"bad_hash": 1}
    [state] = replayer.citizens.values()
    assert state.row.loss_kind is None


def live_view(state: CitizenState) -> tuple[dict[str, object], list[dict[str, object]]]:
    """What the query functions would return for a projection that agrees with the log."""
    return state.row.public(), timeline_rows(state.entries)


def test_comparison_agrees_with_an_identical_projection_and_names_a_differing_field() -> None:
    [state] = replayed(a_log(citizens=1)).citizens.values()
    ref = state.row.citizen_ref
    card, timeline = live_view(state)
    assert compare_citizen(ref, state, card, timeline) == []

    wrong = card | {"status": "ACTIVE"}
    [difference] = compare_citizen(ref, state, wrong, timeline)
    assert (difference.citizen_ref, difference.field) == (ref, "status")
    assert (difference.log_value, difference.live_value) == ("REISSUE_APPLIED", "ACTIVE")


def test_comparison_reports_a_missing_timeline_entry_and_a_missing_row() -> None:
    [state] = replayed(a_log(citizens=1)).citizens.values()
    ref = state.row.citizen_ref
    card, timeline = live_view(state)

    fields = {d.field for d in compare_citizen(ref, state, card, timeline[:-1])}
    assert "timeline.entries" in fields
    assert {d.field for d in compare_citizen(ref, state, None, timeline)} == {"card_status"}


def test_comparison_takes_times_as_instants_whatever_their_offset() -> None:
    [state] = replayed(a_log(citizens=1)).citizens.values()
    card, timeline = live_view(state)
    beijing = timezone(timedelta(hours=8))
    shifted = datetime.fromisoformat(str(card["updated_at"])).astimezone(beijing)

    same = card | {"updated_at": shifted.isoformat()}
    assert compare_citizen(state.row.citizen_ref, state, same, timeline) == []


def test_timeline_entries_come_in_the_api_order_whatever_order_they_arrived_in() -> None:
    records = citizen_streams(f"cr-{uuid.uuid4().hex}")
    entries = [timeline_entry(EventEnvelope.model_validate_json(r.value), r.topic)
               for r in records]

    rows = timeline_rows(entries)

    assert rows == timeline_rows(reversed(entries))
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    keys = [(e.occurred_at, e.stream_id, e.version) for e in entries]
    assert [r["event_id"] for r in rows] == [entries[keys.index(k)].event_id for k in sorted(keys)]


def test_the_replay_lists_an_erased_citizens_timeline_as_the_live_api_does() -> None:
    ref = f"cr-{uuid.uuid4().hex}"
    records = citizen_streams(ref)
    last = EventEnvelope.model_validate_json(records[-1].value)
    erased = CitizenStreams(ref).after(last).emit("review.events", SubjectErased(reason="asked"))
    records.append(Record("review.events", ref.encode(), erased.to_bytes()))
    [state] = replayed(records).citizens.values()

    # The live API lists the stored (pure) lines and rewrites them for an erased citizen.
    ordered = sorted(state.entries, key=lambda e: (e.occurred_at, e.stream_id, e.version))
    live = listed_timeline((ListedEntry(e.event_id, e.type, e.occurred_at, e.description)
                            for e in ordered), erased=True)
    assert compare_citizen(ref, state, state.row.public(), live) == []
    log_lines = {row["type"]: row["description"] for row in timeline_rows(
        state.entries, erased=state.row.sub_states.erased)}
    assert log_lines["ReissueApplied"] == ERASED_DESCRIPTIONS["ReissueApplied"]
    # A listing that left the stored lines as they are would be reported.
    assert compare_citizen(ref, state, state.row.public(),
                           timeline_rows(state.entries, erased=False)) != []
