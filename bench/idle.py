"""Idle burn: the CPU each service uses with no traffic at all, and its peak memory.

Starts the local stack and (re)starts its services, lets them settle,
then reads each service process's CPU time (user + system, /proc/<pid>/stat) at the start
and the end of `--seconds` without a single request, and prints it as % of one core. The
target (issue 12): ≤ 1% of a core per service; peak RSS ≤ 150 MB.

    python -m bench.idle [--seconds 30] [--settle 15]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench.common import console, peak_rss_mb, print_table, write_result
from cardctl.stack import Stack
from shared.logging import configure_logging
from shared.settings import CardDeskSettings

TARGET_PERCENT = 1.0
TARGET_RSS_MB = 150.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (its threads included)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces: the fields after it start past the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def measure(pids: dict[str, int], seconds: float) -> dict[str, dict[str, float | None]]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    figures: dict[str, dict[str, float | None]] = {}
    for name, pid in pids.items():
        after, first = cpu_seconds(pid), before[name]
        percent = None if after is None or first is None else (after - first) / elapsed * 100
        figures[name] = {"cpu_percent_of_core": percent, "peak_rss_mb": peak_rss_mb(pid)}
    return figures


def main(seconds: float, settle: float) -> int:
    settings = CardDeskSettings()
    stack = Stack(settings, report=lambda line: console.print(f"[dim]•[/] {line}"))
    stack.up(services=False)
    # Restarted, so that what is measured is this checkout with this environment.
    stack.down(only=[spec.name for spec in stack.service_specs()])
    stack.start_services()
    pids = {spec.name: pid for spec in stack.service_specs()
            if (pid := stack.running_pid(spec)) is not None}
    console.print(f"settling for {settle:.0f} s, then {seconds:.0f} s without traffic …")
    time.sleep(settle)
    figures = measure(pids, seconds)
    rows = []
    missed = []
    for name, f in figures.items():
        percent, rss = f["cpu_percent_of_core"], f["peak_rss_mb"]
        rows.append((f"{name}: CPU % of a core / peak RSS MB",
                     f"{percent:.2f} / {rss:.0f}" if percent is not None and rss else "?"))
        if percent is None or percent > TARGET_PERCENT or rss is None or rss > TARGET_RSS_MB:
            missed.append(name)
    total = sum(f["cpu_percent_of_core"] or 0.0 for f in figures.values())
    rows.append(("all services together, CPU % of a core", f"{total:.2f}"))
    print_table(f"idle, {seconds:.0f} s without traffic (target ≤ {TARGET_PERCENT:.0f}% "
                f"and ≤ {TARGET_RSS_MB:.0f} MB each)", rows)
    console.print(f"written {write_result('idle', {'seconds': seconds, 'services': figures})}")
    if missed:
        console.print(f"[red]over the idle target[/]: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=15.0)
    args = parser.parse_args()
    configure_logging("bench", "WARNING")
    raise SystemExit(main(args.seconds, args.settle))
