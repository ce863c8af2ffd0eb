"""`FollowerProgress`: what the barrier knows of its own process's followers."""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from shared.progress import FollowerProgress

P0, P1 = TopicPartition("loss.events", 0), TopicPartition("loss.events", 1)


def test_nothing_known_is_behind_by_everything_and_an_empty_partition_is_not() -> None:
    progress = FollowerProgress()
    assert progress.behind({P0: 5, P1: 0}) == {P0: 5}


def test_applied_records_count_and_a_lower_figure_never_lowers_them() -> None:
    progress = FollowerProgress()
    progress.applied("loss.events", 0, 5)
    progress.known({P0: 3, P1: 2})
    assert progress.behind({P0: 5, P1: 4}) == {P1: 2}
    progress.applied("loss.events", 1, 4)
    assert progress.behind({P0: 5, P1: 4}) == {}
    assert progress.behind({P0: 7}) == {P0: 2}


async def test_a_waiter_wakes_when_a_partition_moves_and_not_for_a_figure_it_had() -> None:
    progress = FollowerProgress()
    progress.applied("loss.events", 0, 5)
    loop = asyncio.get_running_loop()

    waiter = asyncio.create_task(progress.moved(5.0))
    await asyncio.sleep(0)
    progress.known({P0: 5})  # not a move
    await asyncio.sleep(0.01)
    assert not waiter.done()
    started = loop.time()
    progress.applied("loss.events", 0, 6)
    await asyncio.wait_for(waiter, 1.0)
    assert loop.time() - started < 1.0


async def test_a_wait_without_a_move_ends_at_its_bound() -> None:
    progress = FollowerProgress()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(progress.moved(0.05), 1.0)
    assert loop.time() - started >= 0.04
