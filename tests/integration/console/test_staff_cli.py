"""`cardctl staff add|disable|list` on the real PostgreSQL (the console's schema)."""

from __future__ import annotations

import uuid

import pytest
from typer.testing import CliRunner

from cardctl.main import app

pytestmark = pytest.mark.integration


def cardctl(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["staff", *args])
    return result.exit_code, result.output


def test_staff_are_added_listed_and_disabled() -> None:
    staff_id = f"cli-{uuid.uuid4().hex[:8]}"
    assert cardctl("add", staff_id, "--role", "auditor", "--password", "a long passphrase")[0] == 0
    code, listing = cardctl("list")
    assert code == 0
    [line] = [line for line in listing.splitlines() if staff_id in line]
    assert "auditor" in line and "no" in line
    assert "a long passphrase" not in listing
    assert cardctl("disable", staff_id)[0] == 0
    [line] = [line for line in cardctl("list")[1].splitlines() if staff_id in line]
    assert "yes" in line


@pytest.mark.parametrize("args", [
    ("add", "short-pass-{}", "--role", "reviewer", "--password", "too short"),
    ("add", "Bad Id {}", "--role", "reviewer", "--password", "a long passphrase"),
    ("add", "no-role-{}", "--role", "root", "--password", "a long passphrase"),
    ("disable", "nobody-{}"),
])
def test_staff_commands_refuse_what_they_cannot_do(args: tuple[str, ...]) -> None:
    suffix = uuid.uuid4().hex[:8]
    code, _ = cardctl(*(a.format(suffix) for a in args))
    assert code != 0


def test_a_staff_id_cannot_be_added_twice() -> None:
    staff_id = f"twice-{uuid.uuid4().hex[:8]}"
    assert cardctl("add", staff_id, "--role", "counter", "--password", "a long passphrase")[0] == 0
    code, output = cardctl("add", staff_id, "--role", "admin", "--password", "another passphrase")
    assert code == 1 and "exists already" in output
