"""`cardctl stack up` runs its processes in development unless the operator chose otherwise:
the repository's secrets are what the local stack runs on, and production refuses them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cardctl.stack import ProcessSpec


async def never() -> bool:
    return False


def env_given_to_a_started_process(tmp_path: Path) -> object:
    """What the supervisor is told to start a process with."""
    spec = ProcessSpec(
        name="probe", marker="probe", log_file=tmp_path / "probe.log", health=never,
        argv=(sys.executable, "-c", "pass"))
    env = spec.program()["env"]
    assert isinstance(env, dict)
    return env["CARDDESK_ENV"]


def test_the_stack_starts_processes_in_development_by_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARDDESK_ENV", raising=False)
    assert env_given_to_a_started_process(tmp_path) == "development"


def test_the_operators_choice_of_environment_is_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARDDESK_ENV", "production")
    assert env_given_to_a_started_process(tmp_path) == "production"
