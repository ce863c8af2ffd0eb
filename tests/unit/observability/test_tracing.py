"""Trace context in Kafka headers: what an event carries, and what a hostile header gets."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from opentelemetry import trace

from shared.envelope import EventEnvelope, PendingEvent
from shared.eventstore import event_message
from shared.tracing import context_from, start_span, trace_id_in, trace_id_of

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()


def an_event() -> EventEnvelope:
    pending = PendingEvent(event_id=uuid.uuid4(), type="LossReported", citizen_ref="a" * 64,
                           occurred_at=datetime.now(UTC), correlation_id="c", causation_id="c")
    return EventEnvelope.seal(pending, "loss-" + "a" * 64, 1, "0" * 64)


def test_an_event_appended_inside_a_commands_span_carries_its_trace() -> None:
    span = start_span("ReportLoss process", {"traceparent": TRACEPARENT}, {}, new_trace=True)

    with trace.use_span(span, end_on_exit=True):
        headers = dict(event_message("loss.events", an_event()).headers)

    assert trace_id_of(span) == TRACE_ID
    assert trace_id_in(headers) == TRACE_ID


def test_an_event_appended_outside_any_span_carries_no_trace() -> None:
    headers = dict(event_message("loss.events", an_event()).headers)

    assert "traceparent" not in headers
    assert set(headers) == {"event-type", "event-id"}


def test_a_command_without_a_trace_starts_one_and_an_event_without_one_does_not() -> None:
    first = start_span("ReportLoss process", {}, {}, new_trace=True)
    second = start_span("ReportLoss process", {}, {}, new_trace=True)
    follower = start_span("LossReported apply", {}, {})

    assert trace_id_of(first) is not None
    assert trace_id_of(first) != trace_id_of(second)
    assert trace_id_of(follower) is None
    with trace.use_span(follower, end_on_exit=True):
        assert "traceparent" not in dict(event_message("loss.events", an_event()).headers)


def test_a_later_trace_context_version_with_more_fields_is_read() -> None:
    later = f"01-{TRACE_ID}-00f067aa0ba902b7-01-what-comes-next".encode()

    assert trace_id_in({"traceparent": later}) == TRACE_ID
    assert context_from({"traceparent": later}) is not None


@pytest.mark.parametrize("hostile", [
    b"", b"garbage", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",  # all-zero trace id
    b"00-" + TRACE_ID.encode() + b"-" + b"0" * 16 + b"-01",  # all-zero span id
    b"00-" + TRACE_ID.upper().encode() + b"-00f067aa0ba902b7-01",  # upper-case hex
    b"00-+" + TRACE_ID[1:].encode() + b"-00f067aa0ba902b7-01",  # what int() would accept
    b"00-" + TRACE_ID.encode() + b"-00f067aa0ba902b7-01-extra",  # version 00 has no more
    b"\xff\xfe" * 20, TRACEPARENT + b"-" + b"x" * 200,  # not text; too long
    b"ff-" + TRACE_ID.encode() + b"-00f067aa0ba902b7-01",  # forbidden version
])
def test_a_malformed_traceparent_is_ignored_and_a_new_trace_begins(hostile: bytes) -> None:
    assert context_from({"traceparent": hostile}) is None
    assert trace_id_in({"traceparent": hostile}) is None

    span = start_span("ReportLoss process", {"traceparent": hostile}, {}, new_trace=True)

    assert trace_id_of(span) is not None
    assert trace_id_of(span) != TRACE_ID
