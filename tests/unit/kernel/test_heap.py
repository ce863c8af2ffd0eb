"""A started service's heap: what startup built is frozen out of later collections, and
every collection's pause is timed (`carddesk_gc_pause_seconds`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from shared.metrics import REGISTRY, observe_collections
from shared.runtime import freeze_startup_heap


class Node:
    """An object that can sit in a reference cycle and be watched by a weak reference."""

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def pauses(generation: int) -> tuple[float, float]:
    labels = {"generation": str(generation)}
    return (REGISTRY.get_sample_value("carddesk_gc_pause_seconds_count", labels) or 0.0,
            REGISTRY.get_sample_value("carddesk_gc_pause_seconds_sum", labels) or 0.0)


@pytest.fixture
def thawed() -> Iterator[None]:
    """The test process's heap unfrozen again afterwards."""
    yield
    gc.unfreeze()


def test_startup_is_frozen_and_garbage_made_later_is_still_collected(thawed: None) -> None:
    left_over = cycle()  # startup's own garbage: collected before the freeze, not kept
    frozen = freeze_startup_heap()
    assert frozen > 1000
    assert gc.get_freeze_count() == frozen
    assert left_over() is None

    later = cycle()
    assert later() is not None
    gc.collect()
    assert later() is None, "a cycle made after the freeze was not collected"


def test_a_full_collection_walks_fewer_objects_once_startup_is_frozen(thawed: None) -> None:
    gc.collect()
    tracked = len(gc.get_objects())
    freeze_startup_heap()
    assert len(gc.get_objects()) < tracked / 10


@pytest.fixture
def by_hand() -> Iterator[None]:
    """No collection but those the test runs."""
    gc.disable()
    yield
    gc.enable()


def test_each_collection_is_observed_by_its_generation(by_hand: None) -> None:
    observe_collections()
    installed = len(gc.callbacks)
    observe_collections()  # once per process, however often a runtime starts
    assert len(gc.callbacks) == installed
    before = {generation: pauses(generation) for generation in range(3)}
    gc.collect(2)
    gc.collect(0)
    count, seconds = pauses(2)
    assert count == before[2][0] + 1
    assert seconds > before[2][1]
    assert pauses(0)[0] == before[0][0] + 1
    assert pauses(1) == before[1]
