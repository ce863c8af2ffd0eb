"""What the benchmarks share: percentiles, process memory, result files, tables."""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
console = Console()


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of samples given in seconds."""
    if len(samples) < 2:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1000, "p95_ms": cuts[94] * 1000, "p99_ms": cuts[98] * 1000}


def peak_rss_mb(pid: int) -> float | None:
    """The high-water mark of a process's resident memory (VmHWM), in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def spread(values: Sequence[float]) -> dict[str, float]:
    """min / median / max of a figure over a phase's runs."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "runs": len(values)}


def spread_text(s: Mapping[str, float], digits: int = 0) -> str:
    return f"{s['min']:,.{digits}f} / {s['median']:,.{digits}f} / {s['max']:,.{digits}f}"


def latest_result(name: str, results: Path = RESULTS) -> dict[str, Any] | None:
    """The newest result file of benchmark `name` (in `results`: another checkout's), or
    None."""
    paths = sorted(results.glob(f"{name}-*.json"))
    return json.loads(paths[-1].read_text()) if paths else None


def peer_ratio(ours: float, peer_figure: str) -> str:
    """`ours` as a multiple of the peer's median (bench.peer, its newest result), e.g.
    '2.31× the peer (427/s)'; '(no peer result)' when bench.peer has not run here."""
    peer = latest_result("peer")
    if peer is None:
        return "(no peer result: run python -m bench.peer)"
    theirs = float(peer["figures"][peer_figure]["median"])
    return f"{ours / theirs:.2f}× the peer ({theirs:,.0f}/s, {peer['at'][:16]})"


def write_result(name: str, figures: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC)
    path = RESULTS / f"{name}-{stamp:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps({
        "benchmark": name, "at": stamp.isoformat(), "machine": {
            "cpus": _cpus(), "python": platform.python_version(), "system": platform.platform()},
        "figures": figures,
    }, indent=2, default=str))
    return path


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    table = Table("figure", "value", title=title)
    for figure, value in rows:
        table.add_row(figure, value)
    console.print(table)
