"""Who sent a command: the channel its `x-channel-id` names, if its `x-signature` is that
channel's HMAC of the value. Anything else raises `Rejected`, for the DLQ alone (DESIGN 4)."""

from __future__ import annotations

import hmac

from shared.channels import Channel, ChannelRegistry, sign
from shared.consumer import Inbound, Rejected


def authenticate(msg: Inbound, channels: ChannelRegistry) -> Channel:
    """The channel that signed the message, or `Rejected` if none did."""
    try:
        channel_id = msg.headers.get("x-channel-id", b"").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("unknown_channel", "the x-channel-id header is not UTF-8") from exc
    channel = channels.get(channel_id)
    if channel is None:
        raise Rejected("unknown_channel", "the x-channel-id header names no known channel")
    signature = msg.headers.get("x-signature", b"")  # bytes: it may be anything at all
    if not hmac.compare_digest(signature, sign(channel.secret, msg.value).encode()):
        raise Rejected("bad_signature", "x-signature does not match the message")
    return channel
