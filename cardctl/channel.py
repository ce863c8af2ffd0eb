"""A channel simulator: signs commands as an upstream channel would and awaits their replies."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from shared.channels import Channel, ChannelRegistry, sign
from shared.commands import Reply
from shared.kafka import client_options
from shared.sealing import FieldSealer, SealContext
from shared.settings import CardDeskSettings
from shared.topics import REPLY_TOPIC_PREFIX, command_topic, reply_topic
from shared.tracing import configure_tracing, start_span, traceparent_header


class ChannelChoiceError(ValueError):
    """A `--channel` that the channels file does not have, or not of the needed kind."""


def pick_channel(channels: ChannelRegistry, requested: str | None, *, bureau: bool) -> Channel:
    """The channel named by `requested`, else the first bureau (`bureau`) or citizen channel
    of the channels file: what `cardctl seed`, `demo` and `erase` act as."""
    if requested is not None:
        channel = channels.get(requested)
        if channel is None:
            raise ChannelChoiceError(f"the channels file has no channel {requested!r}")
        if bureau and not channel.bureau:
            raise ChannelChoiceError(f"{requested!r} is not a bureau channel")
        return channel
    for channel in channels:
        if channel.bureau == bureau:
            return channel
    kind = "bureau" if bureau else "citizen"
    raise ChannelChoiceError(f"the channels file has no {kind} channel")


class CommandRefusedError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class ChannelSimulator:
    """One producer, and one reader of the reply topics of the channels it acts as."""

    @classmethod
    def for_settings(cls, settings: CardDeskSettings,
                     channel_ids: Iterable[str] | None = None) -> Self:
        """A simulator with the configured channels that seals personal fields; it reads the
        reply topics of `channel_ids` (default: every channel of the file). Its commands
        start traces (exported where CARDDESK_OTLP_ENDPOINT says)."""
        configure_tracing("channel", settings.otlp_endpoint)
        return cls(settings.kafka_bootstrap, ChannelRegistry.from_file(settings.channels_file),
                   settings.command_sealing_public_key, channel_ids=channel_ids,
                   kafka_options=client_options(settings))

    def __init__(self, bootstrap: str, channels: ChannelRegistry,
                 sealing_public_key: str | None = None, *,
                 channel_ids: Iterable[str] | None = None,
                 kafka_options: Mapping[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.channels = channels
        self.channel_ids = (tuple(channel_ids) if channel_ids is not None
                            else tuple(c.channel_id for c in channels))
        # With the services' public key, personal fields leave the channel sealed.
        self.sealer = FieldSealer(sealing_public_key) if sealing_public_key else None
        options = dict(kafka_options or {})
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1,
                                          max_request_size=2 * 1024 * 1024, **options)
        self._replies = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                         enable_auto_commit=False, **options)
        self._waiting: dict[tuple[str, str], asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ChannelSimulator:
        await self._producer.start()
        await self._replies.start()
        topics = [reply_topic(channel_id) for channel_id in self.channel_ids]
        assigned: list[TopicPartition] = []
        deadline = asyncio.get_running_loop().time() + 30.0
        for topic in topics:
            partitions = self._replies.partitions_for_topic(topic)
            while not partitions:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"reply topic {topic} does not exist")
                await asyncio.sleep(0.1)
                await self._replies._client.force_metadata_update()
                partitions = self._replies.partitions_for_topic(topic)
            assigned.extend(TopicPartition(topic, p) for p in sorted(partitions))
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
            for tp, records in batch.items():
                channel_id = tp.topic.removeprefix(REPLY_TOPIC_PREFIX)
                for record in records:
                    try:
                        reply = Reply.model_validate_json(record.value)
                    except ValueError:
                        continue
                    future = self._waiting.get((channel_id, reply.request_id))
                    if future is not None and not future.done():
                        future.set_result(reply)

    def envelope(self, channel_id: str, command_type: str, payload: Mapping[str, Any],
                 request_id: str | None = None, issued_at: datetime | None = None) -> bytes:
        return json.dumps({
            "request_id": request_id or str(uuid.uuid4()),
            "channel": channel_id,
            "issued_at": (issued_at or datetime.now(UTC)).isoformat(),
            "type": command_type,
            "payload": dict(payload),
        }, ensure_ascii=False).encode()

    async def send_raw(
        self, topic: str, value: bytes, *, channel_id: str, key: bytes,
        signature: str | None = None, request_id: str, timeout_s: float = 30.0,
    ) -> Reply:
        """Send bytes as they are (tests use it for forged or malformed messages) and await
        the reply on `channel_id`'s reply topic."""
        channel = self.channels.get(channel_id)
        if signature is None:
            signature = sign(channel.secret, value) if channel else "0" * 64
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[(channel_id, request_id)] = future
        try:
            await self._producer.send_and_wait(
                topic, value, key=key,
                headers=[("x-channel-id", channel_id.encode()),
                         ("x-signature", signature.encode()),
                         *(h for h in (traceparent_header(),) if h is not None)],
            )
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop((channel_id, request_id), None)

    async def send(
        self, service: str, command_type: str, payload: Mapping[str, Any], *,
        channel_id: str, session_key: str | None = None, request_id: str | None = None,
        issued_at: datetime | None = None, timeout_s: float = 30.0,
    ) -> Reply:
        """Sign and send a command; the key is the session id, else the request id."""
        request_id = request_id or str(uuid.uuid4())
        if self.sealer is not None:
            payload = self.sealer.seal_payload(
                SealContext(channel_id, command_type, request_id), payload)
        value = self.envelope(channel_id, command_type, payload, request_id, issued_at)
        # Where a trace begins: the command, its events and their followers join it.
        span = start_span(f"{command_type} send", {}, {"carddesk.command.type": command_type,
                                                      "carddesk.channel": channel_id},
                          new_trace=True, kind=SpanKind.PRODUCER)
        with trace.use_span(span, end_on_exit=True):
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
        not caught up yet (its events are still on their way); each try is a new request.
        `not_yet_consistent` (the service's own followers are behind) is always retried."""
        deadline = asyncio.get_running_loop().time() + retry_for_s
        while True:
            reply = await self.send(service, command_type, payload, channel_id=channel_id,
                                    session_key=session_key)
            if reply.status == "accepted":
                return reply
            retryable = reply.code in retry_codes or reply.code == "not_yet_consistent"
            if not retryable or asyncio.get_running_loop().time() > deadline:
                raise CommandRefusedError(reply)
            await asyncio.sleep(0.2)
