"""The console's runtime: it consumes in the configured group, so what it dead-letters names
it; its process exits when it stays unhealthy, and its HTTP server ticks once a second, as
the other services' do."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import pytest
import uvicorn
import uvloop

from services.console import main as console_main
from services.console.main import ConsoleService
from services.console.settings import ConsoleSettings
from shared.ticks import _main_loop


async def test_the_console_consumes_and_dead_letters_in_its_configured_group() -> None:
    service = ConsoleService(ConsoleSettings(console_consumer_group="carddesk-console-blue"))
    assert service.runtime.group == "carddesk-console-blue"
    assert service.runtime._subscriptions == [(service.settings.review_events_topic(),
                                               "carddesk-console-blue")]


def test_the_console_process_arms_the_unhealthy_exit_and_ticks_once_a_second_as_others_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[ConsoleService] = []

    def build() -> ConsoleService:
        built.append(ConsoleService(ConsoleSettings(unhealthy_exit_seconds=60)))
        return built[-1]

    def run(serving: Coroutine[Any, Any, None]) -> None:
        serving.close()  # the entry point would serve for ever

    monkeypatch.setattr(console_main, "build", build)
    monkeypatch.setattr(console_main, "configure_logging", lambda *_: None)
    monkeypatch.setattr(uvloop, "run", run)
    # uvicorn's own loop for the rest of this test process, once this test is over.
    monkeypatch.setattr(uvicorn.Server, "main_loop", uvicorn.Server.main_loop)
    console_main.main()

    [service] = built
    assert service.runtime._watchdog in service.runtime._background
    assert uvicorn.Server.main_loop is _main_loop
