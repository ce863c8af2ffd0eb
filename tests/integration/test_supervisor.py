"""The stack's supervisor on small real processes: restarts with backoff, shows restarts and
exit reasons, adopts what already runs, stops what leaves its programs and everything on
SIGTERM. No Kafka or PostgreSQL needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cardctl.stack import pid_alive
from cardctl.supervisor import PID_FILE, PROGRAMS_FILE, STATE_FILE, exit_reason
from shared.settings import PROJECT_ROOT

WAIT_S = 15.0


def sleeper(run_dir: Path, name: str) -> dict[str, Any]:
    marker = f"sleeper-{name}-{run_dir.name}"
    return {"name": name, "argv": [sys.executable, "-c", "import time; time.sleep(600)", marker],
            "log_file": str(run_dir / f"{name}.log"), "marker": marker,
            "env": {"CARDDESK_EXAMPLE": "1"}}


def write_programs(run_dir: Path, programs: list[dict[str, Any]]) -> None:
    (run_dir / PROGRAMS_FILE).write_text(json.dumps({"instances": 1, "programs": programs}))


def state(run_dir: Path) -> dict[str, Any]:
    try:
        programs: dict[str, Any] = json.loads((run_dir / STATE_FILE).read_text())["programs"]
    except (OSError, ValueError, KeyError):
        return {}
    return programs


def eventually(check: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def pid_of(run_dir: Path, name: str) -> int | None:
    try:
        return int((run_dir / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    os.chmod(tmp_path, 0o755)
    yield tmp_path
    # Whatever a failed test left running is stopped here, by pid.
    for pid_file in tmp_path.glob("*.pid"):
        pid = int(pid_file.read_text())
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def start_supervisor(run_dir: Path) -> subprocess.Popen[bytes]:
    log = (run_dir / "supervisor.log").open("ab")
    process = subprocess.Popen([sys.executable, "-m", "cardctl.supervisor", str(run_dir)],
                               stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
                               start_new_session=True)
    eventually(lambda: (run_dir / PID_FILE).exists(), "the supervisor wrote its pid file")
    return process


def stop_supervisor(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=WAIT_S * 2)


def test_a_killed_program_is_restarted_and_the_restart_is_shown(run_dir: Path) -> None:
    write_programs(run_dir, [sleeper(run_dir, "alpha")])
    supervisor = start_supervisor(run_dir)
    try:
        eventually(lambda: state(run_dir).get("alpha", {}).get("state") == "running",
                   "alpha runs")
        first = pid_of(run_dir, "alpha")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        eventually(lambda: pid_of(run_dir, "alpha") not in (None, first)
                   and state(run_dir)["alpha"]["state"] == "running", "alpha runs again")
        seen = state(run_dir)["alpha"]
        assert seen["restarts"] == 1
        assert seen["last_exit"] == "killed by SIGKILL"
        log = (run_dir / "alpha.log").read_text()
        assert "killed by SIGKILL; restart 1 in 1s" in log
    finally:
        assert stop_supervisor(supervisor) == 0
    assert pid_of(run_dir, "alpha") is None  # stopped on purpose: its pid file is gone


def test_sigterm_stops_every_program_and_the_supervisor(run_dir: Path) -> None:
    write_programs(run_dir, [sleeper(run_dir, "alpha"), sleeper(run_dir, "beta")])
    supervisor = start_supervisor(run_dir)
    eventually(lambda: all(state(run_dir).get(n, {}).get("state") == "running"
                           for n in ("alpha", "beta")), "both run")
    pids = [pid_of(run_dir, "alpha"), pid_of(run_dir, "beta")]
    assert stop_supervisor(supervisor) == 0
    assert not any(pid_alive(p) for p in pids if p)
    assert not (run_dir / PID_FILE).exists()


def test_a_program_removed_from_the_file_is_stopped_on_sighup_and_a_new_one_started(
    run_dir: Path,
) -> None:
    write_programs(run_dir, [sleeper(run_dir, "alpha")])
    supervisor = start_supervisor(run_dir)
    try:
        eventually(lambda: state(run_dir).get("alpha", {}).get("state") == "running", "alpha")
        alpha = pid_of(run_dir, "alpha")
        write_programs(run_dir, [sleeper(run_dir, "beta")])
        supervisor.send_signal(signal.SIGHUP)
        eventually(lambda: state(run_dir).get("beta", {}).get("state") == "running", "beta")
        eventually(lambda: alpha is not None and not pid_alive(alpha), "alpha stopped")
        assert "alpha" not in state(run_dir)
    finally:
        assert stop_supervisor(supervisor) == 0


def test_a_program_already_running_is_adopted_not_started_twice(run_dir: Path) -> None:
    program = sleeper(run_dir, "alpha")
    orphan = subprocess.Popen(program["argv"], start_new_session=True)
    (run_dir / "alpha.pid").write_text(f"{orphan.pid}\n")
    write_programs(run_dir, [program])
    supervisor = start_supervisor(run_dir)
    try:
        eventually(lambda: state(run_dir).get("alpha", {}).get("pid") == orphan.pid, "adopted")
        orphan.kill()
        orphan.wait()
        eventually(lambda: pid_of(run_dir, "alpha") not in (None, orphan.pid), "restarted")
        assert state(run_dir)["alpha"]["restarts"] == 1
    finally:
        assert stop_supervisor(supervisor) == 0


def test_a_program_that_cannot_start_backs_off_and_says_why(run_dir: Path) -> None:
    broken = {**sleeper(run_dir, "broken"), "argv": [str(run_dir / "no-such-program")]}
    write_programs(run_dir, [broken])
    supervisor = start_supervisor(run_dir)
    try:
        eventually(lambda: state(run_dir).get("broken", {}).get("restarts", 0) >= 2,
                   "two failed starts")
        seen = state(run_dir)["broken"]
        assert seen["last_exit"].startswith("could not start")
        # Backoff: 1 s then 2 s, so no more than 3 attempts in the first 2.5 s.
        assert seen["restarts"] <= 3
    finally:
        assert stop_supervisor(supervisor) == 0


def test_exit_reasons_read_as_an_operator_expects() -> None:
    assert exit_reason(70) == "exit status 70"
    assert exit_reason(-9) == "killed by SIGKILL"
    assert exit_reason(None) == "exited (adopted; status unknown)"
