"""The event envelope of DESIGN section 5 and its hash chain."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from pydantic import BaseModel, ConfigDict, Field

GENESIS_HASH = "0" * 64


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the one byte form that hashes and Kafka values use."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_bytes(value: Any) -> bytes:
    """`canonical_json(value)` for a value `orjson.loads` made, in the usual case (strings,
    integers, objects, arrays: what events hold). Only for checking a hash: a float's
    spelling, say, can differ, so a mismatch is checked again over `canonical_json`."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def chain_hash(prev_hash: str, body_without_hash: Mapping[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(body_without_hash)).hexdigest()


class PendingEvent(BaseModel):
    """An event a decider produced, before the store gives it a version and a hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: UUID
    type: str
    schema_version: int = 1
    citizen_ref: str
    occurred_at: datetime
    correlation_id: str
    causation_id: str
    data: dict[str, Any] = Field(default_factory=dict)


class EventEnvelope(BaseModel):
    """A stored event: what goes to Kafka and what auditors verify."""

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
    prev_hash: str
    hash: str
    data: dict[str, Any]

    @classmethod
    def seal(
        cls, pending: PendingEvent, stream_id: str, version: int, prev_hash: str
    ) -> EventEnvelope:
        body = pending.model_dump(mode="json") | {
            "stream_id": stream_id,
            "version": version,
            "prev_hash": prev_hash,
        }
        return cls.model_validate(body | {"hash": chain_hash(prev_hash, body)})

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json_dict())


def hash_is_intact(body: Mapping[str, Any]) -> bool:
    """True when the event's own hash matches its content and its prev_hash."""
    rest = {k: v for k, v in body.items() if k != "hash"}
    return body.get("hash") == chain_hash(str(body.get("prev_hash", "")), rest)


class ChainBreak(BaseModel):
    model_config = ConfigDict(frozen=True)

    stream_id: str
    version: int
    reason: str


class StreamCursor:
    """Where the check of one stream stands: the version and prev_hash its next event needs.

    Feeding a stream's events one by one in log order finds what `verify_stream` finds,
    without holding the stream in memory (auditors read the whole log)."""

    __slots__ = ("expected_prev", "expected_version", "stream_id")

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.expected_prev = GENESIS_HASH
        self.expected_version = 1

    def check(self, body: Mapping[str, Any]) -> list[ChainBreak]:
        stream_id = self.stream_id
        breaks: list[ChainBreak] = []
        version = int(body.get("version", -1))
        if version != self.expected_version:
            breaks.append(ChainBreak(stream_id=stream_id, version=version,
                                     reason=f"expected version {self.expected_version}"))
        if body.get("prev_hash") != self.expected_prev:
            breaks.append(ChainBreak(stream_id=stream_id, version=version,
                                     reason="prev_hash does not link to the previous event"))
        if not hash_is_intact(body):
            breaks.append(ChainBreak(stream_id=stream_id, version=version,
                                     reason="hash does not match the event's content"))
        self.expected_prev = str(body.get("hash"))
        self.expected_version = version + 1
        return breaks


def verify_stream(stream_id: str, bodies: Iterable[Mapping[str, Any]]) -> list[ChainBreak]:
    """Check one stream's events, in log order: gapless versions, linked and intact hashes."""
    cursor = StreamCursor(stream_id)
    return [chain_break for body in bodies for chain_break in cursor.check(body)]
