"""`bench.ab`: the order of the runs, and what the rounds say."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from bench.ab import BASE, CHANGE, FIGURES, newest_journeys, order, summarize, verdict
from shared.settings import PROJECT_ROOT


def test_the_sides_alternate_which_goes_first_round_by_round() -> None:
    assert order(3) == [(1, BASE), (1, CHANGE), (2, CHANGE), (2, BASE),
                        (3, BASE), (3, CHANGE)]


def test_a_change_better_in_every_round_is_called_so_and_its_ratio_is_of_the_medians() -> None:
    summary = summarize({BASE: [300, 350, 400, 320, 310], CHANGE: [330, 360, 480, 321, 400]},
                        higher_is_better=True)
    assert (summary["base_median"], summary["change_median"]) == (320, 360)
    assert summary["ratio"] == pytest.approx(360 / 320)
    assert verdict(summary) == "better in every round"


def test_lower_is_better_for_latencies() -> None:
    summary = summarize({BASE: [500, 400, 450, 300, 350], CHANGE: [520, 410, 460, 301, 700]},
                        higher_is_better=False)
    assert verdict(summary) == "worse in every round"


def test_medians_apart_but_rounds_split_is_within_the_spread() -> None:
    summary = summarize({BASE: [300, 420, 330, 410], CHANGE: [390, 400, 380, 360]},
                        higher_is_better=True)
    assert summary["change_median"] > summary["base_median"]
    assert verdict(summary) == "better in 2 of 4 rounds: within the spread"


def test_four_rounds_are_never_enough_to_call_it() -> None:
    # Identical code wins all of four rounds by chance once in eight.
    summary = summarize({BASE: [300, 310, 320, 330], CHANGE: [400, 410, 420, 430]},
                        higher_is_better=True)
    assert verdict(summary) == "better in 4 of 4 rounds: within the spread"


def journeys_result(at: datetime, sustained: float, reply_p99: float, visible_p99: float,
                    ) -> dict[str, Any]:
    """The parts of a `bench.journeys` result file that `bench.ab` reads."""
    return {"benchmark": "journeys", "at": at.isoformat(), "figures": {
        "sustained": {"commands_per_s": {"min": sustained, "median": sustained,
                                         "max": sustained, "runs": 1}},
        "paced": [{"target_commands_per_s": 200.0, "runs": [{
            "command_to_reply": {"p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": reply_p99},
            "command_to_status_visible": {"p50_ms": 1.0, "p95_ms": 2.0,
                                          "p99_ms": visible_p99}}]}]}}


def test_each_figure_is_read_from_the_run_the_tree_just_wrote(tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    ten, eleven = (datetime(2026, 11, 30, hour, tzinfo=UTC) for hour in (10, 11))
    (results / "journeys-20261130T100000Z.json").write_text(
        json.dumps(journeys_result(ten, 100, 900, 950)))
    (results / "journeys-20261130T110000Z.json").write_text(
        json.dumps(journeys_result(eleven, 412.5, 310, 480)))
    result = newest_journeys(tmp_path, since=ten + timedelta(minutes=30))
    assert [f.read(result) for f in FIGURES] == [412.5, 310, 480]
    with pytest.raises(RuntimeError):  # nothing written since the run started
        newest_journeys(tmp_path, since=eleven + timedelta(minutes=1))
    with pytest.raises(RuntimeError):
        newest_journeys(tmp_path / "elsewhere", since=ten)


# Stands in for `python -m bench.ab`: the base's worktree in a repository of the test's own,
# and a run that reports which tree it runs in, then takes its time.
STOPPED_RUN = """
import sys, time
from pathlib import Path
import bench.ab as ab

repository, started = Path(sys.argv[1]), Path(sys.argv[2])
in_repository = ab.worktree
ab.worktree = lambda revision, into: in_repository(revision, into, repository=repository)

def run_journeys(tree, _args):
    started.write_text(str(tree))
    time.sleep(60)

ab.run_journeys = run_journeys
sys.argv = ["bench.ab", "--base", "HEAD", "--rounds", "1"]
ab.main()
"""


def git(repository: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repository), "-c", "user.name=t",
                           "-c", "user.email=t@example.org", *args],
                          check=True, capture_output=True, text=True, timeout=30).stdout


def test_a_run_stopped_by_sigterm_removes_the_worktree_of_the_base(tmp_path: Path) -> None:
    repository, started = tmp_path / "repo", tmp_path / "started"
    repository.mkdir()
    git(repository, "init", "-q")
    (repository / "file").write_text("base\n")
    git(repository, "add", "file")
    git(repository, "commit", "-q", "-m", "base")
    run = subprocess.Popen([sys.executable, "-c", STOPPED_RUN, str(repository), str(started)],
                           cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the stand-in run did not start (or ended first)"
        base_tree = Path(started.read_text())
        assert (base_tree / "file").read_text() == "base\n"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        run.kill()
        run.wait(timeout=30)
    assert not base_tree.exists()
    listed = [line for line in git(repository, "worktree", "list", "--porcelain").splitlines()
              if line.startswith("worktree ")]
    assert listed == [f"worktree {repository}"]
