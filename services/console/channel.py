"""The console as a bureau channel: signs each command with its channel secret, seals the
personal fields, and waits for the reply on its channel's reply topic."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from shared.channels import Channel, sign
from shared.commands import Reply
from shared.kafka import IDLE_WAKE_MS, as_channel, client_options
from shared.replies import deliver_replies
from shared.sealing import FieldSealer, SealContext
from shared.settings import CardDeskSettings
from shared.topics import command_topic, reply_topic

log = structlog.get_logger()


class ReplyTimeoutError(Exception):
    """No reply within the console's wait (or Kafka did not take the command): it may still
    be decided later, so the page says to check the citizen's status."""


class ConsoleChannel:
    """A producer for commands and a reader of this channel's replies, started once."""

    def __init__(self, settings: CardDeskSettings, channel: Channel, *,
                 reply_timeout_s: float) -> None:
        if not channel.bureau:
            raise ValueError(f"channel {channel.channel_id!r} is not a bureau channel")
        self.channel = channel
        self.reply_timeout_s = reply_timeout_s
        self.topic = reply_topic(channel.channel_id)
        self.sealer = FieldSealer(settings.command_sealing_public_key)
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._replies: AIOKafkaConsumer | None = None
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        """Connect (clients are made here: aiokafka wants a running loop) and read the
        reply topic from its end."""
        # As the channel itself (DESIGN 8): it writes the command topics, reads its replies.
        options = client_options(as_channel(self.settings, self.channel))
        bootstrap = self.settings.kafka_bootstrap
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, **options)
        self._replies = replies = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
            consumer_timeout_ms=IDLE_WAKE_MS,
            fetch_max_wait_ms=self.settings.consumer_fetch_wait_ms, **options)
        await self._producer.start()
        await replies.start()
        async with asyncio.timeout(timeout_s):
            partitions = replies.partitions_for_topic(self.topic)
            while not partitions:
                await asyncio.sleep(0.2)
                await replies._client.force_metadata_update()
                partitions = replies.partitions_for_topic(self.topic)
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        replies.assign(assigned)
        await replies.seek_to_end(*assigned)
        for tp in assigned:  # positions resolved now: no reply sent after this is missed
            await replies.position(tp)
        self._reader = asyncio.create_task(deliver_replies(replies, self._waiting.get))

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._replies is not None:
            await self._replies.stop()
        if self._producer is not None:
            await self._producer.stop()

    def envelope(self, command_type: str, payload: Mapping[str, Any], request_id: str,
                 issued_at: datetime) -> bytes:
        return json.dumps({
            "request_id": request_id, "channel": self.channel.channel_id,
            "issued_at": issued_at.isoformat(), "type": command_type, "payload": dict(payload),
        }, ensure_ascii=False).encode()

    async def send(self, service: str, command_type: str, payload: Mapping[str, Any], *,
                   issued_at: datetime, request_id: str | None = None) -> Reply:
        """Seal, sign and send one command; its reply, or `ReplyTimeoutError`."""
        request_id = request_id or str(uuid.uuid4())
        sealed = self.sealer.seal_payload(
            SealContext(self.channel.channel_id, command_type, request_id), payload)
        value = self.envelope(command_type, sealed, request_id, issued_at)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        if self._producer is None:
            raise ReplyTimeoutError("the console's Kafka client has not started")
        try:
            async with asyncio.timeout(self.reply_timeout_s):
                await self._producer.send_and_wait(
                    command_topic(service), value, key=request_id.encode(),
                    headers=[("x-channel-id", self.channel.channel_id.encode()),
                             ("x-signature", sign(self.channel.secret, value).encode())])
                return await future
        except (TimeoutError, KafkaError) as exc:
            raise ReplyTimeoutError(request_id) from exc
        finally:
            self._waiting.pop(request_id, None)

    async def send_until_decided(self, service: str, command_type: str,
                                 payload: Mapping[str, Any], *, issued_at: datetime,
                                 attempts: int = 5) -> Reply:
        """`send`, again under the same request id while the service answers
        `not_yet_consistent` (never stored: the same request is decided afresh)."""
        request_id = str(uuid.uuid4())
        reply = await self.send(service, command_type, payload, issued_at=issued_at,
                                request_id=request_id)
        for _ in range(attempts - 1):
            if reply.code != "not_yet_consistent":
                break
            await asyncio.sleep(0.5)
            reply = await self.send(service, command_type, payload, issued_at=issued_at,
                                    request_id=request_id)
        return reply
