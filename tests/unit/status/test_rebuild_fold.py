"""The fast paths give exactly what the exact ones give: `parse_event`'s orjson path takes only
what its exact path takes, as the same envelope; the rebuild's fold gives the same status and
timeline rows as the live projection, and skips what the live consumer refuses; a fold that
adopts another process's fold carries on as one fold would."""

from __future__ import annotations

import json
import random
import uuid
from datetime import timedelta

import pytest
from aiokafka import TopicPartition

from services.status.adapters import card_record, status_follower
from services.status.projection import CardStatusRow, project
from services.status.rebuild import (
    FoldState,
    ProjectionFold,
    RebuildSettings,
    TopicReader,
    UnsplittableLogError,
)
from services.status.timeline import timeline_entry
from shared.consumer import Inbound, MessageLimits, Rejected, _parse_exact, _parse_fast
from shared.contracts import KNOWN_EVENT_TYPES, loss, review
from shared.envelope import EventEnvelope, canonical_bytes, canonical_json, chain_hash
from tests.unit.status.events import T0, Streams, interleave, whole_journey


def message(topic: str, value: bytes, offset: int = 0) -> Inbound:
    return Inbound(topic=topic, partition=0, offset=offset, key=b"k", value=value)


def resealed(body: dict[str, object]) -> bytes:
    """A body with a valid hash over whatever it now holds, in canonical form."""
    rest = {k: v for k, v in body.items() if k != "hash"}
    return canonical_json(rest | {"hash": chain_hash(str(rest["prev_hash"]), rest)})


def outcome(value: bytes, topic: str = "review.events") -> str:
    """The exact path's verdict: 'ok' or the Rejected code; anything else raised is named by
    its type."""
    try:
        envelope = _parse_exact(message(topic, value), KNOWN_EVENT_TYPES[topic],
                                MessageLimits())
    except Rejected as exc:
        return exc.code
    except Exception as exc:
        return type(exc).__name__
    return f"ok {envelope.event_id}"


def fast_outcome(value: bytes, topic: str = "review.events") -> str:
    """'ok' when the orjson path takes the message, else what the exact path says."""
    envelope = _parse_fast(value, KNOWN_EVENT_TYPES[topic], MessageLimits())
    return outcome(value, topic) if envelope is None else f"ok {envelope.event_id}"


def nested(depth: int) -> object:
    value: object = "deep"
    for _ in range(depth):
        value = {"k": value}
    return value


def corpus() -> list[bytes]:
    s = Streams()
    good = s.emit("review.events", review.ReviewRejected(
        application_id="app-1", reviewer_id="审核员-1", reason="照片不清晰 — retake"))
    body = good.to_json_dict()
    tampered = dict(body, data={**body["data"], "reason": "changed"})
    unknown = dict(body, type="ReviewForgotten")
    spaced = json.dumps(body, indent=1).encode()  # not canonical, yet the hash holds
    escaped = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()  # \\u escapes
    return [
        good.to_bytes(),
        spaced,
        escaped,
        b"\xef\xbb\xbf" + good.to_bytes(),  # a UTF-8 BOM
        good.to_bytes().decode().encode("utf-16"),  # json.loads reads UTF-16 too
        canonical_json(tampered),
        resealed(unknown),
        resealed(dict(body, version="seven")),
        canonical_json(dict(body, prev_hash="é" * 64)),  # both raise on the hash
        resealed({k: v for k, v in body.items() if k != "citizen_ref"}),
        resealed(dict(body, data={**body["data"], "score": 0.1 + 0.2, "n": float("nan")})),
        b'{"not": "an event"}',
        b"[1, 2]",
        b"not json",
        b"\xff\xfe\x00",
        b"",
        # Intact, and nested deeper than any message may be (CARDDESK_MAX_JSON_DEPTH, 32).
        resealed(dict(body, data={"reason": nested(40)})),
        # Intact, with more brackets than that depth, but inside strings: taken.
        resealed(dict(body, data={**body["data"], "reason": "{[" * 40})),
    ]


@pytest.mark.parametrize("index", range(len(corpus())))
def test_the_fast_path_takes_only_what_the_exact_path_takes(index: int) -> None:
    value = corpus()[index]
    assert fast_outcome(value) == outcome(value)


def test_the_corpus_holds_both_accepted_and_refused_messages() -> None:
    outcomes = [outcome(v) for v in corpus()]
    assert sum(o.startswith("ok") for o in outcomes) >= 3
    assert {"bad_hash", "unknown_event_type", "malformed_event", "malformed_json",
            "too_deeply_nested"} <= set(outcomes)


