"""Whether an authenticated message can run: within the limits, a well-formed envelope from
its own channel, fresh, of a known type, its sealed fields opened, its payload valid. Each
check raises `Rejected` with the code the refusal carries back to the channel."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from opentelemetry.trace import Span
from pydantic import ValidationError

from shared.channels import Channel
from shared.consumer import Inbound, MessageLimits, Rejected, describe_validation_error, load_json
from shared.intake.messages import CommandContext, CommandEnvelope, CommandRoute
from shared.metrics import command_type_label
from shared.sealing import FieldOpener, SealContext, SealedFieldError
from shared.tracing import start_span


@dataclass(frozen=True, slots=True)
class CheckedCommand:
    """A command that passed every check, ready to run."""

    msg: Inbound
    type: str
    route: CommandRoute
    context: CommandContext
    payload: Any
    # Its span, in the trace the channel sent in `traceparent` (else a new one): current
    # while its handler runs, so the events it appends carry the trace (shared/tracing.py).
    span: Span | None = None


@dataclass(frozen=True, slots=True)
class CommandChecks:
    routes: Mapping[str, CommandRoute]
    opener: FieldOpener
    limits: MessageLimits
    freshness: timedelta
    clock: Callable[[], datetime]
    ids: Callable[[], str]

    def check(self, msg: Inbound, channel: Channel) -> CheckedCommand:
        """The command ready to run, or `Rejected`."""
        body = load_json(msg.value, self.limits)
        envelope = self._envelope(body, channel)
        received_at = self.clock()
        self._fresh(envelope, received_at)
        route = self.routes.get(envelope.type)
        if route is None:
            raise Rejected("unknown_command_type", f"unknown command type {envelope.type[:100]!r}")
        payload = self._payload(envelope, channel, route)
        # The request id as the channel spelled it, which its reply must carry back.
        context = CommandContext(str(body["request_id"]), channel, envelope.issued_at,
                                 received_at, self.ids)
        span = start_span(f"{envelope.type} process", msg.headers, {
            "messaging.system": "kafka", "messaging.destination.name": msg.topic,
            "carddesk.command.type": envelope.type, "carddesk.channel": channel.channel_id},
            new_trace=True)
        return CheckedCommand(msg, envelope.type, route, context, payload, span)

    def _envelope(self, body: Any, channel: Channel) -> CommandEnvelope:
        try:
            envelope = CommandEnvelope.model_validate(body)
        except ValidationError as exc:
            raise Rejected("malformed_command", describe_validation_error(exc)) from exc
        if envelope.channel != channel.channel_id:
            raise Rejected("channel_mismatch", "the envelope's channel differs from x-channel-id")
        return envelope

    def _fresh(self, envelope: CommandEnvelope, received_at: datetime) -> None:
        if abs(received_at - envelope.issued_at) > self.freshness:
            raise Rejected("stale_command", "issued_at lies outside the accepted window of"
                           f" {int(self.freshness.total_seconds())} s around the receiver's clock")

    def _payload(self, envelope: CommandEnvelope, channel: Channel, route: CommandRoute) -> Any:
        """The payload with its sealed fields opened, as the route's model."""
        try:
            opened = self.opener.open_payload(
                SealContext(channel.channel_id, envelope.type, str(envelope.request_id)),
                envelope.payload)
        except SealedFieldError as exc:
            raise Rejected(exc.code, str(exc)) from exc
        try:
            return route.payload_model.model_validate(opened)
        except ValidationError as exc:
            raise Rejected("invalid_payload", describe_validation_error(exc)) from exc

    def type_label(self, msg: Inbound) -> str:
        """The `type` label of a refused command: its type if a route knows it."""
        try:
            body = load_json(msg.value, self.limits)
        except Rejected:
            return command_type_label(None, ())
        command_type = body.get("type") if isinstance(body, dict) else None
        return command_type_label(command_type if isinstance(command_type, str) else None,
                                  self.routes)


# A signed message over the size limit is still read for its request id, up to this many
# times the limit (the broker's own cap on a message is about 1 MB).
OVERSIZED_READ_FACTOR = 4


def request_id_of(msg: Inbound, limits: MessageLimits) -> str:
    """The request id of a message that may be unreadable: from the body, else the key.

    Only signed messages are refused with a reply, and a command's key is its session id
    when it has one: an oversized command answered under its key could not be matched to
    its request by the channel, so its body is read for the request id alone."""
    reading = (limits if len(msg.value) <= limits.max_bytes else
               dataclasses.replace(limits, max_bytes=limits.max_bytes * OVERSIZED_READ_FACTOR))
    try:
        body = load_json(msg.value, reading)
    except Rejected:
        body = None
    if isinstance(body, dict) and isinstance(body.get("request_id"), str):
        return str(body["request_id"])[:100]
    return (msg.key or b"").decode("utf-8", "replace")[:100]
