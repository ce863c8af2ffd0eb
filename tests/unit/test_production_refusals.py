"""In production no process starts on a secret, key or channels file shipped in the repository,
and a key pair that does not belong together is refused in every environment."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from pydantic import Field

from cardctl.keys import generate_key_set
from services.auth.main import SPEC as AUTH
from services.auth.settings import AuthSettings
from services.loss.main import SPEC as LOSS
from services.status.main import SPEC as STATUS
from services.status.settings import DEV_AUDITOR_API_KEY, StatusSettings
from shared.channels import DEV_CHANNELS_FILE
from shared.production import (
    SECRET_SETTINGS,
    SESSION_PUBLIC_KEY,
    SESSION_SIGNING_KEY,
    SHIPPED_CHANNEL_SECRET_DIGESTS,
    UnsafeConfigurationError,
    channel_secret_values,
    configuration_problems,
    setting_name,
    shipped_value,
)
from shared.service import bootstrap

ROOT = Path(__file__).resolve().parents[2]


def fresh_channels(path: Path) -> Path:
    path.write_text(json.dumps({
        "wechat-oa": {"secret": "prod-secret-1", "bureau": False,
                      "kafka_password": "prod-kafka-1", "api_key": "prod-api-1"},
        "bureau-counter": {"secret": "prod-secret-2", "bureau": True,
                           "kafka_password": "prod-kafka-2", "api_key": "prod-api-2"},
    }), encoding="utf-8")
    return path


@pytest.fixture
def production(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """A production environment with a freshly generated key set and channels file."""
    values = generate_key_set(datetime.now(UTC))
    values["CARDDESK_CHANNELS_FILE"] = str(fresh_channels(tmp_path / "channels.json"))
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_production_starts_with_a_freshly_generated_key_set(production: dict[str, str]) -> None:
    assert configuration_problems(AuthSettings(), AUTH.secrets) == []


@pytest.mark.parametrize("field", SECRET_SETTINGS)
def test_production_refuses_each_shipped_secret_naming_its_setting(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch, field: str) -> None:
    monkeypatch.setenv(setting_name(field), shipped_value(field))
    problems = configuration_problems(AuthSettings(), SECRET_SETTINGS)
    assert problems
    assert any(setting_name(field) in problem for problem in problems)
    # Nothing secret is echoed back in the message.
    assert not any(shipped_value(field) in problem for problem in problems)


def test_development_accepts_the_shipped_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDDESK_ENV", "development")
    assert configuration_problems(AuthSettings(), SECRET_SETTINGS) == []


def test_production_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARDDESK_ENV")
    settings = AuthSettings()
    assert settings.env == "production"
    assert configuration_problems(settings, AUTH.secrets)


def test_a_service_is_refused_only_the_secrets_it_reads(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    # loss verifies tokens but never signs them: it need not (and should not) hold the seed.
    monkeypatch.setenv("CARDDESK_SESSION_SIGNING_KEY", shipped_value(SESSION_SIGNING_KEY))
    assert configuration_problems(AuthSettings(), LOSS.secrets) == []
    assert configuration_problems(AuthSettings(), AUTH.secrets)


def test_the_retired_master_keys_may_not_hold_the_shipped_one(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDDESK_RETIRED_MASTER_KEYS",
                       json.dumps({"dev": shipped_value("master_key")}))
    problems = configuration_problems(AuthSettings(), AUTH.secrets)
    assert any("CARDDESK_RETIRED_MASTER_KEYS" in problem for problem in problems)


def _copy_reusing_one_secret(tmp_path: Path) -> Path:
    dev = json.loads(DEV_CHANNELS_FILE.read_text(encoding="utf-8"))
    channels = json.loads(fresh_channels(tmp_path / "reused.json").read_text(encoding="utf-8"))
    channels["wechat-oa"]["api_key"] = next(iter(dev.values()))["api_key"]
    path = tmp_path / "reused.json"
    path.write_text(json.dumps(channels), encoding="utf-8")
    return path


@pytest.mark.parametrize("variant", ["the-file", "a-copy", "a-symlink", "one-reused-key"])
def test_production_refuses_the_development_channels_file(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        variant: str) -> None:
    if variant == "the-file":
        path = DEV_CHANNELS_FILE
    elif variant == "a-copy":
        path = tmp_path / "channels.json.copy"
        shutil.copyfile(DEV_CHANNELS_FILE, path)
    elif variant == "a-symlink":
        path = tmp_path / "link.json"
        path.symlink_to(DEV_CHANNELS_FILE)
    else:
        path = _copy_reusing_one_secret(tmp_path)
    monkeypatch.setenv("CARDDESK_CHANNELS_FILE", str(path))
    problems = configuration_problems(AuthSettings(), AUTH.secrets)
    assert [p for p in problems if "CARDDESK_CHANNELS_FILE" in p], problems


@pytest.mark.parametrize("env", ["development", "production"])
def test_a_session_public_key_that_does_not_match_the_seed_is_refused(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    monkeypatch.setenv("CARDDESK_ENV", env)
    other = generate_key_set(datetime.now(UTC))["CARDDESK_SESSION_PUBLIC_KEY"]
    monkeypatch.setenv("CARDDESK_SESSION_PUBLIC_KEY", other)
    problems = configuration_problems(AuthSettings(), AUTH.secrets)
    assert problems == [f"{setting_name(SESSION_PUBLIC_KEY)} is not the public key of"
                        f" {setting_name(SESSION_SIGNING_KEY)}"]


def test_a_sealing_public_key_that_does_not_match_is_refused(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    other = generate_key_set(datetime.now(UTC))["CARDDESK_COMMAND_SEALING_PUBLIC_KEY"]
    monkeypatch.setenv("CARDDESK_COMMAND_SEALING_PUBLIC_KEY", other)
    problems = configuration_problems(AuthSettings(), AUTH.secrets)
    assert any(p.startswith("CARDDESK_COMMAND_SEALING_PUBLIC_KEY is not") for p in problems)


def test_the_status_service_refuses_the_shipped_auditor_key_in_production(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDDESK_AUDITOR_API_KEYS",
                       json.dumps({"auditor": DEV_AUDITOR_API_KEY}))
    with pytest.raises(UnsafeConfigurationError, match="CARDDESK_AUDITOR_API_KEYS"):
        bootstrap(STATUS, StatusSettings()).runtime.check_configuration()
    monkeypatch.setenv("CARDDESK_AUDITOR_API_KEYS", production["CARDDESK_AUDITOR_API_KEYS"])
    bootstrap(STATUS, StatusSettings()).runtime.check_configuration()


@pytest.mark.parametrize("service", ["auth", "loss", "review", "issuance", "status"])
def test_every_service_process_refuses_to_start_on_the_shipped_defaults(service: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDESK_")}
    env |= {"CARDDESK_ENV": "production",
            # Unreachable on purpose: the refusal comes before any connection.
            "CARDDESK_KAFKA_BOOTSTRAP": "127.0.0.1:1", "CARDDESK_DATABASE_URL":
            "postgresql://nobody@127.0.0.1:1/none"}
    result = subprocess.run([sys.executable, "-m", f"services.{service}.main"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr[-2000:]
    assert "refusing to start (CARDDESK_ENV=production)" in result.stderr
    assert "CARDDESK_CHANNELS_FILE" in result.stderr
    if service != "status":
        assert "CARDDESK_MASTER_KEY" in result.stderr
    assert shipped_value("master_key") not in result.stderr + result.stdout


def test_the_shipped_channel_secret_digests_cover_the_development_channels_file() -> None:
    values = channel_secret_values(json.loads(DEV_CHANNELS_FILE.read_text(encoding="utf-8")))
    missing = {where for where, value in values.items()
               if hashlib.sha256(value.encode()).hexdigest() not in SHIPPED_CHANNEL_SECRET_DIGESTS}
    assert missing == set(), "update SHIPPED_CHANNEL_SECRET_DIGESTS in shared/production.py"


def test_an_installed_image_without_the_dev_file_still_recognises_its_secrets(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    reused = _copy_reusing_one_secret(tmp_path)
    monkeypatch.setattr("shared.production.DEV_CHANNELS_FILE", tmp_path / "absent.json")
    monkeypatch.setenv("CARDDESK_CHANNELS_FILE", str(reused))
    problems = configuration_problems(AuthSettings(), AUTH.secrets)
    assert problems == ["CARDDESK_CHANNELS_FILE: channel 'wechat-oa' uses a api_key shipped in"
                        " the repository's development channels file"]


def test_neither_the_image_nor_compose_uses_the_development_channels_file() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "channels.dev.json" not in dockerfile
    assert "COPY config" not in dockerfile
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    channels_file = compose["x-carddesk-env"]["CARDDESK_CHANNELS_FILE"]
    assert "channels.dev.json" not in channels_file
    assert "channels.dev.json" not in compose["secrets"]["channels"]["file"]
    assert compose["x-carddesk-env"]["CARDDESK_ENV"] == "${CARDDESK_ENV:-production}"


def test_the_status_process_refuses_a_missing_channels_file_with_a_clear_message(
        tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDESK_")}
    env |= {"CARDDESK_ENV": "production",
            "CARDDESK_CHANNELS_FILE": str(tmp_path / "absent.json")}
    result = subprocess.run([sys.executable, "-m", "services.status.main"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 78, result.stderr[-2000:]
    assert "CARDDESK_CHANNELS_FILE cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


class WithSessionKeys(AuthSettings):
    """As the settings will be once tokens carry key ids (the intake's setting)."""

    session_public_keys: dict[str, str] = Field(default_factory=dict)


def test_the_session_public_keys_may_not_hold_the_shipped_one(
        production: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDDESK_SESSION_PUBLIC_KEYS",
                       json.dumps({"dev": shipped_value(SESSION_PUBLIC_KEY)}))
    problems = configuration_problems(WithSessionKeys(), AUTH.secrets)
    assert any(p.startswith("CARDDESK_SESSION_PUBLIC_KEYS holds") for p in problems)
    monkeypatch.setenv("CARDDESK_SESSION_PUBLIC_KEYS", production["CARDDESK_SESSION_PUBLIC_KEYS"])
    assert configuration_problems(WithSessionKeys(), AUTH.secrets) == []
