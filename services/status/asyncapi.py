"""The AsyncAPI document of the whole message contract (DESIGN sections 3-5).

A documentation-only KafkaBroker declares every topic with its message models; it is never
connected. Command topics are what services receive, event and reply topics what they send.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import cache
from typing import Any
from uuid import UUID

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from faststream.specification.base import Specification
from pydantic import BaseModel, ConfigDict, Field, create_model

from shared.commands import Reply
from shared.contracts import auth, common, issuance, loss, review
from shared.kafka import broker_security
from shared.settings import CardDeskSettings
from shared.topics import REPLY_TOPIC_PREFIX, command_topic, dlq_topic, event_topic

COMMANDS: dict[str, Any] = {
    "auth": auth.IssueCaptcha | auth.StartSession | auth.AuthorizeElectronicCard
    | auth.VerifyPortrait | common.EraseSubject,
    "loss": loss.ReportLoss | loss.CancelLoss | common.EraseSubject,
    "review": review.SubmitReissueApplication | review.DecideReview | common.EraseSubject,
    "issuance": issuance.CollectCard | issuance.ImportCard | common.EraseSubject,
}
EVENTS: dict[str, Any] = {
    "auth": auth.AuthEvent,
    "loss": loss.LossEvent,
    "review": review.ReviewEvent,
    "issuance": issuance.IssuanceEvent,
}


class CommandEnvelopeDoc(BaseModel):
    """A command from a channel; headers `x-channel-id` and `x-signature` (HMAC-SHA256)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: UUID
    channel: str
    issued_at: datetime
    type: str = Field(description="the payload model's name")


class EventEnvelopeDoc(BaseModel):
    """A domain event; the model's `type` is carried by the envelope, not inside `data`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID
    type: str
    schema_version: int
    stream_id: str
    version: int
    citizen_ref: str
    occurred_at: datetime
    correlation_id: str
    causation_id: str
    prev_hash: str = Field(description="hex SHA-256; 64 zeros for a stream's first event")
    hash: str = Field(description="SHA-256(prev_hash || canonical JSON without hash)")


def _documenting(model: type[BaseModel]) -> Callable[[Any], Awaitable[None]]:
    """A handler that only carries `model` as its payload annotation."""

    async def handler(body: Any) -> None:
        return None

    handler.__annotations__ = {"body": model, "return": None}
    return handler


def contract_broker(settings: CardDeskSettings) -> KafkaBroker:
    broker = KafkaBroker(settings.kafka_bootstrap, client_id="carddesk-contract-docs",
                         security=broker_security(settings))
    for service, payloads in COMMANDS.items():
        name = f"{service.capitalize()}Command"
        command = create_model(name, __base__=CommandEnvelopeDoc, payload=(payloads, ...))
        topic = command_topic(service)
        broker.subscriber(topic, title=topic, description=f"Commands for the {service} service",
                          group_id=f"carddesk-{service}")(_documenting(command))
        broker.publisher(dlq_topic(topic), title=dlq_topic(topic), schema=bytes,
                         description="rejected commands, raw, with x-dlq-code/x-dlq-reason")
    for service, union in EVENTS.items():
        name = f"{service.capitalize()}EventMessage"
        event = create_model(name, __base__=EventEnvelopeDoc, data=(union, ...))
        topic = event_topic(service)
        broker.publisher(topic, title=topic, schema=event,
                         description=f"Events of the {service} service, keyed by citizen_ref;"
                         " retained forever")
        broker.publisher(dlq_topic(topic), title=dlq_topic(topic), schema=bytes,
                         description="unprocessable events, raw, with x-dlq-code/x-dlq-reason")
    replies = f"{REPLY_TOPIC_PREFIX}{{channel_id}}"
    broker.publisher(replies, title=replies, schema=Reply,
                     description="The outcome of every command a channel sent, keyed by"
                     " request_id; one topic per channel, readable only by that channel")
    return broker


@cache
def _specification(bootstrap: str) -> Specification:
    settings = CardDeskSettings(kafka_bootstrap=bootstrap)
    return AsyncAPI(
        contract_broker(settings),
        title="Card Desk message contract",
        version="1.0.0",
        description="Topics, commands, events and replies of DESIGN sections 3-5.",
    ).to_specification()


def specification(settings: CardDeskSettings) -> Specification:
    return _specification(settings.kafka_bootstrap)


def asyncapi_json(settings: CardDeskSettings) -> Any:
    return specification(settings).to_jsonable()


# The page's script and styles, vendored from the npm registry's @asyncapi/react-component
# (services/status/static/asyncapi/): bureaus run on closed networks, so no page may load
# anything from another host.
ASYNCAPI_STATIC_PATH = "/docs/static/asyncapi"
_RENDER_CONFIG = {
    "show": {"sidebar": True, "info": True, "servers": True, "operations": True,
             "messages": True, "schemas": True, "errors": True},
    "expand": {"messageExamples": True},
    "sidebar": {"showServers": "byDefault", "showOperations": "byDefault"},
}


def asyncapi_html(settings: CardDeskSettings) -> str:
    """The AsyncAPI page, rendered in the browser by the vendored standalone component."""
    spec = specification(settings)
    # `</` inside a <script> would end it early: escape the slash in the embedded JSON.
    document = json.dumps({"schema": spec.to_jsonable(), "config": _RENDER_CONFIG},
                          ensure_ascii=False).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Card Desk message contract AsyncAPI</title>
<link rel="stylesheet" href="{ASYNCAPI_STATIC_PATH}/default.min.css">
</head>
<body>
<div id="asyncapi"></div>
<script src="{ASYNCAPI_STATIC_PATH}/index.js"></script>
<script>window.AsyncApiStandalone.render({document}, document.getElementById("asyncapi"));</script>
</body>
</html>"""
