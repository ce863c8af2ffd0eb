"""The relay sends a batch's replies only once Kafka has acknowledged its events."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from shared.outbox import OutboxRelay
from tests.support import OutboxRows

EVENT = json.dumps([["event-type", "CardIssued"], ["event-id", "e1"]])


class Producer:
    """Acknowledges each message a little after it was handed over; notes, for every
    message, the topics handed over and not yet acknowledged at that moment."""

    def __init__(self) -> None:
        self.unacknowledged: set[str] = set()
        self.sent: list[tuple[str, set[str]]] = []

    async def send(self, topic: str, **_: Any) -> asyncio.Future[None]:
        self.sent.append((topic, set(self.unacknowledged)))
        self.unacknowledged.add(topic)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def acknowledge() -> None:
            self.unacknowledged.discard(topic)
            done.set_result(None)

        asyncio.get_running_loop().call_later(0.01, acknowledge)
        return done


def row(position: int, topic: str, headers: str = "[]") -> dict[str, Any]:
    return {"position": position, "topic": topic, "key": b"k", "value": b"{}",
            "headers": headers}


async def test_a_reply_is_sent_only_after_the_events_before_it_are_acknowledged() -> None:
    producer = Producer()
    conn = OutboxRows([row(1, "issuance.events", EVENT), row(2, "issuance.events", EVENT),
                 row(3, "channel.replies.wechat-oa"),
                 row(4, "issuance.events", EVENT), row(5, "channel.replies.app")])

    sent = await OutboxRelay(None, producer, "unit_order").publish_pending(conn)

    assert sent == 5 and conn.marked
    replies = [pending for topic, pending in producer.sent if topic.startswith("channel.")]
    assert replies == [set(), {"channel.replies.wechat-oa"}]  # no event was in flight
    assert sorted(topic for topic, _ in producer.sent) == sorted(r["topic"] for r in conn.rows)


async def test_a_batch_of_replies_alone_is_sent_at_once() -> None:
    producer = Producer()
    conn = OutboxRows([row(1, "channel.replies.wechat-oa"), row(2, "channel.replies.app")])

    assert await OutboxRelay(None, producer, "unit_order").publish_pending(conn) == 2
    assert producer.sent == [("channel.replies.wechat-oa", set()),
                             ("channel.replies.app", {"channel.replies.wechat-oa"})]
