"""`cardctl top`: a live view of every service, read from their `/metrics` endpoints.

Each refresh scrapes every service (each request bounded by a timeout), then shows per service
the command and event rates since the previous scrape, p50/p99 command latency over that
interval (or since start on the first frame), consumer lag, outbox backlog and DLQ count.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

# Sample name -> [(labels, value)], as one scrape gave them.
Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition, by sample name."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def total(samples: Samples | None, name: str, **match: str) -> float:
    """The sum of a series' samples whose labels include `match` (0 when absent)."""
    if samples is None:
        return 0.0
    return sum(value for labels, value in samples.get(name, ())
               if all(labels.get(k) == v for k, v in match.items()))


def maximum(samples: Samples | None, name: str) -> float:
    if samples is None:
        return 0.0
    return max((value for _, value in samples.get(name, ())), default=0.0)


def buckets(samples: Samples | None, name: str) -> dict[float, float]:
    """A histogram's cumulative bucket counts summed over its other labels, by upper bound."""
    found: dict[float, float] = {}
    if samples is None:
        return found
    for labels, value in samples.get(f"{name}_bucket", ()):
        bound = float(labels["le"])
        found[bound] = found.get(bound, 0.0) + value
    return found


def quantile(q: float, cumulative: Mapping[float, float]) -> float | None:
    """The q-quantile of a histogram as Prometheus's histogram_quantile estimates it (linear
    within the bucket); None without observations."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    rank = q * cumulative[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class ServiceView:
    """One row of the view."""

    service: str
    up: bool
    commands_per_s: float | None = None
    rejected_per_s: float | None = None
    events_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    lag: float = 0.0
    outbox_rows: float = 0.0
    outbox_age_s: float = 0.0
    dlq: float = 0.0
    rss_mb: float | None = None


LATENCY = "carddesk_command_latency_seconds"


def view(service: str, current: Samples | None, previous: Samples | None,
         elapsed_s: float) -> ServiceView:
    """What one service's scrapes say; rates need a previous scrape."""
    if current is None:
        return ServiceView(service, up=False)

    def rate(name: str, **match: str) -> float | None:
        if previous is None or elapsed_s <= 0:
            return None
        return max(0.0, total(current, name, **match) - total(previous, name, **match)) / elapsed_s

    latest = buckets(current, LATENCY)
    if previous is not None:
        before = buckets(previous, LATENCY)
        interval = {bound: count - before.get(bound, 0.0) for bound, count in latest.items()}
        if quantile(0.5, interval) is not None:
            latest = interval
    p50, p99 = quantile(0.5, latest), quantile(0.99, latest)
    rss = total(current, "carddesk_process_resident_memory_bytes")
    return ServiceView(
        service, up=True,
        commands_per_s=rate("carddesk_commands_received_total"),
        rejected_per_s=rate("carddesk_commands_replied_total", status="rejected"),
        events_per_s=rate("carddesk_events_appended_total"),
        p50_ms=None if p50 is None else p50 * 1000,
        p99_ms=None if p99 is None else p99 * 1000,
        lag=total(current, "carddesk_consumer_lag_messages"),
        outbox_rows=total(current, "carddesk_outbox_unsent_rows"),
        outbox_age_s=maximum(current, "carddesk_outbox_oldest_unsent_age_seconds"),
        dlq=total(current, "carddesk_dlq_messages_total"),
        rss_mb=rss / 2**20 if rss else None,
    )


def _figure(value: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if value is None else fmt.format(value)


def render(views: Iterable[ServiceView], title: str = "Card Desk") -> Table:
    table = Table("service", "up", "cmd/s", "rejected/s", "events/s", "p50 ms", "p99 ms",
                  "lag", "outbox", "oldest s", "DLQ", "RSS MB", title=title)
    for v in views:
        if not v.up:
            table.add_row(v.service, "[red]down[/]", *("–" for _ in range(10)))
            continue
        table.add_row(
            v.service, "[green]up[/]", _figure(v.commands_per_s), _figure(v.rejected_per_s),
            _figure(v.events_per_s), _figure(v.p50_ms), _figure(v.p99_ms),
            _figure(v.lag, "{:.0f}"), _figure(v.outbox_rows, "{:.0f}"),
            _figure(v.outbox_age_s), f"[red]{v.dlq:.0f}[/]" if v.dlq else "0",
            _figure(v.rss_mb, "{:.0f}"))
    return table


async def scrape(client: httpx.AsyncClient, url: str) -> Samples | None:
    """One service's samples, or None when it does not answer in time."""
    try:
        response = await client.get(url)
        response.raise_for_status()
        return parse(response.text)
    except (httpx.HTTPError, ValueError):
        return None


async def watch(targets: Mapping[str, str], *, interval_s: float, iterations: int,
                show: Callable[[Table], None], timeout_s: float = 2.0,
                transport: httpx.AsyncBaseTransport | None = None) -> list[ServiceView]:
    """Scrape every target `iterations` times (0: until interrupted), `interval_s` apart, and
    `show` each frame; returns the last frame's rows."""
    loop = asyncio.get_running_loop()
    previous: dict[str, Samples | None] = {}
    previous_at = loop.time()
    views: list[ServiceView] = []
    done = 0
    async with httpx.AsyncClient(timeout=timeout_s, transport=transport) as client:
        while True:
            current = dict(zip(targets, await asyncio.gather(
                *(scrape(client, url) for url in targets.values())), strict=True))
            now = loop.time()
            views = [view(name, current[name], previous.get(name), now - previous_at)
                     for name in targets]
            show(render(views))
            previous, previous_at = current, now
            done += 1
            if iterations and done >= iterations:
                return views
            await asyncio.sleep(interval_s)


def run_top(targets: Mapping[str, str], *, interval_s: float, iterations: int,
            console: Console) -> None:
    """The live view in the terminal until `iterations` frames were shown or Ctrl-C."""
    with Live(render([]), console=console, auto_refresh=False) as live:

        def show(table: Table) -> None:
            live.update(table, refresh=True)

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(watch(targets, interval_s=interval_s, iterations=iterations, show=show))
