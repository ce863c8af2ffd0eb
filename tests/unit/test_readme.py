"""The README is what a new user follows: it must name every setting and CI's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from services.auth.settings import AuthSettings
from services.console.settings import ConsoleSettings
from services.issuance.settings import IssuanceSettings
from services.loss.settings import LossSettings
from services.review.settings import ReviewSettings
from services.status.rebuild import RebuildSettings
from services.status.settings import StatusSettings
from shared.settings import CardDeskSettings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")

SETTINGS: list[type[BaseSettings]] = [CardDeskSettings, AuthSettings, LossSettings,
                                      ReviewSettings, IssuanceSettings, StatusSettings,
                                      RebuildSettings, ConsoleSettings]


@pytest.mark.parametrize("settings_class", SETTINGS, ids=lambda c: c.__name__)
def test_the_readme_lists_every_setting(settings_class: type[BaseSettings]) -> None:
    names = {f"CARDDESK_{field.upper()}" for field in settings_class.model_fields}
    listed = set(re.findall(r"\| `(CARDDESK_[A-Z0-9_]+)` \|", README))
    assert names - listed == set()


def test_ci_runs_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    test_command = blocks[1].strip()
    assert test_command == ".venv/bin/pytest -q"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(line.strip() == test_command for line in ci.splitlines())
