"""Reading untrusted bytes: whatever is wrong with them is a `Rejected`, never anything else."""

from __future__ import annotations

import json

import pytest

from shared.consumer import Inbound, MessageLimits, Rejected, load_json, parse_event

LIMITS = MessageLimits(max_bytes=256 * 1024, max_depth=32)

POISON = {
    "deep nesting past the parser's own limit": (b"[" * 100_000, "too_deeply_nested"),
    "deep nesting within the parser's limit": (b"[" * 200 + b"]" * 200, "too_deeply_nested"),
    "deep objects": (b'{"a":' * 50 + b"1" + b"}" * 50, "too_deeply_nested"),
    "a 1 MB value": (b"[" + b"0," * 500_000 + b"0]", "message_too_large"),
    "invalid UTF-8": (b'{"request_id": "\xff\xfe"}', "malformed_json"),
    "not JSON": (b"{not json", "malformed_json"),
    "empty": (b"", "malformed_json"),
}


@pytest.mark.parametrize(("value", "code"), POISON.values(), ids=POISON.keys())
def test_poison_is_rejected_with_its_code(value: bytes, code: str) -> None:
    with pytest.raises(Rejected) as rejected:
        load_json(value, LIMITS)
    assert rejected.value.code == code


def test_nesting_up_to_the_limit_is_read() -> None:
    at_limit = b"[" * 32 + b"]" * 32
    assert load_json(at_limit, LIMITS) is not None
    with pytest.raises(Rejected):
        load_json(b"[" * 33 + b"]" * 33, LIMITS)


def test_a_huge_flat_array_within_the_size_limit_is_read() -> None:
    value = json.dumps(list(range(30_000))).encode()
    assert len(load_json(value, LIMITS)) == 30_000


def _event(value: bytes) -> Inbound:
    return Inbound("loss.events", 0, 7, b"k", value)


@pytest.mark.parametrize("value", [
    *(v for v, _ in POISON.values()),
    b"[]", b"42", b'"text"', b"null",
    json.dumps({"event_id": 5, "type": ["x"], "version": "one"}).encode(),  # wrong types
    json.dumps({"data": list(range(10_000))}).encode(),  # a huge array, no envelope
])
def test_a_poison_event_is_rejected_and_nothing_else_escapes(value: bytes) -> None:
    with pytest.raises(Rejected):
        parse_event(_event(value), known_types=None, limits=LIMITS)
