"""JSON nested deeper than the parser's recursion limit is poison like any malformed body:
refused at once with its code, never retried as if the fault might pass."""

from __future__ import annotations

import json

import pytest

from cardctl.audit import LogReplayer, LogVerifier, event_topics
from shared.consumer import Inbound, MessageLimits, Rejected, parse_event
from shared.intake.parse import request_id_of

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_an_event_nested_too_deeply_is_rejected_at_once() -> None:
    with pytest.raises(Rejected) as rejected:
        parse_event(Inbound("loss.events", 0, 7, b"k", DEEP), None)
    assert rejected.value.code == "too_deeply_nested"


def test_a_command_nested_too_deeply_is_answered_under_its_message_key() -> None:
    value = b'{"request_id": "r-1", "x": ' + DEEP + b"}"
    message = Inbound("loss.commands", 0, 7, b"poison-key", value)
    assert request_id_of(message, MessageLimits()) == "poison-key"


def test_the_auditors_tools_flag_or_skip_a_deeply_nested_message_instead_of_crashing() -> None:
    message = Inbound("loss.events", 2, 9, b"k", DEEP)
    verifier = LogVerifier()
    verifier.feed(message)
    [failure] = verifier.report().failures
    assert (failure.topic, failure.partition, failure.offset) == ("loss.events", 2, 9)
    assert "nested too deeply" in failure.reason
    replayer = LogReplayer(event_topics(""), only="someone")
    replayer.feed(message)
    assert replayer.events == 0
    everyone = LogReplayer(event_topics(""))
    everyone.feed(message)
    assert everyone.skipped == {"too_deeply_nested": 1}


def test_an_oversized_command_is_answered_under_its_request_id_up_to_a_bound() -> None:
    limits = MessageLimits(max_bytes=1024, max_depth=32)
    body = {"request_id": "r-2", "payload": {"session_token": "x" * 2000}}
    oversized = Inbound("loss.commands", 0, 7, b"session-1", json.dumps(body).encode())
    assert request_id_of(oversized, limits) == "r-2"
    body["payload"] = {"session_token": "x" * 5000}  # past four times the limit: unread
    far_past = Inbound("loss.commands", 0, 7, b"session-1", json.dumps(body).encode())
    assert request_id_of(far_past, limits) == "session-1"
