"""A batch is acknowledged by committing the partitions it moved (shared/kafka.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError
from faststream.kafka.message import FAKE_CONSUMER, KafkaAckableMessage

from shared.commits import DeferredCommits
from shared.kafka import BatchEndsCommit, commit_batch_ends
from shared.metrics import unread
from shared.runtime import parse_leniently

TOPIC = "status.followed"
AT_ONCE = DeferredCommits(interval_s=0)


def record(partition: int, offset: int, topic: str = TOPIC) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(topic=topic, partition=partition, offset=offset, timestamp=0,
                          timestamp_type=0, key=b"k", value=b"{}", checksum=None,
                          serialized_key_size=1, serialized_value_size=2, headers=[])


class Held:
    """The consumer's side FastStream's acknowledgement reaches: what it holds, what it was
    asked to commit and where it was rewound."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    async def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        assert offsets is not None, "a commit without offsets writes every assigned partition"
        self.commits.append(offsets)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self.assigned:  # as aiokafka's consumer refuses
            raise IllegalStateError(f"No current assignment for partition {partition}")
        self.seeks.append((partition, offset))


def every_partition(count: int = 24) -> set[TopicPartition]:
    return {TopicPartition(TOPIC, p) for p in range(count)}


async def test_a_batch_commits_the_offset_after_each_partitions_last_record_and_no_other() -> None:
    held = Held(every_partition())
    records = (record(3, 10), record(3, 11), record(7, 40))

    await BatchEndsCommit(held, records, AT_ONCE).commit()

    assert held.commits == [{TopicPartition(TOPIC, 3): 12, TopicPartition(TOPIC, 7): 41}]


async def test_a_partition_revoked_while_the_batch_ran_is_left_out() -> None:
    held = Held({TopicPartition(TOPIC, 7)})  # partition 3 went to another instance

    await BatchEndsCommit(held, (record(3, 10), record(7, 40)), AT_ONCE).commit()

    assert held.commits == [{TopicPartition(TOPIC, 7): 41}]


async def test_nothing_is_committed_when_every_partition_of_the_batch_was_revoked() -> None:
    held = Held(set())

    await BatchEndsCommit(held, (record(3, 10),), AT_ONCE).commit()

    assert held.commits == []


async def test_batches_acknowledged_within_the_interval_are_committed_once_together() -> None:
    held = Held(every_partition())
    commits = DeferredCommits(interval_s=0.05)

    await BatchEndsCommit(held, (record(3, 10), record(7, 40)), commits).commit()
    await BatchEndsCommit(held, (record(3, 11),), commits).commit()
    assert held.commits == []  # the consumer goes on fetching; nothing sent yet
    await asyncio.sleep(0.2)

    assert held.commits == [{TopicPartition(TOPIC, 3): 12, TopicPartition(TOPIC, 7): 41}]


async def test_a_rejected_batch_rewinds_each_partition_to_its_first_record() -> None:
    held = Held(every_partition())
    records = (record(3, 10), record(3, 11), record(7, 40))
    message = KafkaAckableMessage(raw_message=records, body=b"",
                                  consumer=BatchEndsCommit(held, records))

    await message.nack()

    assert sorted(held.seeks) == [(TopicPartition(TOPIC, 3), 10), (TopicPartition(TOPIC, 7), 40)]
    assert held.commits == []


async def test_a_rejected_batch_rewinds_every_partition_still_held_past_a_revoked_one() -> None:
    partitions = [3, 5, 7]
    held = Held({TopicPartition(TOPIC, 5), TopicPartition(TOPIC, 7)})  # 3 was revoked
    records = tuple(record(p, 10 * p) for p in partitions)
    message = KafkaAckableMessage(raw_message=records, body=b"",
                                  consumer=BatchEndsCommit(held, records))

    await message.nack()

    assert sorted(held.seeks) == [(TopicPartition(TOPIC, 5), 50), (TopicPartition(TOPIC, 7), 70)]


async def test_the_subscribers_parser_acknowledges_through_the_batch_ends() -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", group_id="g")  # never started
    records = (record(3, 10), record(7, 40))

    async def faststreams_parser(raw: Any) -> KafkaAckableMessage:
        return KafkaAckableMessage(raw_message=raw, body=b"", consumer=consumer)

    message = await parse_leniently(records, faststreams_parser)

    assert isinstance(message.consumer, BatchEndsCommit)


def test_a_message_of_the_test_broker_keeps_its_consumer() -> None:
    message = KafkaAckableMessage(raw_message=(record(0, 0),), body=b"", consumer=FAKE_CONSUMER)

    assert commit_batch_ends(message, (record(0, 0),)).consumer is FAKE_CONSUMER


def test_lag_counts_from_the_committed_offset_or_the_log_start_whichever_is_later() -> None:
    assert unread(start=0, end=50, committed=20) == 30
    assert unread(start=0, end=50, committed=None) == 50
    # Every record expired before the group read the partition: nothing is left to read.
    assert unread(start=50, end=50, committed=None) == 0
    assert unread(start=40, end=50, committed=-1) == 10
    assert unread(start=40, end=50, committed=45) == 5
