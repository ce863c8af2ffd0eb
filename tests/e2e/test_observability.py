"""Every service process serves `/metrics` on its port, and `cardctl top` reads them all
(issue 14): after a citizen logs in, the auth service counts the commands and the projection
the events."""

from __future__ import annotations

import httpx
from typer.testing import CliRunner

from cardctl.journey import Session
from cardctl.main import app
from cardctl.stack import service_ports
from cardctl.top import parse, total
from shared.settings import CardDeskSettings
from tests.support import eventually


async def scrape(settings: CardDeskSettings, service: str) -> str:
    port = service_ports(settings)[service]
    async with httpx.AsyncClient(timeout=5.0) as http:
        response = await http.get(f"http://{settings.http_host}:{port}/metrics")
    assert response.status_code == 200, service
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_a_login_shows_in_the_auth_and_status_metrics(
    settings: CardDeskSettings, logged_in: Session,
) -> None:
    auth = parse(await scrape(settings, "auth"))

    assert total(auth, "carddesk_commands_replied_total", service="auth",
                 type="StartSession", status="accepted") >= 1
    assert total(auth, "carddesk_command_latency_seconds_count", type="StartSession") >= 1
    assert total(auth, "carddesk_events_published_total", type="SessionStarted") >= 1

    async def projected() -> bool:  # the login's events reach the projection in their time
        return total(parse(await scrape(settings, "status")), "carddesk_events_applied_total",
                     topic="auth.events") >= 1

    await eventually(projected)
    status = parse(await scrape(settings, "status"))
    assert any(labels.get("topic") == "auth.events"
               for labels, _ in status["carddesk_projection_lag_seconds"])
    for service in ("loss", "review", "issuance"):
        assert total(parse(await scrape(settings, service)),
                     "carddesk_process_resident_memory_bytes") > 0


async def test_every_service_process_froze_its_startup_heap_and_times_its_collections(
    settings: CardDeskSettings, services: list[str],
) -> None:
    for service in service_ports(settings):
        samples = parse(await scrape(settings, service))
        assert total(samples, "carddesk_gc_frozen_objects") > 10_000, service
        assert {labels["generation"] for labels, _ in
                samples["carddesk_gc_pause_seconds_count"]} == {"0", "1", "2"}, service


def test_cardctl_top_shows_every_service_up(settings: CardDeskSettings,
                                            services: list[str]) -> None:
    result = CliRunner().invoke(app, ["top", "--iterations", "1", "--interval", "0.2"],
                                env={"COLUMNS": "200"})

    assert result.exit_code == 0, result.output
    for service in service_ports(settings):
        line = next(line for line in result.output.splitlines() if f" {service} " in line)
        assert " up " in line and "down" not in line, line