def test_canonical_bytes_equal_canonical_json_for_what_services_write() -> None:
    values: list[object] = [
        {"b": 1, "a": [1.5, -2, 0.99, None, True], "c": {"z": "雪", "y": "\u2028"},
         "nested": [{"k": "\x00\n\"\\\x7f"}], "": ""},
        *(json.loads(v) for v in corpus()[:3]),
    ]
    for value in values:
        assert canonical_bytes(value) == canonical_json(value)


def test_where_orjson_spells_a_value_differently_parse_event_decides() -> None:
    exotic: dict[str, object] = {"big": 2 ** 70, "huge": 1e300, "neg_zero": -0.0}
    differs = [k for k, v in exotic.items() if _orjson_spelling(v) != canonical_json(v)]
    assert differs, "orjson now spells these as json does; the fallback is untested"
    body = corpus_body()
    data = body["data"]
    assert isinstance(data, dict)
    value = resealed(dict(body, data={**data, **exotic}))
    assert fast_outcome(value) == outcome(value) == f"ok {body['event_id']}"


def _orjson_spelling(value: object) -> bytes | None:
    try:
        return canonical_bytes(value)
    except TypeError:
        return None


def corpus_body() -> dict[str, object]:
    body = json.loads(corpus()[0])
    assert isinstance(body, dict)
    return body


def live_fold(envelopes: list[tuple[str, EventEnvelope]]) -> dict[str, tuple[object, ...]]:
    rows: dict[str, CardStatusRow] = {}
    for _, envelope in envelopes:
        rows[envelope.citizen_ref] = project(rows.get(envelope.citizen_ref), envelope)
    return {ref: card_record(row) for ref, row in rows.items()}


@pytest.mark.parametrize("seed", range(5))
def test_the_fold_gives_the_rows_and_timeline_of_project_event_by_event(seed: int) -> None:
    rng = random.Random(seed)
    arrivals: list[tuple[str, EventEnvelope]] = []
    for _ in range(4):
        s = Streams(start=T0 + timedelta(minutes=rng.randint(0, 30)))
        topics = whole_journey(s)
        order = [rng.choice(list(topics)) for _ in range(40)]
        by_id = {e.event_id: topic for topic, events in topics.items() for e in events}
        arrivals += [(by_id[e.event_id], e) for e in interleave(topics, order)]
    rng.shuffle(arrivals)  # citizens mixed; per-citizen, per-topic order is what counts
    arrivals.sort(key=lambda a: (a[1].citizen_ref, a[0], a[1].version))
    mixed: list[tuple[str, EventEnvelope]] = []
    queues: dict[tuple[str, str], list[tuple[str, EventEnvelope]]] = {}
    for arrival in arrivals:
        queues.setdefault((arrival[1].citizen_ref, arrival[0]), []).append(arrival)
    while queues:
        key = rng.choice(sorted(queues))
        mixed.append(queues[key].pop(0))
        if not queues[key]:
            del queues[key]

    fold = ProjectionFold()
    for offset, (topic, envelope) in enumerate(mixed):
        fold.add(topic, message(topic, envelope.to_bytes(), offset))
    delta = fold.take(with_status=True)

    assert {row[0]: row for row in delta.status} == live_fold(mixed)
    assert delta.timeline == [
        tuple(timeline_entry(e, topic).model_dump().values()) for topic, e in mixed]
    assert delta.processed == [(status_follower(topic), str(e.event_id)) for topic, e in mixed]


def test_a_redelivered_event_and_unprocessable_messages_are_skipped() -> None:
    s = Streams()
    first = s.emit("loss.events", loss.LossCancelled(loss_id="l1"))
    bad = first.to_json_dict() | {"data": {"loss_id": 7}}
    fold = ProjectionFold()
    fold.add("loss.events", message("loss.events", first.to_bytes()))
    fold.add("loss.events", message("loss.events", first.to_bytes(), 1))
    fold.add("loss.events", message("loss.events", b"{}", 2))
    fold.add("loss.events", message("loss.events", resealed(bad | {"event_id": str(uuid.uuid4())}),
                                    3))

    fold.add("loss.events", message("loss.events", resealed(
        first.to_json_dict() | {"event_id": str(uuid.uuid4()), "data": nested(40)}), 4))

    assert (fold.applied, fold.duplicates, fold.skipped) == (1, 1, 3)
    assert [row[1] for row in fold.take(with_status=False).timeline] == [str(first.event_id)]


