"""Sealed command fields: personal data leaves the channel encrypted for the services, and
opens only in the field, command type, request and channel it was sealed for."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from shared.sealing import (
    PREFIX,
    FieldOpener,
    FieldSealer,
    SealContext,
    SealedFieldError,
    UnsealedFieldError,
)
from shared.settings import CardDeskSettings

SETTINGS = CardDeskSettings()
SEALER = FieldSealer(SETTINGS.command_sealing_public_key)
OPENER = FieldOpener(SETTINGS.command_sealing_key.get_secret_value())
STRICT = FieldOpener(SETTINGS.command_sealing_key.get_secret_value(), require_sealed=True)
ID_NUMBER = "11010519491231002X"
LOGIN = {"id_number": ID_NUMBER, "name": "张三", "captcha_id": "c", "captcha_code": "1"}


def context(command_type: str = "StartSession", *, channel: str = "wechat-oa",
            request_id: str | None = None) -> SealContext:
    return SealContext(channel, command_type, request_id or str(uuid.uuid4()))


def test_a_sealed_login_opens_to_the_same_payload_and_hides_the_personal_fields() -> None:
    ctx = context()
    sealed = SEALER.seal_payload(ctx, LOGIN)
    assert sealed["id_number"].startswith(PREFIX)
    assert ID_NUMBER not in str(sealed)
    assert "张三" not in str(sealed)
    assert sealed["captcha_id"] == "c"
    assert OPENER.open_payload(ctx, sealed) == LOGIN
    assert STRICT.open_payload(ctx, sealed) == LOGIN


def test_nested_proxy_fields_and_a_face_embedding_round_trip() -> None:
    collect: dict[str, Any] = {
        "application_id": "a", "bureau_id": "b", "presented_id_number": ID_NUMBER,
        "proxy": {"id_number": ID_NUMBER, "name": "李四", "authorisation_ref": "L-1"}}
    ctx = context("CollectCard", channel="bureau-counter")
    sealed = SEALER.seal_payload(ctx, collect)
    assert sealed["proxy"]["name"].startswith(PREFIX)
    assert sealed["proxy"]["authorisation_ref"] == "L-1"
    assert collect["proxy"]["name"] == "李四"  # the caller's payload is not changed
    assert OPENER.open_payload(ctx, sealed) == collect

    portrait = {"session_token": "t", "liveness_score": 0.9, "face_embedding": [0.5, -0.25]}
    ctx = context("VerifyPortrait")
    assert OPENER.open_payload(ctx, SEALER.seal_payload(ctx, portrait)) == portrait


def test_the_request_id_binds_whatever_case_the_channel_spells_it_in() -> None:
    request_id = str(uuid.uuid4())
    sealed = SEALER.seal_payload(context(request_id=request_id.upper()), LOGIN)
    assert OPENER.open_payload(context(request_id=request_id), sealed) == LOGIN


def test_plain_fields_pass_through_as_design_section_4_shapes_them_when_not_required() -> None:
    assert OPENER.open_payload(context(), LOGIN) == LOGIN


@pytest.mark.parametrize("field", ["id_number", "name"])
def test_a_plain_personal_field_is_refused_when_sealing_is_required(field: str) -> None:
    ctx = context()
    partly = dict(SEALER.seal_payload(ctx, LOGIN))
    partly[field] = LOGIN[field]
    with pytest.raises(UnsealedFieldError) as refused:
        STRICT.open_payload(ctx, partly)
    assert refused.value.code == "unsealed_personal_data"
    assert ID_NUMBER not in str(refused.value) and "张三" not in str(refused.value)


def test_a_plain_face_embedding_or_proxy_name_is_refused_when_sealing_is_required() -> None:
    with pytest.raises(UnsealedFieldError):
        STRICT.open_payload(context("VerifyPortrait"),
                            {"session_token": "t", "liveness_score": 0.9,
                             "face_embedding": [0.5, -0.25]})
    ctx = context("CollectCard", channel="bureau-counter")
    sealed = SEALER.seal_payload(ctx, {"application_id": "a", "bureau_id": "b",
                                       "presented_id_number": ID_NUMBER})
    sealed["proxy"] = {"id_number": SEALER.seal(ctx, "proxy.id_number", ID_NUMBER),
                       "name": "李四", "authorisation_ref": "L-1"}
    with pytest.raises(UnsealedFieldError):
        STRICT.open_payload(ctx, sealed)


def test_an_absent_optional_field_is_not_a_plain_one() -> None:
    ctx = context("CollectCard", channel="bureau-counter")
    payload = {"application_id": "a", "bureau_id": "b", "presented_id_number": ID_NUMBER,
               "proxy": None}
    assert STRICT.open_payload(ctx, SEALER.seal_payload(ctx, payload)) == payload


def test_the_settings_require_sealing_in_production_and_not_in_development(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CARDDESK_REQUIRE_SEALED_FIELDS", raising=False)
    assert CardDeskSettings(env="production").sealed_fields_required
    assert not CardDeskSettings(env="development").sealed_fields_required
    assert CardDeskSettings(env="development", require_sealed_fields=True).sealed_fields_required
    monkeypatch.setenv("CARDDESK_REQUIRE_SEALED_FIELDS", "false")
    assert not CardDeskSettings(env="production").sealed_fields_required
    assert FieldOpener.from_settings(
        CardDeskSettings(env="development", require_sealed_fields=True)).require_sealed


def test_a_tampered_sealed_value_is_refused() -> None:
    ctx = context()
    sealed = SEALER.seal(ctx, "id_number", ID_NUMBER)
    tampered = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    with pytest.raises(SealedFieldError):
        OPENER.open(ctx, "id_number", tampered)


def test_a_sealed_value_moved_to_another_field_does_not_open() -> None:
    ctx = context()
    with pytest.raises(SealedFieldError):
        OPENER.open(ctx, "name", SEALER.seal(ctx, "id_number", ID_NUMBER))


def test_a_sealed_value_replayed_under_another_request_id_does_not_open() -> None:
    sealed = SEALER.seal_payload(context(), LOGIN)
    with pytest.raises(SealedFieldError) as refused:
        OPENER.open_payload(context(), sealed)  # same type and channel, a new request id
    assert refused.value.code == "bad_sealed_field"


def test_a_sealed_value_lifted_into_another_command_type_does_not_open() -> None:
    ctx = context("CollectCard", channel="bureau-counter")
    lifted = SEALER.seal(ctx, "proxy.id_number", ID_NUMBER)
    # An ImportCard (whose field is `id_number`) and a CollectCard's holder field alike.
    for target, path in [("ImportCard", "id_number"), ("CollectCard", "presented_id_number")]:
        with pytest.raises(SealedFieldError):
            OPENER.open(SealContext("bureau-counter", target, ctx.request_id), path, lifted)
    # Even where the path is the same: StartSession's id_number sealed, used in an ImportCard.
    login = context()
    with pytest.raises(SealedFieldError):
        OPENER.open(SealContext(login.channel, "ImportCard", login.request_id), "id_number",
                    SEALER.seal(login, "id_number", ID_NUMBER))


def test_a_sealed_value_sent_by_another_channel_does_not_open() -> None:
    ctx = context()
    sealed = SEALER.seal_payload(ctx, LOGIN)
    with pytest.raises(SealedFieldError):
        OPENER.open_payload(SealContext("mobile-app", ctx.command_type, ctx.request_id), sealed)


def test_a_value_sealed_under_the_retired_v1_format_is_refused() -> None:
    v2 = SEALER.seal(context(), "id_number", ID_NUMBER)
    v1 = "sealed:v1:" + v2[len(PREFIX):]
    with pytest.raises(SealedFieldError) as refused:
        OPENER.open(context(), "id_number", v1)
    assert refused.value.code == "bad_sealed_field"


def test_a_value_sealed_for_another_key_does_not_open() -> None:
    stranger = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ctx = context()
    with pytest.raises(SealedFieldError):
        OPENER.open(ctx, "id_number", FieldSealer(base64.b64encode(stranger).decode()).seal(
            ctx, "id_number", ID_NUMBER))
