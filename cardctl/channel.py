"""A channel simulator: signs commands as an upstream channel would and awaits their replies."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared.channels import ChannelRegistry, sign
from shared.commands import Reply
from shared.sealing import FieldSealer
from shared.settings import CardDeskSettings
from shared.topics import REPLIES_TOPIC, command_topic

# How long joining the reply topic may wait for its metadata (the broker may be starting).
METADATA_TIMEOUT_S = 30.0


class CommandRefusedError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class ChannelSimulator:
    """One producer and one `channel.replies` reader shared by every simulated channel."""

    @classmethod
    def for_settings(cls, settings: CardDeskSettings) -> Self:
        """A simulator with the configured channels that seals personal fields."""
        return cls(settings.kafka_bootstrap, ChannelRegistry.from_file(settings.channels_file),
                   settings.command_sealing_public_key)

    def __init__(self, bootstrap: str, channels: ChannelRegistry,
                 sealing_public_key: str | None = None) -> None:
        self.bootstrap = bootstrap
        self.channels = channels
        # With the services' public key, personal fields leave the channel sealed.
        self.sealer = FieldSealer(sealing_public_key) if sealing_public_key else None
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
        self._replies = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                         enable_auto_commit=False)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ChannelSimulator:
        await self._producer.start()
        await self._replies.start()
        partitions = self._replies.partitions_for_topic(REPLIES_TOPIC)
        deadline = asyncio.get_running_loop().time() + METADATA_TIMEOUT_S
        while not partitions:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{REPLIES_TOPIC} has no partitions after "
                                   f"{METADATA_TIMEOUT_S:.0f} s: is the topic created?")
            await asyncio.sleep(0.1)
            await self._replies._client.force_metadata_update()
            partitions = self._replies.partitions_for_topic(REPLIES_TOPIC)
        assigned = [TopicPartition(REPLIES_TOPIC, p) for p in sorted(partitions)]
        self._replies.assign(assigned)
        await self._replies.seek_to_end(*assigned)
        for tp in assigned:  # resolve positions now, so no reply sent after this is missed
            await self._replies.position(tp)
        self._reader = asyncio.create_task(self._read_replies())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self._replies.stop()
        await self._producer.stop()

    async def _read_replies(self) -> None:
        while True:
            batch = await self._replies.getmany(timeout_ms=200)
            for records in batch.values():
                for record in records:
                    try:
                        reply = Reply.model_validate_json(record.value)
                    except ValueError:
                        continue
                    future = self._waiting.get(reply.request_id)
                    if future is not None and not future.done():
                        future.set_result(reply)

    def envelope(self, channel_id: str, command_type: str, payload: Mapping[str, Any],
                 request_id: str | None = None) -> bytes:
        return json.dumps({
            "request_id": request_id or str(uuid.uuid4()),
            "channel": channel_id,
            "issued_at": datetime.now(UTC).isoformat(),
            "type": command_type,
            "payload": dict(payload),
        }, ensure_ascii=False).encode()

    async def send_raw(
        self, topic: str, value: bytes, *, channel_id: str, key: bytes,
        signature: str | None = None, request_id: str, timeout_s: float = 30.0,
    ) -> Reply:
        """Send bytes as they are (tests use it for forged or malformed messages)."""
        channel = self.channels.get(channel_id)
        if signature is None:
            signature = sign(channel.secret, value) if channel else "0" * 64
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self._producer.send_and_wait(
                topic, value, key=key,
                headers=[("x-channel-id", channel_id.encode()),
                         ("x-signature", signature.encode())],
            )
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(request_id, None)

    async def send(
        self, service: str, command_type: str, payload: Mapping[str, Any], *,
        channel_id: str, session_key: str | None = None, request_id: str | None = None,
        timeout_s: float = 30.0,
    ) -> Reply:
        """Sign and send a command; the key is the session id, else the request id."""
        request_id = request_id or str(uuid.uuid4())
        if self.sealer is not None:
            payload = self.sealer.seal_payload(command_type, payload)
        value = self.envelope(channel_id, command_type, payload, request_id)
        return await self.send_raw(
            command_topic(service), value, channel_id=channel_id,
            key=(session_key or request_id).encode(), request_id=request_id,
            timeout_s=timeout_s,
        )

    async def expect_accepted(
        self, service: str, command_type: str, payload: Mapping[str, Any], *,
        channel_id: str, session_key: str | None = None,
        retry_codes: frozenset[str] = frozenset(), retry_for_s: float = 30.0,
    ) -> Reply:
        """Send until accepted. `retry_codes` are refusals that only mean another service has
        not caught up yet (its events are still on their way); each try is a new request."""
        deadline = asyncio.get_running_loop().time() + retry_for_s
        while True:
            reply = await self.send(service, command_type, payload, channel_id=channel_id,
                                    session_key=session_key)
            if reply.status == "accepted":
                return reply
            if reply.code not in retry_codes or asyncio.get_running_loop().time() > deadline:
                raise CommandRefusedError(reply)
            await asyncio.sleep(0.2)
