"""The channels file (`CARDDESK_CHANNELS_FILE`): who may send commands, read replies and query.

`{"channel-id": {"secret", "bureau", "kafka_password", "api_key", "bureaus"}}`: `secret`
signs commands (HMAC-SHA256), `kafka_password` is the channel's SASL/SCRAM credential (user =
the channel id), `api_key` authenticates it to the query API, and `bureaus` lists the
bureaus a bureau channel serves (empty: every bureau).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict

DEV_CHANNELS_FILE = Path(__file__).resolve().parent.parent / "config" / "channels.dev.json"


class Channel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    channel_id: str
    secret: str
    bureau: bool = False
    kafka_password: str | None = None
    api_key: str | None = None
    bureaus: tuple[str, ...] = ()

    def serves(self, bureau_id: str) -> bool:
        """Whether this bureau channel may act for `bureau_id` (no list: every bureau)."""
        return bureau_served(self.bureaus, bureau_id)


def bureau_served(bureaus: Collection[str], bureau_id: str) -> bool:
    """`Channel.serves` on the channel's list alone, for deciders that get only the list."""
    return not bureaus or bureau_id in bureaus


class ChannelRegistry:
    """Channel secrets from the channels file."""

    def __init__(self, channels: Mapping[str, Channel]) -> None:
        self._channels = dict(channels)

    @classmethod
    def from_file(cls, path: Path) -> ChannelRegistry:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls({cid: Channel(channel_id=cid, **spec) for cid, spec in raw.items()})

    def get(self, channel_id: str) -> Channel | None:
        return self._channels.get(channel_id)

    def __iter__(self) -> Iterator[Channel]:
        return iter(self._channels.values())


def sign(secret: str, value: bytes) -> str:
    """`x-signature`: hex HMAC-SHA256 of the raw message value under the channel's secret."""
    return hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()
