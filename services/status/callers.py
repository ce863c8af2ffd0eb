"""Who may query the status API: bearer API keys of channels and auditors (the rate limit per
caller is `shared.ratelimit`). Keys are compared in constant time; a key never appears in a
log line."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shared.channels import ChannelRegistry

Role = Literal["channel", "auditor"]


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller of the query API."""

    caller_id: str
    role: Role


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The keys of every channel (`api_key` in the channels file) and every auditor."""

    def __init__(self, entries: Iterable[tuple[str, Caller]]) -> None:
        self._entries = [(_digest(key), caller) for key, caller in entries if key]

    @classmethod
    def of(cls, channels: ChannelRegistry, auditors: dict[str, str]) -> ApiKeys:
        entries = [(channel.api_key or "", Caller(channel.channel_id, "channel"))
                   for channel in channels]
        entries += [(key, Caller(auditor, "auditor")) for auditor, key in auditors.items()]
        return cls(entries)

    def caller(self, authorization: str | None) -> Caller | None:
        """The caller an `Authorization: Bearer <key>` header names, if any. Every known key
        is compared (digests, in constant time), so the time taken says nothing of which."""
        if authorization is None:
            return None
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return None
        digest = _digest(presented)
        found: Caller | None = None
        for known, caller in self._entries:
            if hmac.compare_digest(known, digest) and found is None:
                found = caller
        return found
