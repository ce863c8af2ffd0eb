"""Every Kafka topic of the external contract (DESIGN section 3), with its configuration."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

SERVICES: tuple[str, ...] = ("auth", "loss", "review", "issuance")
REPLY_TOPIC_PREFIX = "channel.replies."
# What Kafka allows in a topic name, so a channel id always makes a valid reply topic.
_CHANNEL_ID = re.compile(r"[A-Za-z0-9_-]{1,200}")

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


def reply_topic(channel_id: str) -> str:
    """`channel.replies.<channel_id>`: the replies to one channel, readable only by it."""
    if not _CHANNEL_ID.fullmatch(channel_id):
        raise ValueError(f"not a usable channel id: {channel_id[:50]!r}")
    return f"{REPLY_TOPIC_PREFIX}{channel_id}"


def all_topics(partitions: int, channels: Iterable[str]) -> list[TopicSpec]:
    """Commands, events, one DLQ per consumed topic and one reply topic per channel id of
    `channels` (the channels file's), all with `partitions`."""
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
    topics.extend(TopicSpec(reply_topic(channel_id), partitions, COMMANDS_RETENTION)
                  for channel_id in sorted(set(channels)))
    return topics
