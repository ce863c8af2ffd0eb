"""`cardctl top`: rates and percentiles from two scrapes, a down service, a bounded run."""

from __future__ import annotations

import httpx
import pytest
from rich.console import Console
from rich.table import Table

from cardctl.top import parse, quantile, render, view, watch

BEFORE = """
# TYPE carddesk_commands_received counter
carddesk_commands_received_total{service="loss",type="ReportLoss"} 100
carddesk_commands_received_total{service="loss",type="unknown"} 4
# TYPE carddesk_commands_replied counter
carddesk_commands_replied_total{code="accepted",service="loss",status="accepted",type="R"} 90
carddesk_commands_replied_total{code="no_card",service="loss",status="rejected",type="R"} 10
# TYPE carddesk_command_latency_seconds histogram
carddesk_command_latency_seconds_bucket{le="0.01",service="loss",type="ReportLoss"} 50
carddesk_command_latency_seconds_bucket{le="0.1",service="loss",type="ReportLoss"} 100
carddesk_command_latency_seconds_bucket{le="+Inf",service="loss",type="ReportLoss"} 100
carddesk_command_latency_seconds_count{service="loss",type="ReportLoss"} 100
carddesk_command_latency_seconds_sum{service="loss",type="ReportLoss"} 3
# TYPE carddesk_consumer_lag_messages gauge
carddesk_consumer_lag_messages{group="g",partition="0",service="loss",topic="loss.commands"} 3
carddesk_consumer_lag_messages{group="g",partition="1",service="loss",topic="loss.commands"} 4
# TYPE carddesk_dlq_messages counter
carddesk_dlq_messages_total{code="bad_signature",topic="loss.commands"} 2
# TYPE carddesk_outbox_unsent_rows gauge
carddesk_outbox_unsent_rows{service="loss"} 5
# TYPE carddesk_outbox_oldest_unsent_age_seconds gauge
carddesk_outbox_oldest_unsent_age_seconds{service="loss"} 1.5
"""

# Ten seconds later: 50 more commands (10 rejected), all slower than 10 ms.
AFTER = (BEFORE
         .replace('type="ReportLoss"} 100\n', 'type="ReportLoss"} 150\n', 1)
         .replace('status="rejected",type="R"} 10', 'status="rejected",type="R"} 20')
         .replace('le="0.1",service="loss",type="ReportLoss"} 100',
                  'le="0.1",service="loss",type="ReportLoss"} 150')
         .replace('le="+Inf",service="loss",type="ReportLoss"} 100',
                  'le="+Inf",service="loss",type="ReportLoss"} 150'))


def test_rates_and_percentiles_come_from_the_interval_between_two_scrapes() -> None:
    row = view("loss", parse(AFTER), parse(BEFORE), elapsed_s=10.0)

    assert row.up
    assert row.commands_per_s == pytest.approx(5.0)
    assert row.rejected_per_s == pytest.approx(1.0)
    # Every command of the interval fell between 10 and 100 ms.
    assert row.p50_ms is not None and 10 < row.p50_ms <= 100
    assert row.p99_ms is not None and row.p50_ms < row.p99_ms <= 100
    assert (row.lag, row.outbox_rows, row.outbox_age_s, row.dlq) == (7, 5, 1.5, 2)


def test_the_first_frame_has_no_rates_but_percentiles_since_start() -> None:
    row = view("loss", parse(BEFORE), None, elapsed_s=0.0)

    assert row.commands_per_s is None
    assert row.p50_ms is not None and row.p50_ms <= 10


def test_a_histogram_without_observations_has_no_quantile() -> None:
    assert quantile(0.5, {}) is None
    assert quantile(0.99, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.5, {0.1: 0.0, float("inf"): 4.0}) == 0.1


def test_a_service_that_does_not_answer_is_shown_down() -> None:
    console = Console(record=True, width=160)
    console.print(render([view("review", None, None, 1.0), view("loss", parse(BEFORE), None, 1)]))

    text = console.export_text()
    assert "review" in text and "down" in text
    assert "loss" in text and "up" in text


async def test_watch_scrapes_each_service_a_bounded_number_of_times() -> None:
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "review":
            return httpx.Response(503)
        return httpx.Response(200, text=BEFORE if len(calls) <= 2 else AFTER)

    frames: list[Table] = []
    rows = await watch({"loss": "http://loss/metrics", "review": "http://review/metrics"},
                       interval_s=0.01, iterations=2, show=frames.append,
                       transport=httpx.MockTransport(answer))

    assert len(frames) == 2
    assert sorted(calls) == ["loss", "loss", "review", "review"]
    assert [r.up for r in rows] == [True, False]
    assert rows[0].commands_per_s is not None and rows[0].commands_per_s > 0
