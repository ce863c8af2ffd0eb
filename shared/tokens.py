"""Session tokens: Ed25519-signed claims that every service verifies with the public key alone."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError

from shared.errors import InvalidSessionError, SessionExpiredError


class SessionClaims(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    session_id: str
    citizen_ref: str
    level: Literal["realname", "portrait"]
    portrait_verified_at: datetime | None = None
    issued_at: datetime
    expires_at: datetime


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, private_seed_b64: str) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_seed_b64))

    def sign(self, claims: SessionClaims) -> str:
        body = claims.model_dump_json().encode()
        return f"{_b64(body)}.{_b64(self._key.sign(body))}"


class TokenVerifier:
    def __init__(self, public_key_b64: str) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))

    def verify(self, token: str, now: datetime) -> SessionClaims:
        """The token's claims, if the signature holds and it has not expired."""
        try:
            body_part, signature_part = token.split(".")
            body = _unb64(body_part)
            self._key.verify(_unb64(signature_part), body)
            claims = SessionClaims.model_validate_json(body)
        except (ValueError, binascii.Error, InvalidSignature, ValidationError) as exc:
            raise InvalidSessionError() from exc
        if claims.expires_at <= now:
            raise SessionExpiredError()
        return claims


def session_id_of(token: str) -> str | None:
    """The session id a token names, unverified: only for choosing a Kafka key."""
    try:
        return SessionClaims.model_validate_json(_unb64(token.split(".")[0])).session_id
    except (ValueError, binascii.Error, ValidationError):
        return None
