"""The query API of the running status service, as cardctl and a channel call it: the
auditor's key (cardctl's default) and a channel's key read; anything else is refused."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from typer.testing import CliRunner, Result

from cardctl.journey import Journey, Session
from cardctl.main import app
from cardctl.operations import status_url
from shared.settings import CardDeskSettings

pytestmark = pytest.mark.integration


async def cardctl(*args: str, env: dict[str, str] | None = None) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=env)


async def test_cardctl_reads_status_and_timeline_with_the_auditors_key(
    journey: Journey, logged_in: Session,
) -> None:
    status = await cardctl("status", logged_in.citizen_ref)
    assert status.exit_code == 0, status.output
    assert "ACTIVE" in status.output
    timeline = await cardctl("timeline", logged_in.citizen_ref)
    assert timeline.exit_code == 0, timeline.output
    assert f"timeline of {logged_in.citizen_ref[:12]}" in timeline.output
    assert "issued" in timeline.output  # the CardIssued line

    refused = await cardctl("status", logged_in.citizen_ref,
                            env={"CARDDESK_QUERY_API_KEY": "not-a-key"})
    assert refused.exit_code == 1
    assert "refused (401)" in refused.output
    assert "not-a-key" not in refused.output


async def test_the_running_service_answers_a_channel_key_and_refuses_a_missing_one(
    settings: CardDeskSettings, logged_in: Session,
) -> None:
    url = f"{status_url(settings)}/v1/citizens/{logged_in.citizen_ref}/card"
    async with httpx.AsyncClient(timeout=5.0) as client:
        anonymous = await client.get(url)
        channel = await client.get(url, headers={
            "Authorization": "Bearer dev-api-key-mobile-app"})
        health = await client.get(f"{status_url(settings)}/health")
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert channel.status_code == 200
    assert channel.json()["citizen_ref"] == logged_in.citizen_ref
    assert health.status_code == 200
