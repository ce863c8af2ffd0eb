"""Every Kafka topic of the external contract (DESIGN section 3), with its configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

SERVICES: tuple[str, ...] = ("auth", "loss", "review", "issuance")
REPLIES_TOPIC = "channel.replies"

# Event topics are the audit log: kept forever, by time and by size. They hold personal
# data only as ciphertext under per-citizen keys, so erasing a key erases the person.
KEEP_FOREVER: Mapping[str, str] = MappingProxyType({"retention.ms": "-1", "retention.bytes": "-1"})
# Commands may carry a channel's unsealed personal data and face embeddings: they are kept
# only as long as a redelivery or an investigation needs them (7 days; DLQs 30 days).
COMMANDS_RETENTION: Mapping[str, str] = MappingProxyType({"retention.ms": str(7 * 86_400_000)})
COMMAND_DLQ_RETENTION: Mapping[str, str] = MappingProxyType(
    {"retention.ms": str(30 * 86_400_000)})


@dataclass(frozen=True)
class TopicSpec:
    """A topic to create: name, partition count and topic-level configuration."""

    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)
    replication_factor: int = 1


def command_topic(service: str) -> str:
    return f"{service}.commands"


def event_topic(service: str) -> str:
    return f"{service}.events"


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


def all_topics(partitions: int) -> list[TopicSpec]:
    """Commands, events, replies and one DLQ per consumed topic, all with `partitions`."""
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    topics: list[TopicSpec] = []
    for service in SERVICES:
        commands, events = command_topic(service), event_topic(service)
        topics.append(TopicSpec(commands, partitions, COMMANDS_RETENTION))
        topics.append(TopicSpec(events, partitions, KEEP_FOREVER))
        topics.append(TopicSpec(dlq_topic(commands), partitions, COMMAND_DLQ_RETENTION))
        # A dead-lettered event leaves only by an operator's decision, never by age.
        topics.append(TopicSpec(dlq_topic(events), partitions, KEEP_FOREVER))
    topics.append(TopicSpec(REPLIES_TOPIC, partitions, COMMANDS_RETENTION))
    return topics
