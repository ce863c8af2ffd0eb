"""Sealed command fields: a channel encrypts a command's personal data for the services.

Commands travel through Kafka, so a channel that seals the personal fields of a payload
(ID number, name, address, phone, photo reference, face embedding) keeps them out of the
command topics. Sealing is X25519 + HKDF-SHA256 + AES-256-GCM to the services' public key.
The associated data is the channel, the command type, the request id and the field's path
(`SealContext`), so a sealed value opens only in the field, the command and the request it
was sealed for: lifted into another command or replayed under another request id it is
refused. A plain value (DESIGN section 4's shapes) passes only where sealing is not
required (`CARDDESK_REQUIRE_SEALED_FIELDS`; on in production).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.settings import CardDeskSettings

PREFIX = "sealed:v2:"
# v1 bound only the field's path, so its values could be replayed into other commands.
_RETIRED_PREFIXES = ("sealed:v1:",)
_INFO = b"carddesk command field v2"

# The personal fields of each command, by path ("proxy.id_number" is nested).
SEALED_FIELDS: Mapping[str, tuple[str, ...]] = {
    "StartSession": ("id_number", "name"),
    "VerifyPortrait": ("face_embedding",),
    "SubmitReissueApplication": ("address", "phone", "photo_ref"),
    "CollectCard": ("presented_id_number", "proxy.id_number", "proxy.name"),
    "ImportCard": ("id_number",),
}


class SealedFieldError(ValueError):
    """A sealed value that does not open under the services' key and this command's context."""

    code = "bad_sealed_field"


class UnsealedFieldError(SealedFieldError):
    """A personal field in plain form where sealing is required."""

    code = "unsealed_personal_data"


@dataclass(frozen=True, slots=True)
class SealContext:
    """The command a sealed field belongs to; with the field's path, its associated data."""

    channel: str
    command_type: str
    request_id: str

    def associated_data(self, path: str) -> bytes:
        # The request id in UUID form, so a channel's spelling (upper case, braces) of the
        # same id seals and opens alike; anything else is bound as it is.
        try:
            request_id = str(UUID(self.request_id))
        except ValueError:
            request_id = self.request_id
        return json.dumps([self.channel, self.command_type, request_id, path],
                          ensure_ascii=False, separators=(",", ":")).encode()


def _key(shared_secret: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=_INFO).derive(shared_secret))


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class FieldSealer:
    """The channel's side: seals with the services' public key."""

    def __init__(self, public_key_b64: str) -> None:
        self._public = X25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))

    def seal(self, context: SealContext, path: str, value: Any) -> str:
        ephemeral = X25519PrivateKey.generate()
        nonce = os.urandom(12)
        plaintext = json.dumps(value, ensure_ascii=False).encode()
        sealed = _key(ephemeral.exchange(self._public)).encrypt(
            nonce, plaintext, context.associated_data(path))
        return PREFIX + base64.b64encode(_raw(ephemeral.public_key()) + nonce + sealed).decode()

    def seal_payload(self, context: SealContext, payload: Mapping[str, Any]) -> dict[str, Any]:
        return _map_fields(context.command_type, payload,
                           lambda path, value: self.seal(context, path, value))


class FieldOpener:
    """The services' side: opens sealed values; a plain value passes unchanged unless
    `require_sealed`, when it is refused (`unsealed_personal_data`)."""

    def __init__(self, private_key_b64: str, *, require_sealed: bool = False) -> None:
        self._private = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key_b64))
        self.require_sealed = require_sealed

    @classmethod
    def from_settings(cls, settings: CardDeskSettings) -> FieldOpener:
        """The opener a service runs with: its key, and whether plain values are refused."""
        return cls(settings.command_sealing_key.get_secret_value(),
                   require_sealed=settings.sealed_fields_required)

    def open(self, context: SealContext, path: str, value: Any) -> Any:
        if isinstance(value, str) and value.startswith(_RETIRED_PREFIXES):
            raise SealedFieldError(f"{path}: this sealing version is no longer accepted;"
                                   f" seal with {PREFIX}")
        if not (isinstance(value, str) and value.startswith(PREFIX)):
            if self.require_sealed:
                raise UnsealedFieldError(f"{path}: personal fields must be sealed")
            return value
        try:
            raw = base64.b64decode(value[len(PREFIX):], validate=True)
            ephemeral = X25519PublicKey.from_public_bytes(raw[:32])
            plaintext = _key(self._private.exchange(ephemeral)).decrypt(
                raw[32:44], raw[44:], context.associated_data(path))
            return json.loads(plaintext)
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise SealedFieldError(
                f"{path}: the sealed value does not open for this command") from exc

    def open_payload(self, context: SealContext, payload: Mapping[str, Any]) -> dict[str, Any]:
        return _map_fields(context.command_type, payload,
                           lambda path, value: self.open(context, path, value))


def _map_fields(command_type: str, payload: Mapping[str, Any],
                fn: Callable[[str, Any], Any]) -> dict[str, Any]:
    result = dict(payload)
    for path in SEALED_FIELDS.get(command_type, ()):
        *parents, leaf = path.split(".")
        node: Any = result
        for parent in parents:
            child = node.get(parent) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                node = None
                break
            node[parent] = dict(child)
            node = node[parent]
        if isinstance(node, dict) and leaf in node and node[leaf] is not None:
            node[leaf] = fn(path, node[leaf])
    return result
