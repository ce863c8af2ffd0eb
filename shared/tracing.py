"""OpenTelemetry traces: a command's W3C `traceparent` travels in Kafka headers from the
channel through the command service, the events it caused (their outbox rows carry it), every
follower and the status projection, so one trace shows a citizen's step end to end.

Spans are recorded and exported (OTLP over HTTP) only when `CARDDESK_OTLP_ENDPOINT` is set.
Without it the context is only carried: a message's trace passes to what it causes, and a
command that arrives without one is given a fresh trace id, so its events, their followers'
and the projection's log lines still share one; that costs a few microseconds, not the tens
a recorded span does (bench/observability.py). Span attributes name types, topics, channels
and reply codes, never personal data (no ID number, name, citizen_ref or payload field).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

log = structlog.get_logger()

TRACEPARENT = "traceparent"
_provider: TracerProvider | None = None
_ids = random.SystemRandom()


def configure_tracing(service: str, otlp_endpoint: str | None) -> None:
    """Export this process's spans to `otlp_endpoint` (OTLP/HTTP); without one, record none."""
    if not otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    export_to(service, BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    log.info("tracing.exporting", endpoint=otlp_endpoint)


def export_to(service: str, processor: SpanProcessor) -> TracerProvider:
    """Record spans from now on and hand them to `processor` (tests give an in-memory one)."""
    global _provider
    if _provider is None:
        _provider = TracerProvider(
            resource=Resource.create({"service.name": f"carddesk-{service}"}))
        trace.set_tracer_provider(_provider)
    _provider.add_span_processor(processor)
    return _provider


def recording() -> bool:
    return _provider is not None


# W3C Trace Context: version-traceid-parentid-flags, lower-case hex; a later version may
# append fields, version 00 may not, and version ff is invalid.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?",
                          re.DOTALL)


def span_context_from(headers: Mapping[str, bytes]) -> SpanContext | None:
    """The trace context a message carries in its `traceparent` header; None when it has
    none or a malformed one (the sender's header is then ignored, never trusted)."""
    raw = headers.get(TRACEPARENT)
    if raw is None or len(raw) > 128:
        return None
    match = _TRACEPARENT.fullmatch(raw)
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == b"ff" or (version == b"00" and rest):
        return None
    context = SpanContext(trace_id=int(trace_id, 16), span_id=int(span_id, 16), is_remote=True,
                          trace_flags=TraceFlags(int(flags, 16) & TraceFlags.SAMPLED))
    return context if context.is_valid else None


def context_from(headers: Mapping[str, bytes]) -> Context | None:
    """The same as an OpenTelemetry context, the parent of a recorded span."""
    carried = span_context_from(headers)
    return None if carried is None else trace.set_span_in_context(NonRecordingSpan(carried))


def _fresh() -> SpanContext:
    return SpanContext(trace_id=_ids.getrandbits(128) or 1, span_id=_ids.getrandbits(64) or 1,
                       is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def start_span(name: str, headers: Mapping[str, bytes], attributes: Mapping[str, str | int],
               *, new_trace: bool = False, kind: SpanKind = SpanKind.CONSUMER) -> Span:
    """The span of handling a message, in the trace the message carries; without one, a new
    trace if `new_trace` (a command: where a trace may begin), else none. Recorded only
    while exporting; otherwise a context that is carried on and costs next to nothing."""
    carried = span_context_from(headers)
    if _provider is not None:
        if carried is None and not new_trace:
            return trace.INVALID_SPAN
        parent = None if carried is None else trace.set_span_in_context(NonRecordingSpan(carried))
        return _provider.get_tracer("carddesk").start_span(
            name, context=parent, kind=kind, attributes=dict(attributes))
    if carried is not None:
        return NonRecordingSpan(carried)
    return NonRecordingSpan(_fresh()) if new_trace else trace.INVALID_SPAN


def traceparent_header() -> tuple[str, bytes] | None:
    """The current span as a `traceparent` header, for a message it causes."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return (TRACEPARENT, f"00-{context.trace_id:032x}-{context.span_id:016x}-"
                         f"{int(context.trace_flags):02x}".encode())


def trace_id_of(span: Span | None) -> str | None:
    """The span's trace id in hex, as log lines carry it."""
    if span is None:
        return None
    context = span.get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


def trace_id_in(headers: Mapping[str, bytes]) -> str | None:
    """The trace id a message's `traceparent` names, if well-formed."""
    carried = span_context_from(headers)
    return None if carried is None else f"{carried.trace_id:032x}"
