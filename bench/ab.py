"""A change against a base revision, measured in alternating rounds on the local stack.

    .venv/bin/python -m bench.ab --base main
    .venv/bin/python -m bench.ab --base 4692d38 --rounds 8 --seconds 20 --rate 150

Runs of the same code on one stack spread over about ±15% (README, Performance), as much as
most single changes are worth, so one run of each side says nothing. This checks the base out
in a worktree of its own, then runs `bench.journeys` once per side per round (each side's
services restarted from its own tree), alternating which side goes first (A B, B A, …) so
that a drift of the machine meets both sides alike. It prints every round, each side's
median, their ratio, and in how many rounds the change did better: a difference is worth
reporting when the change wins (or loses) every one of at least five rounds, not when the
medians differ: identical code's medians differed by 11-14% over four rounds (README).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import console, latest_result, print_table, write_result
from shared.settings import PROJECT_ROOT

# Each run of `bench.journeys` (seeding, warm-up, both phases, the drain) is bounded.
RUN_TIMEOUT_S = 15 * 60
BASE, CHANGE = "base", "change"
MIN_ROUNDS_TO_CALL = 5


@dataclass(frozen=True, slots=True)
class Figure:
    """A figure of one journeys result, and which way is better."""

    label: str
    read: Callable[[Mapping[str, Any]], float]
    higher_is_better: bool


def _paced(result: Mapping[str, Any], key: str) -> float:
    return float(result["figures"]["paced"][0]["runs"][0][key]["p99_ms"])


FIGURES = (
    Figure("sustained commands/s",
           lambda r: float(r["figures"]["sustained"]["commands_per_s"]["median"]), True),
    Figure("paced: command → reply p99 ms", lambda r: _paced(r, "command_to_reply"), False),
    Figure("paced: command → status visible p99 ms",
           lambda r: _paced(r, "command_to_status_visible"), False),
)


def order(rounds: int) -> list[tuple[int, str]]:
    """(round, side) in the order they run: the base first in odd rounds, the change first
    in even ones."""
    sides = [(BASE, CHANGE), (CHANGE, BASE)]
    return [(r, side) for r in range(1, rounds + 1) for side in sides[(r - 1) % 2]]


def summarize(runs: Mapping[str, Sequence[float]], higher_is_better: bool,
              ) -> dict[str, Any]:
    """Each side's runs (round by round) of one figure: medians, the change's median as a
    ratio to the base's, and the rounds in which the change did better."""
    base, change = list(runs[BASE]), list(runs[CHANGE])
    wins = sum((c > b) if higher_is_better else (c < b) for b, c in zip(base, change, strict=True))
    base_median, change_median = statistics.median(base), statistics.median(change)
    return {"base": base, "change": change, "base_median": base_median,
            "change_median": change_median,
            "ratio": change_median / base_median if base_median else float("nan"),
            "change_better_in": wins, "rounds": len(base)}


def verdict(summary: Mapping[str, Any]) -> str:
    """What the rounds say, in words a README can quote. Identical code on both sides wins
    (or loses) all of n rounds by chance once in 2^(n-1): a change is called only over at
    least `MIN_ROUNDS_TO_CALL` rounds (by chance: 1 in 16)."""
    wins, rounds = summary["change_better_in"], summary["rounds"]
    if rounds >= MIN_ROUNDS_TO_CALL and wins == rounds:
        return "better in every round"
    if rounds >= MIN_ROUNDS_TO_CALL and wins == 0:
        return "worse in every round"
    return f"better in {wins} of {rounds} rounds: within the spread"


def newest_journeys(tree: Path, since: datetime) -> dict[str, Any]:
    """The journeys result the run in `tree` just wrote (stamped at `since` or later)."""
    result = latest_result("journeys", tree / "bench" / "results")
    if result is None or datetime.fromisoformat(result["at"]) < since:
        raise RuntimeError(f"bench.journeys wrote no result in {tree} since {since:%H:%M:%S}")
    return result


def run_journeys(tree: Path, journeys_args: Sequence[str]) -> dict[str, Any]:
    """One `bench.journeys` run with `tree`'s code (its services restarted from it)."""
    started = datetime.now(UTC)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "bench.journeys", *journeys_args], cwd=tree, env=env,
                   check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL)
    return newest_journeys(tree, started)


@contextmanager
def worktree(revision: str, into: Path, repository: Path = PROJECT_ROOT) -> Iterator[Path]:
    """A detached checkout of `revision` at `into`, removed again however the run ends."""
    subprocess.run(["git", "worktree", "add", "--detach", str(into), revision], cwd=repository,
                   check=True, capture_output=True, timeout=120)
    try:
        yield into
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(into)], cwd=repository,
                       capture_output=True, timeout=120)


def stop_on_sigterm() -> None:
    """SIGTERM (`kill`, `timeout`) ends the run as Ctrl-C does, through the `finally`s that
    remove the base's worktree and stop the run in progress; Python's default for SIGTERM
    ends the process without them."""
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the revision to measure against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--citizens", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--rate", type=float, default=200.0,
                        help="the paced phase's rate (commands/s)")
    args = parser.parse_args()
    journeys_args = ["--citizens", str(args.citizens), "--concurrency", str(args.concurrency),
                     "--seconds", str(args.seconds), "--rate", str(args.rate), "--runs", "1"]
    stop_on_sigterm()
    with (tempfile.TemporaryDirectory(prefix="carddesk-ab-") as scratch,
          worktree(args.base, Path(scratch) / "base") as base_tree):
        trees = {BASE: base_tree, CHANGE: PROJECT_ROOT}
        runs: dict[str, dict[str, list[float]]] = {
            f.label: {BASE: [], CHANGE: []} for f in FIGURES}
        for round_no, side in order(args.rounds):
            result = run_journeys(trees[side], journeys_args)
            figures = {f.label: f.read(result) for f in FIGURES}
            for label, value in figures.items():
                runs[label][side].append(value)
            console.print(f"round {round_no} {side}: " + ", ".join(
                f"{label} {value:,.0f}" for label, value in figures.items()))
    summaries = {f.label: summarize(runs[f.label], f.higher_is_better) for f in FIGURES}
    print_table(f"the working tree against {args.base}: rounds {args.rounds}, alternating", [
        (label, f"{s['change_median']:,.0f} against {s['base_median']:,.0f}"
                f" ({s['ratio']:.2f}×); {verdict(s)}")
        for label, s in summaries.items()])
    path = write_result("ab", {"base": args.base, "rounds": args.rounds,
                               "journeys": journeys_args, "figures": summaries})
    console.print(f"written {path}")


if __name__ == "__main__":
    main()
