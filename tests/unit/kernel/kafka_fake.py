"""A stand-in for the Kafka clients of the follower barrier that counts the requests a real
broker would get: end offsets, committed offsets and the coordinator lookups aiokafka's admin
client makes when it is not given the coordinator."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

from aiokafka import TopicPartition
from aiokafka.structs import OffsetAndMetadata

TOPIC = "loss.events"


class FakeKafka:
    """One topic, its end offsets and one group's commits; `gate`, while set to an unset
    event, holds every request of that kind until it is set (a broker that is slow, or gone)."""

    def __init__(self, partitions: int = 3, *, latency_s: float = 0.002) -> None:
        self.partitions = [TopicPartition(TOPIC, p) for p in range(partitions)]
        self.ends = dict.fromkeys(self.partitions, 5)
        self.committed = dict.fromkeys(self.partitions, 5)
        self.latency_s = latency_s
        self.coordinator = 1
        self.requests: Counter[str] = Counter()
        self.fetched: list[set[TopicPartition]] = []  # the partitions of each OffsetFetch
        self.gates: dict[str, asyncio.Event] = {}

    async def _request(self, kind: str) -> None:
        self.requests[kind] += 1
        await asyncio.sleep(self.latency_s)
        if kind in self.gates:
            await self.gates[kind].wait()

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        await self._request("Metadata")
        return [{"topic": TOPIC, "partitions": [{"partition": tp.partition}
                                                for tp in self.partitions]}]

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        asked_at = dict(self.ends)  # the broker answers with the ends when it gets the request
        await self._request("ListOffsets")
        return {tp: asked_at[tp] for tp in partitions}

    async def find_coordinator(self, group_id: str) -> int:
        await self._request("FindCoordinator")
        return self.coordinator

    async def list_consumer_group_offsets(
            self, group_id: str, group_coordinator_id: int | None = None,
            partitions: list[TopicPartition] | None = None) -> Mapping[TopicPartition, Any]:
        if group_coordinator_id is None:  # as aiokafka does
            group_coordinator_id = await self.find_coordinator(group_id)
        await self._request("OffsetFetch")
        self.fetched.append(set(partitions or ()))
        if group_coordinator_id != self.coordinator:
            return {}  # NOT_COORDINATOR is a whole-group error: aiokafka returns no partitions
        return {tp: OffsetAndMetadata(self.committed[tp], "") for tp in partitions or ()}

    def publish(self, partition: int = 0) -> None:
        self.ends[self.partitions[partition]] += 1

    def follow_all(self) -> None:
        self.committed = dict(self.ends)
