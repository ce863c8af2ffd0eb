"""Decider specifications for every service's unit tests:

    given(DECIDER, *history).when(command, context).then(*events)
    given(DECIDER, *history).when(command, context).then_refused(SomeError)

`history` is what the decider's `decode` gives `evolve` (for most services the contract's
events). Nothing here touches a store: the decider is folded and asked directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pytest

from shared.decider import Decider
from shared.errors import DomainError
from shared.events import DomainEvent

C = TypeVar("C")
S = TypeVar("S")
E = TypeVar("E")
X = TypeVar("X")


@dataclass(frozen=True)
class Given(Generic[C, S, E, X]):
    decider: Decider[C, S, E, X]
    history: Sequence[E]
    # The context of `when` unless it names one (a test module's usual context).
    context: X | None = None

    @property
    def state(self) -> S:
        return self.decider.fold(self.history)

    def when(self, command: C, context: X | None = None) -> When[C, S, E, X]:
        context = self.context if context is None else context
        assert context is not None, "when(command, context): no usual context was given"
        return When(self, command, context)


@dataclass(frozen=True)
class When(Generic[C, S, E, X]):
    given: Given[C, S, E, X]
    command: C
    context: X

    def decided(self) -> list[DomainEvent]:
        """What the decider answers (raises what it raises)."""
        return list(self.given.decider.decide(self.command, self.given.state, self.context))

    def then(self, *expected: DomainEvent) -> None:
        assert self.decided() == list(expected)

    def then_refused(self, error: type[DomainError], code: str | None = None) -> DomainError:
        """The refusal, of exactly `error`'s code (or `code`, for errors whose code varies)."""
        with pytest.raises(error) as raised:
            self.decided()
        assert raised.value.code == (code or error.code)
        return raised.value


def given(decider: Decider[C, S, E, X], *history: E, context: X | None = None,
          ) -> Given[C, S, E, X]:
    return Given(decider, history, context)


def one(events: Sequence[Any]) -> Any:
    """The single event of a decision (fails if there are more or none)."""
    [event] = events
    return event
