"""The channel side of a reply topic: replies matched to the requests waiting for them (the
channel simulator and the bureau console both send commands and await their replies)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer

from shared.intake.messages import Reply
from shared.kafka import IDLE_WAKE_MS

Waiting = Callable[[str], "asyncio.Future[Reply] | None"]


async def deliver_replies(replies: AIOKafkaConsumer, waiting: Waiting) -> None:
    """Read `replies` until cancelled, resolving the future `waiting` gives for each reply's
    request id; a record that is not a reply, or that nobody waits for, is skipped."""
    while True:
        batch = await replies.getmany(timeout_ms=IDLE_WAKE_MS)
        for records in batch.values():
            for record in records:
                try:
                    reply = Reply.model_validate_json(record.value)
                except ValueError:
                    continue
                future = waiting(reply.request_id)
                if future is not None and not future.done():
                    future.set_result(reply)
