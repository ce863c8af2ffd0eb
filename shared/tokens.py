"""Session tokens: Ed25519-signed claims that every service verifies with public keys alone.

A token names the key that signed it (`kid`) and the channel that started the session. The
verifier accepts the current key and the older keys still listed (rotation), refuses any
other kid, caps the lifetime whatever the token claims, and refuses a token presented by a
channel other than its own (`channel_mismatch`).
"""

from __future__ import annotations

import base64
import binascii
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Literal, Self

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from shared.errors import ChannelMismatchError, InvalidSessionError, SessionExpiredError
from shared.settings import CardDeskSettings


class SessionClaims(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    kid: str
    session_id: str
    citizen_ref: str
    channel: str
    level: Literal["realname", "portrait"]
    portrait_verified_at: AwareDatetime | None = None
    issued_at: AwareDatetime
    expires_at: AwareDatetime


# How far a token's issue time may lie ahead of this service's clock (auth's clock may run
# slightly ahead); anything further is forged.
CLOCK_SKEW = timedelta(seconds=60)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _public_key(public_key_b64: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))


class TokenSigner:
    """Signs claims with the current key; the claims' `kid` is set to that key's id."""

    def __init__(self, private_seed_b64: str, key_id: str) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_seed_b64))
        self.key_id = key_id

    @classmethod
    def from_settings(cls, settings: CardDeskSettings) -> Self:
        return cls(settings.session_signing_key.get_secret_value(), settings.session_key_id)

    def sign(self, claims: SessionClaims) -> str:
        body = claims.model_copy(update={"kid": self.key_id}).model_dump_json().encode()
        return f"{_b64(body)}.{_b64(self._key.sign(body))}"


class TokenVerifier:
    """Checks a token statelessly: known kid, signature, lifetime cap, expiry, channel.

    A session sends several commands with one token, so the claims of the last
    `remembered` tokens whose signature verified are kept: a repeat skips the parsing and
    the signature check (the token's bytes are the cache key, so a changed byte is a new
    token), never the checks that depend on the time or on who presents it."""

    def __init__(self, public_keys: Mapping[str, str], max_lifetime: timedelta, *,
                 remembered: int = 4096) -> None:
        self._keys = {kid: _public_key(key) for kid, key in public_keys.items()}
        self.max_lifetime = max_lifetime
        self.remembered = remembered
        self._authentic: OrderedDict[str, SessionClaims] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: CardDeskSettings) -> Self:
        """The current key (`session_key_id` -> `session_public_key`) and the older ones of
        `session_public_keys` that are not yet retired."""
        keys = {**settings.session_public_keys,
                settings.session_key_id: settings.session_public_key}
        return cls(keys, timedelta(seconds=settings.session_max_lifetime_seconds))

    def verify(self, token: str, *, now: datetime, channel: str) -> SessionClaims:
        """The token's claims if a known key signed it, it is within its (capped) lifetime and
        the channel presenting it is the one that started the session."""
        claims = self._authentic.get(token)
        if claims is None:
            claims = self._signed_claims(token)
            self._authentic[token] = claims
            if len(self._authentic) > self.remembered:
                self._authentic.popitem(last=False)
        else:
            self._authentic.move_to_end(token)
        lifetime = claims.expires_at - claims.issued_at
        if lifetime > self.max_lifetime or claims.issued_at > now + CLOCK_SKEW:
            raise InvalidSessionError("the token claims a lifetime no session has")
        if claims.expires_at <= now:
            raise SessionExpiredError()
        if claims.channel != channel:
            raise ChannelMismatchError()
        return claims

    def _signed_claims(self, token: str) -> SessionClaims:
        """The claims, if a key still listed signed them."""
        try:
            body_part, signature_part = token.split(".")
            body = _unb64(body_part)
            claims = SessionClaims.model_validate_json(body)
            key = self._keys.get(claims.kid)
            if key is None:
                raise InvalidSessionError("the token's signing key is unknown or retired")
            key.verify(_unb64(signature_part), body)
        except (ValueError, binascii.Error, InvalidSignature, ValidationError) as exc:
            raise InvalidSessionError() from exc
        return claims


def session_id_of(token: str) -> str | None:
    """The session id a token names, unverified: only for choosing a Kafka key."""
    try:
        return SessionClaims.model_validate_json(_unb64(token.split(".")[0])).session_id
    except (ValueError, binascii.Error, ValidationError):
        return None
