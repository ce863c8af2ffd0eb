"""How far this process's followers have got, for the barrier to read without asking Kafka.

A follower's batch returns only once its effects are committed in PostgreSQL (or its poison
records dead-lettered), which is when Kafka would be told to commit its offsets. Recording
the offset after each partition's last record at that moment gives the barrier the same
truth as the group's committed offsets, earlier and without a request: a command batch then
waits on the follower itself, woken the moment the follower moves, instead of polling the
group coordinator. Partitions another instance applies are never recorded here; for them
the barrier still asks Kafka, and so it does for a partition of its own that it has not yet
seen a figure for (nothing applied since the process started), and for every partition still
behind after 200 ms of waiting (a figure left from before a rebalance gave the partition to
another instance and back can be older than what that instance committed)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Mapping

from aiokafka import TopicPartition


class FollowerProgress:
    """The next offset to apply per partition: only ever raised."""

    def __init__(self) -> None:
        self._next: dict[TopicPartition, int] = {}
        self._moved = asyncio.Event()
        self._assignments: list[Callable[[], Collection[TopicPartition]]] = []

    def consumer(self, assignment: Callable[[], Collection[TopicPartition]]) -> None:
        """A consumer of this process whose records are reported here, by what it is
        assigned now (nothing while it is stopped)."""
        self._assignments.append(assignment)

    def unseen(self, partitions: Collection[TopicPartition]) -> set[TopicPartition]:
        """Those of `partitions` this process will not report moving: assigned to none of
        its consumers (another instance's, or none while paused), or without a figure yet."""
        own = set().union(*(assignment() for assignment in self._assignments))
        return {tp for tp in partitions if tp not in own or tp not in self._next}

    def applied(self, topic: str, partition: int, next_offset: int) -> None:
        """The records of `topic`/`partition` before `next_offset` are applied for good."""
        self.known({TopicPartition(topic, partition): next_offset})

    def known(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Raise each partition to what is known applied elsewhere (the group's committed
        offsets); a lower figure than the one held changes nothing."""
        moved = False
        for tp, offset in offsets.items():
            if offset > self._next.get(tp, -1):
                self._next[tp] = offset
                moved = True
        if moved:
            self._moved.set()
            self._moved = asyncio.Event()

    def behind(self, targets: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """The partitions of `targets` not yet applied up to their target, with how many
        records they lack (all of them when nothing is known)."""
        return {tp: end - self._next.get(tp, 0) for tp, end in targets.items()
                if self._next.get(tp, 0) < end}

    async def moved(self, timeout_s: float) -> None:
        """Return when any partition moves, or after `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._moved.wait(), max(timeout_s, 0.0))
