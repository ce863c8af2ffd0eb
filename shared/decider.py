"""A service's pure core as one value: how its per-citizen stream is named, decoded, folded and
decided. Handlers hand a `Decider` to `shared.application.handle_command`; erasure, tests and
the state cache take the same value, so no service spells these six things twice.

Deciders never read the clock or make ids: the time and new ids arrive in the context,
`decide(command, state, context)`, whose type each service defines (a `Context` with the
service's read tables and policy added).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Generic, TypeVar

from uuid_utils.compat import uuid7

from shared.envelope import EventEnvelope
from shared.events import DomainEvent

C = TypeVar("C")  # the service's commands
S = TypeVar("S")  # the folded state of one citizen's stream
E = TypeVar("E")  # the stream's events, as `decode` gives them to `evolve`
X = TypeVar("X")  # what `decide` knows besides the state: the time, new ids, read tables

Clock = Callable[[], datetime]
IdSource = Callable[[], str]


def utc_now() -> datetime:
    """The clock every service runs on; tests pass their own."""
    return datetime.now(UTC)


def new_uuid() -> str:
    """The id source every service runs on; tests pass their own. Time-ordered (UUIDv7,
    RFC 9562: milliseconds since the epoch, then 74 random bits), so that the indexes keyed
    by ids a service mints take each new key beside the last one, not on a random page."""
    return str(uuid7())


@dataclass(frozen=True, slots=True)
class Context:
    """The time a decision is taken at and where its new ids come from."""

    now: datetime
    # Keyword-only, so that a service's context adds fields of its own after it.
    new_id: IdSource = field(default=new_uuid, compare=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class Decider(Generic[C, S, E, X]):
    """`initial` folded with `evolve` over `decode`d events of `stream_id(citizen_ref)` is the
    state `decide` refuses or answers with new events; `is_erased` says whether the stream
    ended with the citizen's erasure."""

    initial: S
    evolve: Callable[[S, E], S]
    decide: Callable[[C, S, X], Sequence[DomainEvent]]
    decode: Callable[[EventEnvelope], E]
    stream_id: Callable[[str], str]
    is_erased: Callable[[S], bool]

    def fold(self, events: Sequence[E], state: S | None = None) -> S:
        """The state after `events`, from `state` (the initial one unless given)."""
        folded = self.initial if state is None else state
        for event in events:
            folded = self.evolve(folded, event)
        return folded