def journeys(citizens: int) -> list[tuple[str, EventEnvelope]]:
    """Whole journeys of `citizens`, one citizen after the other, topic by topic."""
    arrivals: list[tuple[str, EventEnvelope]] = []
    for k in range(citizens):
        topics = whole_journey(Streams(start=T0 + timedelta(minutes=k)))
        arrivals += [(topic, e) for topic, events in topics.items() for e in events]
    return arrivals


def handed_back(fold: ProjectionFold, events: int) -> FoldState:
    """What a load process sends its parent: the state of a fold whose rows it wrote."""
    return FoldState.of(fold, FoldState.compact(fold.take_all_status()), events, {})


def test_a_fold_that_adopts_another_folds_citizens_carries_on_as_one_fold() -> None:
    arrivals = journeys(4)
    by_citizen: dict[str, list[tuple[str, EventEnvelope]]] = {}
    for arrival in arrivals:
        by_citizen.setdefault(arrival[1].citizen_ref, []).append(arrival)
    refs = sorted(by_citizen)
    # Each citizen's first events are loaded (two processes, two citizens each), the rest
    # come in the catch-up.
    loaded = {ref: by_citizen[ref][:-3] for ref in refs}
    later = [arrival for ref in refs for arrival in by_citizen[ref][-3:]]
    parent, other = ProjectionFold(), ProjectionFold()
    for index, ref in enumerate(refs):
        for offset, (topic, envelope) in enumerate(loaded[ref]):
            (parent if index % 2 else other).add(topic, message(topic, envelope.to_bytes(),
                                                                offset))
    written = {row[0]: row for row in parent.take_all_status()}
    parent.take(with_status=False)
    other_rows = other.take_all_status()
    written |= {row[0]: row for row in other_rows}
    part = FoldState.of(other, FoldState.compact(other_rows),
                        sum(len(loaded[ref]) for ref in refs[::2]), {})

    parent.adopt(part)
    # A redelivered event of an adopted citizen is a duplicate here too.
    topic, again = loaded[refs[0]][0]
    parent.add(topic, message(topic, again.to_bytes(), 99))
    for offset, (topic, envelope) in enumerate(later):
        parent.add(topic, message(topic, envelope.to_bytes(), 100 + offset))
    delta = parent.take(with_status=True)

    whole = ProjectionFold()
    for offset, (topic, envelope) in enumerate(arrivals):
        whole.add(topic, message(topic, envelope.to_bytes(), offset))
    expected = {row[0]: row for row in whole.take_all_status()}
    assert written | {row[0]: row for row in delta.status} == expected == live_fold(arrivals)
    assert (parent.applied, parent.duplicates, parent.skipped) == (len(arrivals), 1, 0)
    assert parent.citizen_count == 4
    assert set(parent.citizens) == set(refs)  # all four had events after the load


def test_two_folds_that_share_a_citizen_or_an_event_cannot_be_joined() -> None:
    [(topic, first), (topic2, second), *_] = journeys(1)
    left, right, copy = ProjectionFold(), ProjectionFold(), ProjectionFold()
    left.add(topic, message(topic, first.to_bytes()))
    right.add(topic2, message(topic2, second.to_bytes()))  # the same citizen, another event
    copy.add(topic, message(topic, first.to_bytes()))
    with pytest.raises(UnsplittableLogError, match="two partition numbers"):
        left.adopt(handed_back(right, 1))
    stranger = ProjectionFold()
    [(topic3, elsewhere), *_] = journeys(1)
    stranger.add(topic3, message(topic3, elsewhere.to_bytes()))
    stranger.seen.add(str(first.event_id))  # as if `first` had come in another partition
    with pytest.raises(UnsplittableLogError):
        left.adopt(handed_back(stranger, 2))
    assert left.citizen_count == 1  # nothing was taken over


def reader_of(partitions: dict[str, int]) -> TopicReader:
    reader = TopicReader(RebuildSettings())
    reader.partitions = [TopicPartition(topic, p) for topic, count in partitions.items()
                         for p in range(count)]
    return reader


def test_partition_numbers_are_shared_out_only_where_every_topic_has_them_all() -> None:
    six = reader_of({"a": 6, "b": 6})
    assert six.split(2) == [frozenset({0, 2, 4}), frozenset({1, 3, 5})]
    assert six.split(4) == [frozenset({0, 4}), frozenset({1, 5}), frozenset({2}),
                            frozenset({3})]
    assert six.split(1) == [frozenset(range(6))]
    assert reader_of({"a": 1, "b": 1}).split(2) == [frozenset({0})]
    # Citizen x's events may sit in partition 5 of `a` but in partition 2 of `b`.
    assert reader_of({"a": 6, "b": 3}).split(2) == [frozenset(range(6))]
