"""A channel simulator: signs commands as an upstream channel would and awaits their replies."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from shared.channels import Channel, ChannelRegistry, sign
from shared.commands import Reply
from shared.kafka import as_channel, client_options
from shared.replies import deliver_replies
from shared.sealing import FieldSealer, SealContext
from shared.settings import CardDeskSettings
from shared.topics import command_topic, reply_topic
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

# How long joining the reply topic may wait for its metadata (the broker may be starting).
METADATA_TIMEOUT_S = 30.0


class CommandRefusedError(Exception):
    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code}: {reply.message}")
        self.reply = reply


class _Link:
    """One channel's own Kafka clients: a producer and the reader of its replies, both
    authenticated as that channel (DESIGN 8: a channel reads only its own reply topic)."""

    def __init__(self, settings: CardDeskSettings, topic: str) -> None:
        options = client_options(settings)
        self.topic = topic
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap,
                                         linger_ms=1, max_request_size=2 * 1024 * 1024,
                                         **options)
        # A reply waits for the fetch in flight when its partition just had one: keep the
        # broker's hold on an empty fetch short (shared.settings: consumer_fetch_wait_ms).
        self.replies = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap,
                                        group_id=None, enable_auto_commit=False,
                                        fetch_max_wait_ms=settings.consumer_fetch_wait_ms,
                                        **options)
        self.reader: asyncio.Task[None] | None = None

    async def start(self, timeout_s: float = METADATA_TIMEOUT_S) -> None:
        await self.producer.start()
        await self.replies.start()
        deadline = asyncio.get_running_loop().time() + timeout_s
        partitions = self.replies.partitions_for_topic(self.topic)
        while not partitions:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"reply topic {self.topic} has no partitions")
            await asyncio.sleep(0.1)
            await self.replies._client.force_metadata_update()
            partitions = self.replies.partitions_for_topic(self.topic)
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        self.replies.assign(assigned)
        await self.replies.seek_to_end(*assigned)
        for tp in assigned:  # resolve positions now, so no reply sent after this is missed
            await self.replies.position(tp)

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        await self.replies.stop()
        await self.producer.stop()


class ChannelSimulator:
    """Acts as the channels of the channels file: each channel it sends for gets its own
    producer and reply reader, with that channel's own Kafka credentials."""

    @classmethod
    def for_settings(cls, settings: CardDeskSettings) -> Self:
        """A simulator with the configured channels that seals personal fields; it reads a
        channel's reply topic from the first time it sends as that channel. Its commands
        start traces (exported where CARDDESK_OTLP_ENDPOINT says)."""
        configure_tracing("channel", settings.otlp_endpoint)
        return cls(settings, ChannelRegistry.from_file(settings.channels_file),
                   settings.command_sealing_public_key)

    def __init__(self, settings: CardDeskSettings, channels: ChannelRegistry,
                 sealing_public_key: str | None = None) -> None:
        self.settings = settings
        self.bootstrap = settings.kafka_bootstrap
        self.channels = channels
        # With the services' public key, personal fields leave the channel sealed.
        self.sealer = FieldSealer(sealing_public_key) if sealing_public_key else None
        self._links: dict[str, _Link] = {}
        # Concurrent first sends for one channel must share its link, not race to make one.
        self._linking = asyncio.Lock()
        self._waiting: dict[tuple[str, str], asyncio.Future[Reply]] = {}

    async def __aenter__(self) -> ChannelSimulator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.stop()

    async def _link(self, channel_id: str) -> _Link:
        """The Kafka clients of `channel_id`; a channel id that is not in the file (a forged
        message) goes out over the first channel's connection, as a lying channel would."""
        channel = self.channels.get(channel_id)
        if channel is None:
            channel = next(iter(self.channels), None)
            if channel is None:
                raise ValueError("the channels file has no channel")
        link = self._links.get(channel.channel_id)
        if link is not None:
            return link
        async with self._linking:
            if channel.channel_id not in self._links:
                link = _Link(as_channel(self.settings, channel),
                             reply_topic(channel.channel_id))
                try:
                    await link.start()
                except BaseException:
                    await link.stop()
                    raise
                link.reader = asyncio.create_task(deliver_replies(
                    link.replies, functools.partial(self._waiting_on, channel.channel_id)))
                self._links[channel.channel_id] = link
            return self._links[channel.channel_id]

    def _waiting_on(self, channel_id: str, request_id: str) -> asyncio.Future[Reply] | None:
        return self._waiting.get((channel_id, request_id))

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
        link = await self._link(channel_id)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[(channel_id, request_id)] = future
        try:
            await link.producer.send_and_wait(
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
        not caught up yet (its events are still on their way): stored as the request's reply,
        so the next try is a new request. `not_yet_consistent` (the service's own followers
        are behind) is always retried, as the same request: it is never stored, and the
        first copy may still be decided (redelivered after a crash), which a new request
        would then find done (`already_collected`, say)."""
        deadline = asyncio.get_running_loop().time() + retry_for_s
        request_id = str(uuid.uuid4())
        while True:
            reply = await self.send(service, command_type, payload, channel_id=channel_id,
                                    session_key=session_key, request_id=request_id)
            if reply.status == "accepted":
                return reply
            retryable = reply.code in retry_codes or reply.code == "not_yet_consistent"
            if not retryable or asyncio.get_running_loop().time() > deadline:
                raise CommandRefusedError(reply)
            if reply.code != "not_yet_consistent":
                request_id = str(uuid.uuid4())
            await asyncio.sleep(0.2)
