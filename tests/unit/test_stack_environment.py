"""`cardctl stack up` runs its processes in development unless the operator chose otherwise:
the repository's secrets are what the local stack runs on, and production refuses them."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cardctl.stack import ProcessSpec, Stack
from shared.settings import CardDeskSettings


async def never(_timeout: float = 0.0) -> bool:
    return False


def env_seen_by_a_started_process(tmp_path: Path) -> str:
    stack = Stack(CardDeskSettings(state_dir=tmp_path))
    stack.run_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "probe.log"
    spec = ProcessSpec(
        name="probe", marker="probe", log_file=log, health=never,
        argv=(sys.executable, "-c", "import os; print(os.environ.get('CARDDESK_ENV'))"))
    pid = stack._start(spec)
    os.waitpid(pid, 0)
    return log.read_text(encoding="utf-8").strip()


def test_the_stack_starts_processes_in_development_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARDDESK_ENV", raising=False)
    assert env_seen_by_a_started_process(tmp_path) == "development"


def test_the_operators_choice_of_environment_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDDESK_ENV", "production")
    assert env_seen_by_a_started_process(tmp_path) == "production"
