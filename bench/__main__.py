"""Every benchmark in turn, on the local stack (started if it is not running), the peer
(pyeventsourcing on the same PostgreSQL, bench.peer) first, so that every headline figure
is printed with its ratio to the peer's measured in the same run; a summary at the end.

    .venv/bin/python -m bench            # the full figures of the README's Performance section
    .venv/bin/python -m bench --quick    # small sizes, one run each, to check that all runs
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from bench.common import latest_result, print_table, spread_text

FULL = [
    ["bench.peer", "--runs", "3", "--seconds", "20", "--cards", "2000"],
    ["bench.eventstore", "--seconds", "20"],
    ["bench.rebuild", "--citizens", "100000", "--runs", "3"],
    ["bench.journeys", "--citizens", "2000", "--seconds", "60", "--rate", "1000", "half",
     "--runs", "3"],
    ["bench.observability"],
    ["bench.idle", "--seconds", "30"],
    ["bench.signins", "--attempts", "40"],
]
QUICK = [
    ["bench.peer", "--runs", "1", "--seconds", "5", "--cards", "500"],
    ["bench.eventstore", "--seconds", "3"],
    ["bench.rebuild", "--citizens", "2000", "--runs", "1"],
    ["bench.journeys", "--citizens", "100", "--seconds", "10", "--rate", "100", "half",
     "--concurrency", "20", "--runs", "1"],
    ["bench.observability", "--commands", "2000"],
    ["bench.idle", "--seconds", "10", "--settle", "10"],
    ["bench.signins", "--attempts", "12"],
]


# Each benchmark's bound (seconds): one that overruns is stopped and counted as failed.
FULL_TIMEOUT_S = 45 * 60
QUICK_TIMEOUT_S = 10 * 60


def this_run(name: str, since: datetime) -> dict[str, Any] | None:
    """Benchmark `name`'s result if it was written during this run."""
    result = latest_result(name)
    if result is None or datetime.fromisoformat(result["at"]) < since:
        return None
    figures: dict[str, Any] = result["figures"]
    return figures


Rows = list[tuple[str, str]]


def summary(since: datetime) -> None:
    """The headline figures of this run, each with its ratio to the peer's (issue 12's
    targets: ≥ 2.3× commands/s, ≥ 30× projection rebuild, p99s at half the sustained rate,
    idle ≤ 1% of a core and peak RSS ≤ 150 MB per service, the console's under a flood of
    sign-ins too)."""
    peer, journeys = this_run("peer", since), this_run("journeys", since)
    rebuild, idle = this_run("rebuild", since), this_run("idle", since)
    signins = this_run("signins", since)
    rows: Rows = []
    if peer is not None:
        rows += [("peer: commands/s", spread_text(peer["commands_per_s"])),
                 ("peer: projection catch-up events/s",
                  spread_text(peer["projection_events_per_s"]))]
    if journeys is not None:
        rows += journey_rows(journeys, peer)
    if rebuild is not None:
        rows += [("projection rebuild events/s", spread_text(rebuild["events_per_s"])),
                 ("  vs peer (target ≥ 30×)",
                  ratio(rebuild["events_per_s"], peer, "projection_events_per_s", 30))]
    if idle is not None:
        rows += idle_rows(idle)
    if signins is not None:
        after = signins["peak_rss_mb_after"]
        rows.append((f"console under {signins['attempts']} sign-ins at once: peak RSS MB "
                     "(≤ 150)", f"{after:.0f}" if after else "?"))
    print_table("headline figures of this run, min / median / max", rows)


def ratio(ours: dict[str, float], peer: dict[str, Any] | None, peer_figure: str,
          target: float) -> str:
    """Our median against the peer's, and whether it meets `target` times the peer's."""
    if peer is None:
        return "(no peer result)"
    theirs = float(peer[peer_figure]["median"])
    times = ours["median"] / theirs
    return f"{times:.2f}× the peer's {theirs:,.0f}/s: {'met' if times >= target else 'MISSED'}"


def journey_rows(journeys: dict[str, Any], peer: dict[str, Any] | None) -> Rows:
    commands = journeys["sustained"]["commands_per_s"]
    rows: Rows = [("sustained commands/s end to end", spread_text(commands)),
                  ("  vs peer (target ≥ 2.3×)", ratio(commands, peer, "commands_per_s", 2.3))]
    for phase in journeys["paced"]:
        if phase["half_of_sustained"]:
            rows += half_rate_rows(phase)
    rows += [(f"peak RSS under load, {name} (MB, ≤ 150)", f"{mb:.0f}" if mb else "?")
             for name, mb in journeys["peak_rss_mb"].items()]
    return rows


def half_rate_rows(phase: dict[str, Any]) -> Rows:
    rows: Rows = []
    for key, label, target in (("command_to_reply", "reply", 100),
                               ("command_to_status_visible", "status visible", 250)):
        values = sorted(r[key]["p99_ms"] for r in phase["runs"])
        rows.append((f"  at half rate ({phase['target_commands_per_s']:.0f}/s): "
                     f"{label} p99 ms (target ≤ {target})",
                     f"{values[0]:.0f} / {values[len(values) // 2]:.0f} / {values[-1]:.0f}"))
    return rows


def idle_rows(idle: dict[str, Any]) -> Rows:
    rows: Rows = []
    for name, f in idle["services"].items():
        cpu, rss = f["cpu_percent_of_core"], f["peak_rss_mb"]
        rows.append((f"idle {name}: % of a core / peak RSS MB (≤ 1 / ≤ 150)",
                     f"{cpu:.2f} / {rss:.0f}" if cpu is not None and rss else "?"))
    return rows


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    runs, timeout_s = (QUICK, QUICK_TIMEOUT_S) if quick else (FULL, FULL_TIMEOUT_S)
    subprocess.run([sys.executable, "-m", "cardctl.main", "stack", "up", "--no-services"],
                   check=True, timeout=15 * 60)
    failed: list[str] = []
    started = datetime.now(UTC)
    for module, *args in runs:
        print(f"\n=== {module} {' '.join(args)}", flush=True)
        try:
            code = subprocess.run([sys.executable, "-m", module, *args],
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            failed.append(f"{module}: stopped after {timeout_s} s")
            continue
        if code != 0:
            failed.append(f"{module}: exit status {code}")
    summary(started)
    print("\n=== " + ("failed: " + "; ".join(failed) if failed else "every benchmark ran"),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
