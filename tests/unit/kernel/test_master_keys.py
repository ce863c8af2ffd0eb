"""The master key ring comes from CARDDESK_MASTER_KEY(_ID) and CARDDESK_RETIRED_MASTER_KEYS."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from shared.crypto import MasterKeys, UnknownMasterKeyError
from shared.settings import CardDeskSettings

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()


def test_the_ring_holds_the_current_key_and_the_retired_ones(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDDESK_MASTER_KEY", KEY_B)
    monkeypatch.setenv("CARDDESK_MASTER_KEY_ID", "mk-2")
    monkeypatch.setenv("CARDDESK_RETIRED_MASTER_KEYS", json.dumps({"mk-1": KEY_A}))
    ring = MasterKeys.from_settings(CardDeskSettings())
    assert ring.current_id == "mk-2"
    assert ring.ids() == ["mk-2", "mk-1"]
    with pytest.raises(UnknownMasterKeyError, match="'mk-0'"):
        ring.cipher("mk-0")


def test_the_development_default_ring_has_one_key_named_dev() -> None:
    ring = MasterKeys.from_settings(CardDeskSettings())
    assert ring.ids() == ["dev"]


@pytest.mark.parametrize("key_id", ["", "has space", "x" * 65, "a/b"])
def test_a_master_key_id_must_be_a_short_plain_name(
        monkeypatch: pytest.MonkeyPatch, key_id: str) -> None:
    monkeypatch.setenv("CARDDESK_MASTER_KEY_ID", key_id)
    with pytest.raises(ValidationError):
        CardDeskSettings()
