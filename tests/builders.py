"""The tests' one builder of sealed event streams: a citizen's events, sealed as the owning
service's store would seal them (on each stream, versions from 1 without a gap and every
`prev_hash` the hash of the event before)."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from shared.decider import Decider
from shared.envelope import GENESIS_HASH, EventEnvelope, PendingEvent
from shared.events import DomainEvent, EventMeta, to_pending

# The stream a service keeps per citizen, by the topic it publishes it on.
STREAM_PREFIX: Mapping[str, str] = MappingProxyType({
    "auth.events": "auth", "loss.events": "loss", "review.events": "review",
    "issuance.events": "card",
})


def new_citizen_ref() -> str:
    """A citizen_ref as the services make them: 64 lower-case hex digits."""
    return secrets.token_hex(32)


def sealed(stream_id: str, citizen_ref: str, event: DomainEvent, *, version: int = 1,
           prev_hash: str = GENESIS_HASH, at: datetime | None = None,
           event_id: uuid.UUID | None = None) -> EventEnvelope:
    """One event sealed at the place in its stream given here, right or wrong (a forgery's
    own hash is right; its place in the chain need not be)."""
    meta = EventMeta(citizen_ref, at or datetime.now(UTC), str(uuid.uuid4()), str(uuid.uuid4()))
    return EventEnvelope.seal(to_pending(event, meta, event_id or uuid.uuid4()), stream_id,
                              version, prev_hash)


class CitizenStreams:
    """Appends events to one citizen's streams and returns them sealed, each chained onto the
    last one appended to the same stream.

    Events are stamped with the wall clock when sealed; with a `step`, they are instead
    `step` apart from `start` (a deterministic order). `at` stamps one event, and a stepped
    clock goes on from there."""

    def __init__(self, citizen_ref: str | None = None, *, start: datetime | None = None,
                 step: timedelta | None = None) -> None:
        self.citizen_ref = citizen_ref or new_citizen_ref()
        self.now = start or datetime.now(UTC)
        self.step = step
        self._heads: dict[str, EventEnvelope] = {}

    def stream_id(self, topic: str) -> str:
        """The citizen's stream on a contract topic (`card-<ref>` on issuance.events)."""
        return f"{STREAM_PREFIX[topic]}-{self.citizen_ref}"

    def emit(self, topic: str, event: DomainEvent, *, at: datetime | None = None,
             ) -> EventEnvelope:
        """The next event of the citizen's stream on a contract topic."""
        return self.append(self.stream_id(topic), event, at=at)

    def append(self, stream_id: str, event: DomainEvent, *, at: datetime | None = None,
               ) -> EventEnvelope:
        """The next event of any of the citizen's streams."""
        self.now = at or (self.now + self.step if self.step else datetime.now(UTC))
        head = self._heads.get(stream_id)
        envelope = sealed(stream_id, self.citizen_ref, event, at=self.now,
                          version=head.version + 1 if head else 1,
                          prev_hash=head.hash if head else GENESIS_HASH)
        self._heads[stream_id] = envelope
        return envelope

    def emit_all(self, topic: str, events: Iterable[DomainEvent]) -> list[EventEnvelope]:
        return [self.emit(topic, event) for event in events]

    def append_all(self, stream_id: str, events: Iterable[DomainEvent]) -> list[EventEnvelope]:
        return [self.append(stream_id, event) for event in events]

    def after(self, envelope: EventEnvelope) -> CitizenStreams:
        """Go on from an event sealed elsewhere: the next one on its stream follows it."""
        self._heads[envelope.stream_id] = envelope
        return self


class Citizens(dict[str, CitizenStreams]):
    """Many citizens' streams, by citizen_ref, each begun on first use (wall-clock stamps)."""

    def __missing__(self, citizen_ref: str) -> CitizenStreams:
        streams = self[citizen_ref] = CitizenStreams(citizen_ref)
        return streams


def pending(n: int, citizen: str = "ref") -> list[PendingEvent]:
    """`n` probe events for a store to seal and append."""
    return [
        PendingEvent(event_id=uuid.uuid4(), type="Probe", citizen_ref=citizen,
                     occurred_at=datetime.now(UTC), correlation_id="c", causation_id="c",
                     data={"i": i})
        for i in range(n)
    ]


def _identity(envelope: EventEnvelope) -> EventEnvelope:
    return envelope


def _count(state: int, _event: EventEnvelope) -> int:
    return state + 1


# A stream's state is how many events it holds; the stream id is the citizen_ref.
COUNTER: Decider[None, int, EventEnvelope, None] = Decider(
    initial=0, evolve=_count, decide=lambda _c, _s, _x: [], decode=_identity,
    stream_id=lambda ref: ref, is_erased=lambda _s: False)
