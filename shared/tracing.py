"""OpenTelemetry traces: a command's W3C `traceparent` travels in Kafka headers from the
channel through the command service, the events it caused (their outbox rows carry it), every
follower and the status projection, so one trace shows a citizen's step end to end.

Spans are always made (so log lines carry a trace id); they are exported over OTLP/HTTP only
when `CARDDESK_OTLP_ENDPOINT` is set. Span attributes name types, topics, channels and reply
codes, never personal data (no ID number, name, citizen_ref or payload field).
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = structlog.get_logger()

TRACEPARENT = "traceparent"
_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None


def configure_tracing(service: str, otlp_endpoint: str | None) -> TracerProvider:
    """The process's tracer provider (once per process); with an endpoint, spans are
    batched to it over OTLP/HTTP, else they are made for their ids and dropped."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": f"carddesk-{service}"}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
        log.info("tracing.exporting", endpoint=otlp_endpoint)
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer("carddesk")


def context_from(headers: Mapping[str, bytes]) -> Context | None:
    """The trace context a message carries in its `traceparent` header; None when it has
    none or a malformed one (the sender's header is then ignored, never trusted)."""
    raw = headers.get(TRACEPARENT)
    if raw is None or len(raw) > 128:
        return None
    value = raw.decode("ascii", "replace")
    context = _PROPAGATOR.extract({TRACEPARENT: value})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def start_span(name: str, headers: Mapping[str, bytes], attributes: Mapping[str, str | int],
               ) -> Span:
    """A consumer span for a message, child of the trace the message carries (if any)."""
    return tracer().start_span(name, context=context_from(headers), kind=SpanKind.CONSUMER,
                               attributes=dict(attributes))


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
    context = context_from(headers)
    if context is None:
        return None
    return f"{trace.get_current_span(context).get_span_context().trace_id:032x}"
