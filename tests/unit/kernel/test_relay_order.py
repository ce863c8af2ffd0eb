"""The relay sends a batch's replies only once Kafka has acknowledged its events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from cardctl.top import parse, total
from shared.metrics import exposition
from shared.outbox import OutboxRelay
from tests.support import OutboxRows, eventually

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


class Rounds:
    """A connection that gives one list of rows per read (less the positions the relay
    leaves out) and notes the positions each statement marked sent."""

    def __init__(self, *rounds: list[dict[str, Any]]) -> None:
        self.rounds = list(rounds)
        self.left_out: list[list[int]] = []
        self.marked: list[list[int]] = []

    async def fetch(self, _sql: str, _limit: int, left_out: list[int],
                    marking: list[int]) -> list[dict[str, Any]]:
        self.left_out.append(left_out)
        if marking:
            self.marked.append(marking)
        rows = self.rounds.pop(0) if self.rounds else []
        return [r for r in rows if r["position"] not in left_out]

    async def execute(self, _sql: str, positions: list[int]) -> None:
        self.marked.append(positions)


async def test_a_rounds_replies_go_out_with_the_next_rounds_events_and_are_marked_once_acked(
) -> None:
    producer = Producer()
    # The second read also finds row 0: its transaction took the position first and
    # committed last. It is sent, not left behind the reply in flight.
    conn = Rounds([row(1, "loss.events", EVENT), row(2, "channel.replies.app")],
                  [row(0, "loss.events", EVENT), row(2, "channel.replies.app"),
                   row(3, "loss.events", EVENT), row(4, "channel.replies.wechat-oa")])
    relay = OutboxRelay(None, producer, "unit_order")

    assert await relay._publish(conn) == 2
    assert conn.marked == []  # the event is acknowledged, the reply not yet
    assert producer.sent[-1] == ("channel.replies.app", set())  # after its event's ack

    assert await relay._publish(conn) == 3
    # The read marked the acknowledged event and left it out, with the reply in flight.
    assert conn.left_out == [[], [1, 2]] and conn.marked == [[1]]
    # The next events went out while the reply could still be in flight; the next reply
    # only once they were acknowledged.
    assert producer.sent[2] == ("loss.events", {"channel.replies.app"})
    assert producer.sent[4] == ("channel.replies.wechat-oa", set())

    assert await relay._publish(conn) == 0
    assert conn.marked == [[1], [2, 0, 3]]
    assert conn.left_out == [[], [1, 2], [2, 0, 3, 4]]
    assert await relay.publish_pending(conn) == 0
    assert conn.marked == [[1], [2, 0, 3], [4]]
    assert conn.left_out[-1] == [4]  # marked by that read; nothing else left out


class Listening(Rounds):
    """`Rounds` as the running relay uses it: its lock is free, nothing to purge."""

    async def fetchval(self, sql: str, *_: Any) -> bool | int:
        return "pg_try_advisory_lock" in sql or 0

    async def execute(self, sql: str, *positions: list[int]) -> None:
        if positions:
            self.marked.append(positions[0])

    async def add_listener(self, *_: Any) -> None: ...

    async def remove_listener(self, *_: Any) -> None: ...


class OneConnection:
    def __init__(self, conn: Listening) -> None:
        self.conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Listening]:
        yield self.conn


async def test_an_idle_relay_marks_what_kafka_acknowledged_with_its_next_read_not_an_update(
) -> None:
    def replies_published() -> float:
        return total(parse(exposition()[0].decode()), "carddesk_replies_published_total",
                     service="unit_idle")

    producer = Producer()
    conn = Listening([row(1, "loss.events", EVENT), row(2, "channel.replies.app")])
    relay = OutboxRelay(OneConnection(conn), producer, "unit_idle",
                        poll_interval=1.0)
    before = replies_published()

    async def replied() -> bool:
        return len(producer.sent) == 2

    async def marked() -> bool:
        return len(conn.marked) == 1

    running = asyncio.create_task(relay.run())
    try:
        await eventually(replied, timeout_s=5)
        await asyncio.sleep(0.2)  # the reply is acknowledged; nothing else committed
        assert conn.marked == [] and conn.left_out == [[]]  # one read, no update
        assert replies_published() == before + 1  # counted once acknowledged

        await eventually(marked, timeout_s=5)  # the fallback poll's read marks both
        assert conn.marked == [[1, 2]]
        assert conn.left_out == [[], [1, 2]]  # and did not read them again
    finally:
        relay.stop()
        await asyncio.wait_for(running, 5)
    assert conn.marked == [[1, 2]]  # stopping has nothing left to mark
    assert replies_published() == before + 1  # and marking it did not count it again
