"""What start-up made, out of the cyclic collector's sight (`shared.runtime.freeze_start_up`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.runtime import freeze_start_up


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    node = Node()
    node.other = node  # only the cyclic collector frees it
    return node


@pytest.fixture(autouse=True)
def _unfrozen_afterwards() -> Iterator[None]:
    yield
    gc.unfreeze()


def tracked(obj: object) -> bool:
    """Whether the collector's generations hold `obj` (frozen objects are in none)."""
    return any(o is obj for o in gc.get_objects())


def test_what_is_alive_at_start_up_is_frozen() -> None:
    kept = cycle()

    freeze_start_up()

    assert gc.get_freeze_count() > 0
    assert not tracked(kept)


def test_garbage_of_start_up_is_collected_before_the_freeze() -> None:
    gone = weakref.ref(cycle())

    freeze_start_up()

    assert gone() is None


def test_what_is_made_afterwards_is_collected_as_before() -> None:
    freeze_start_up()
    later = cycle()
    gone = weakref.ref(later)
    assert tracked(later)

    del later
    gc.collect()

    assert gone() is None
