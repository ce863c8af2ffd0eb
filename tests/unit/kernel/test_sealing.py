"""Sealed command fields: personal data leaves the channel encrypted for the services."""

from __future__ import annotations

from typing import Any

import pytest

from shared.sealing import PREFIX, FieldOpener, FieldSealer, SealedFieldError
from shared.settings import CardDeskSettings

SETTINGS = CardDeskSettings()
SEALER = FieldSealer(SETTINGS.command_sealing_public_key)
OPENER = FieldOpener(SETTINGS.command_sealing_key.get_secret_value())
ID_NUMBER = "11010519491231002X"


def test_a_sealed_login_opens_to_the_same_payload_and_hides_the_personal_fields() -> None:
    payload = {"id_number": ID_NUMBER, "name": "张三", "captcha_id": "c", "captcha_code": "1"}
    sealed = SEALER.seal_payload("StartSession", payload)
    assert sealed["id_number"].startswith(PREFIX)
    assert ID_NUMBER not in str(sealed)
    assert "张三" not in str(sealed)
    assert sealed["captcha_id"] == "c"
    assert OPENER.open_payload("StartSession", sealed) == payload


def test_nested_proxy_fields_and_a_face_embedding_round_trip() -> None:
    collect: dict[str, Any] = {
        "application_id": "a", "bureau_id": "b", "presented_id_number": ID_NUMBER,
               "proxy": {"id_number": ID_NUMBER, "name": "李四", "authorisation_ref": "L-1"}}
    sealed = SEALER.seal_payload("CollectCard", collect)
    assert sealed["proxy"]["name"].startswith(PREFIX)
    assert sealed["proxy"]["authorisation_ref"] == "L-1"
    assert collect["proxy"]["name"] == "李四"  # the caller's payload is not changed
    assert OPENER.open_payload("CollectCard", sealed) == collect

    portrait = {"session_token": "t", "liveness_score": 0.9, "face_embedding": [0.5, -0.25]}
    assert OPENER.open_payload("VerifyPortrait",
                               SEALER.seal_payload("VerifyPortrait", portrait)) == portrait


def test_plain_fields_pass_through_as_design_section_4_shapes_them() -> None:
    payload = {"id_number": ID_NUMBER, "name": "张三", "captcha_id": "c", "captcha_code": "1"}
    assert OPENER.open_payload("StartSession", payload) == payload


def test_a_tampered_sealed_value_is_refused() -> None:
    sealed = SEALER.seal("id_number", ID_NUMBER)
    tampered = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    with pytest.raises(SealedFieldError):
        OPENER.open("id_number", tampered)


def test_a_sealed_value_moved_to_another_field_does_not_open() -> None:
    with pytest.raises(SealedFieldError):
        OPENER.open("name", SEALER.seal("id_number", ID_NUMBER))


def test_a_value_sealed_for_another_key_does_not_open() -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    stranger = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    with pytest.raises(SealedFieldError):
        OPENER.open("id_number", FieldSealer(base64.b64encode(stranger).decode()).seal(
            "id_number", ID_NUMBER))
