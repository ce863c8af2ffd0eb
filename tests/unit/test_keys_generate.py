"""`cardctl keys generate`: a fresh production key set in a file only its owner can read,
nothing secret on stdout, and a rotation that keeps the pepper and retires the old keys."""

from __future__ import annotations

import json
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dotenv import dotenv_values
from typer.testing import CliRunner

from cardctl.main import app
from services.auth.main import SPEC as AUTH
from services.auth.settings import AuthSettings
from shared.crypto import MasterKeys
from shared.production import configuration_problems

SECRET_NAMES = ("CARDDESK_CITIZEN_REF_PEPPER", "CARDDESK_MASTER_KEY",
                "CARDDESK_SESSION_SIGNING_KEY", "CARDDESK_COMMAND_SEALING_KEY",
                "CARDDESK_AUDITOR_API_KEYS")


def generate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["keys", "generate", *args])
    return result.exit_code, result.output


def test_generate_writes_an_owner_only_file_and_prints_no_secret(tmp_path: Path) -> None:
    out = tmp_path / "carddesk.env"
    code, output = generate("--out", str(out))
    assert code == 0, output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    values = dotenv_values(out)
    for name in SECRET_NAMES:
        secret = values[name]
        assert secret
        assert secret not in output
    assert values["CARDDESK_ENV"] == "production"
    assert values["CARDDESK_SESSION_KEY_ID"] in json.loads(
        values["CARDDESK_SESSION_PUBLIC_KEYS"] or "{}")


def test_generate_never_overwrites_without_force(tmp_path: Path) -> None:
    out = tmp_path / "carddesk.env"
    out.write_text("keep me", encoding="utf-8")
    code, _ = generate("--out", str(out))
    assert code == 2
    assert out.read_text(encoding="utf-8") == "keep me"
    code, _ = generate("--out", str(out), "--force")
    assert code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert "CARDDESK_MASTER_KEY=" in out.read_text(encoding="utf-8")


def test_a_generated_set_starts_in_production(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "carddesk.env"
    assert generate("--out", str(out))[0] == 0
    channels = tmp_path / "channels.json"
    channels.write_text(json.dumps({"app": {"secret": "s-1", "api_key": "k-1"}}), "utf-8")
    for name, value in dotenv_values(out).items():
        monkeypatch.setenv(name, value or "")
    monkeypatch.setenv("CARDDESK_CHANNELS_FILE", str(channels))
    assert configuration_problems(AuthSettings(), AUTH.secrets) == []


def test_rotation_keeps_the_pepper_and_retires_the_master_and_session_keys(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = tmp_path / "old.env", tmp_path / "new.env"
    assert generate("--out", str(old))[0] == 0
    code, output = generate("--out", str(new), "--previous", str(old))
    assert code == 0, output
    before, after = dotenv_values(old), dotenv_values(new)
    assert after["CARDDESK_CITIZEN_REF_PEPPER"] == before["CARDDESK_CITIZEN_REF_PEPPER"]
    assert after["CARDDESK_COMMAND_SEALING_KEY"] == before["CARDDESK_COMMAND_SEALING_KEY"]
    assert after["CARDDESK_MASTER_KEY"] != before["CARDDESK_MASTER_KEY"]
    assert after["CARDDESK_MASTER_KEY_ID"] != before["CARDDESK_MASTER_KEY_ID"]
    for name, value in after.items():
        monkeypatch.setenv(name, value or "")
    ring = MasterKeys.from_settings(AuthSettings())
    assert ring.ids() == [after["CARDDESK_MASTER_KEY_ID"], before["CARDDESK_MASTER_KEY_ID"]]
    assert ring.retired_b64[str(before["CARDDESK_MASTER_KEY_ID"])] == before["CARDDESK_MASTER_KEY"]
    session_keys = json.loads(after["CARDDESK_SESSION_PUBLIC_KEYS"] or "{}")
    assert session_keys[str(before["CARDDESK_SESSION_KEY_ID"])] == before[
        "CARDDESK_SESSION_PUBLIC_KEY"]
    assert after["CARDDESK_SESSION_KEY_ID"] in session_keys
    assert datetime.now(UTC).strftime("%Y%m%d") in str(after["CARDDESK_MASTER_KEY_ID"])
