"""What metrics and traces cost a command, measured on the exact calls the hot path makes.

    .venv/bin/python -m bench.observability [--commands 20000]

No Kafka or PostgreSQL: each step repeats, for one synthetic command, the instrumentation
the services add to it (intake counters, latency histogram, the command's span made current
around its handler, the appended event's counter and `traceparent` header, the relay's
count, and per applied event a consumer span and an `event.applied` log line), against the
same loop without it. The result is CPU microseconds per command, which the README relates
to the measured CPU each command costs the services.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from datetime import UTC, datetime

import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from bench.common import print_table, write_result
from shared.envelope import EventEnvelope, PendingEvent
from shared.eventstore import event_message
from shared.logging import configure_logging
from shared.metrics import (
    BATCH_SIZE,
    COMMANDS_RECEIVED,
    COMMANDS_REPLIED,
    EVENTS_APPENDED,
    EVENTS_APPLIED,
    EVENTS_PUBLISHED,
    observe_command_latency,
)
from shared.tracing import export_to, start_span, trace_id_in, trace_id_of

# The journeys benchmark's mix: 960 events/s for 557 commands/s, and each event is applied
# by the status projection and, for most, one follower service.
EVENTS_PER_COMMAND = 1.7
APPLIES_PER_EVENT = 2


class _Dropped(SpanExporter):
    """An exporter that sends nothing: what remains is the cost of recording."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def an_event() -> EventEnvelope:
    pending = PendingEvent(event_id=uuid.uuid4(), type="LossReported", citizen_ref="a" * 64,
                           occurred_at=datetime.now(UTC), correlation_id="c", causation_id="c")
    return EventEnvelope.seal(pending, "loss-" + "a" * 64, 1, "0" * 64)


def per_command(n: int, step: Callable[[], None]) -> float:
    """CPU microseconds one call of `step` takes, the best of three rounds of `n`."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        for _ in range(n):
            step()
        best = min(best, (time.process_time() - started) / n * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=20_000)
    n = parser.parse_args().commands
    configure_logging("bench", "INFO")
    logging.getLogger().handlers.clear()
    log = structlog.get_logger()
    event = an_event()
    headers = {"traceparent": b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    sink = io.StringIO()
    whole = int(EVENTS_PER_COMMAND * APPLIES_PER_EVENT)

    def bare() -> None:
        event_message("loss.events", event)

    def metrics() -> None:
        COMMANDS_RECEIVED.labels("loss", "ReportLoss").inc()
        BATCH_SIZE.labels("loss.commands").observe(1)
        event_message("loss.events", event)
        EVENTS_APPENDED.labels("loss", "LossReported").inc()
        COMMANDS_REPLIED.labels("loss", "ReportLoss", "accepted", "accepted").inc()
        observe_command_latency("loss", "ReportLoss", int(time.time() * 1000) - 20)
        EVENTS_PUBLISHED.labels("loss", "LossReported").inc(2)
        for _ in range(whole):
            EVENTS_APPLIED.labels("status", "loss.events").inc()

    def traced() -> None:
        span = start_span("ReportLoss process", {}, {"carddesk.command.type": "ReportLoss"},
                          new_trace=True)
        with trace.use_span(span, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):
            sent = dict(event_message("loss.events", event).headers)
        trace_id_of(span)
        span.end()
        for _ in range(whole):
            with trace.use_span(start_span("LossReported apply", sent, {}), end_on_exit=True):
                pass

    def logged() -> None:  # the projection's line, at worst one per event (batches of one)
        for _ in range(round(EVENTS_PER_COMMAND)):
            log.info("events.applied", consumer="status", topic="loss.events", count=1,
                     event_types=["LossReported"], trace_ids=[trace_id_in(headers)])

    with redirect_stdout(sink):
        base = per_command(n, bare)
        figures = {
            "metrics_us_per_command": per_command(n, metrics) - base,
            "trace_carried_us_per_command": per_command(n, traced) - base,
            "projection_log_us_per_command": per_command(n // 4, logged),
        }
        figures["total_default_us_per_command"] = sum(figures.values())
        export_to("bench", BatchSpanProcessor(_Dropped()))  # as with CARDDESK_OTLP_ENDPOINT
        figures["trace_recorded_us_per_command"] = per_command(n // 4, traced) - base
    print_table("observability overhead (CPU per command)",
                [(k, f"{v:.1f}") for k, v in figures.items()])
    path = write_result("observability", figures)
    print(f"written: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
