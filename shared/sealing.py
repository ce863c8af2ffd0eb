"""Sealed command fields: a channel encrypts a command's personal data for the services.

Commands travel through Kafka, so a channel that seals the personal fields of a payload
(ID number, name, address, phone, photo reference, face embedding) keeps them out of the
command topics. Sealing is X25519 + HKDF-SHA256 + AES-256-GCM to the services' public key;
the field's path is the associated data, so a sealed value cannot be moved to another
field. A field's value may also arrive in plain form (DESIGN section 4's shapes), and
the services accept both.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "sealed:v1:"
_INFO = b"carddesk command field v1"

# The personal fields of each command, by path ("proxy.id_number" is nested).
SEALED_FIELDS: Mapping[str, tuple[str, ...]] = {
    "StartSession": ("id_number", "name"),
    "VerifyPortrait": ("face_embedding",),
    "SubmitReissueApplication": ("address", "phone", "photo_ref"),
    "CollectCard": ("presented_id_number", "proxy.id_number", "proxy.name"),
    "ImportCard": ("id_number",),
}


class SealedFieldError(ValueError):
    """A sealed value that does not open under the services' key."""

    code = "bad_sealed_field"


def _key(shared_secret: bytes) -> AESGCM:
    return AESGCM(HKDF(hashes.SHA256(), 32, salt=None, info=_INFO).derive(shared_secret))


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class FieldSealer:
    """The channel's side: seals with the services' public key."""

    def __init__(self, public_key_b64: str) -> None:
        self._public = X25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))

    def seal(self, path: str, value: Any) -> str:
        ephemeral = X25519PrivateKey.generate()
        nonce = os.urandom(12)
        plaintext = json.dumps(value, ensure_ascii=False).encode()
        sealed = _key(ephemeral.exchange(self._public)).encrypt(nonce, plaintext, path.encode())
        return PREFIX + base64.b64encode(_raw(ephemeral.public_key()) + nonce + sealed).decode()

    def seal_payload(self, command_type: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        return _map_fields(command_type, payload, self.seal)


class FieldOpener:
    """The services' side: opens sealed values; plain values pass through unchanged."""

    def __init__(self, private_key_b64: str) -> None:
        self._private = X25519PrivateKey.from_private_bytes(base64.b64decode(private_key_b64))

    def open(self, path: str, value: Any) -> Any:
        if not (isinstance(value, str) and value.startswith(PREFIX)):
            return value
        try:
            raw = base64.b64decode(value[len(PREFIX):], validate=True)
            ephemeral = X25519PublicKey.from_public_bytes(raw[:32])
            plaintext = _key(self._private.exchange(ephemeral)).decrypt(
                raw[32:44], raw[44:], path.encode())
            return json.loads(plaintext)
        except (binascii.Error, ValueError, InvalidTag) as exc:
            raise SealedFieldError(f"{path}: the sealed value does not open") from exc

    def open_payload(self, command_type: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        return _map_fields(command_type, payload, self.open)


def _map_fields(command_type: str, payload: Mapping[str, Any], fn: Any) -> dict[str, Any]:
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
