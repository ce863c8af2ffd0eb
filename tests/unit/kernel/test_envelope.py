"""The hash chain: what auditors rely on to trust the log."""

from __future__ import annotations

import json

from shared.contracts.loss import LossCancelled
from shared.envelope import (
    GENESIS_HASH,
    EventEnvelope,
    canonical_json,
    hash_is_intact,
    verify_stream,
)
from tests.builders import CitizenStreams


def _stream() -> list[EventEnvelope]:
    return CitizenStreams("ref").append_all("loss-ref",
                                            [LossCancelled(loss_id=f"l{i}") for i in range(5)])


def test_a_stream_of_sealed_events_verifies() -> None:
    events = _stream()
    assert events[0].prev_hash == GENESIS_HASH
    assert [e.version for e in events] == [1, 2, 3, 4, 5]
    assert verify_stream("loss-ref", [e.to_json_dict() for e in events]) == []


def test_the_hash_covers_prev_hash_and_the_canonical_envelope() -> None:
    import hashlib

    event = _stream()[0]
    body = event.to_json_dict()
    del body["hash"]
    assert event.hash == hashlib.sha256(GENESIS_HASH.encode() + canonical_json(body)).hexdigest()


def test_the_stored_bytes_round_trip_to_the_same_hash() -> None:
    for event in _stream():
        again = EventEnvelope.model_validate_json(event.to_bytes())
        assert again.to_bytes() == event.to_bytes()
        assert hash_is_intact(json.loads(event.to_bytes()))


def test_changing_one_byte_of_a_stored_event_breaks_verification_at_that_event() -> None:
    raw = [e.to_bytes() for e in _stream()]
    tampered = raw[2].replace(b'"loss_id":"l2"', b'"loss_id":"l3"')
    assert tampered != raw[2] and len(tampered) == len(raw[2])
    raw[2] = tampered
    breaks = verify_stream("loss-ref", [json.loads(r) for r in raw])
    assert [(b.version, b.reason) for b in breaks] == [
        (3, "hash does not match the event's content")
    ]


def test_a_removed_or_swapped_event_is_named_by_version() -> None:
    bodies = [e.to_json_dict() for e in _stream()]
    removed = bodies[:2] + bodies[3:]
    assert {b.version for b in verify_stream("s", removed)} == {4}
    swapped = [bodies[0], bodies[2], bodies[1], *bodies[3:]]
    assert {b.version for b in verify_stream("s", swapped)} == {3, 2, 4}
