"""The console's runtime consumes in the configured group, so what it dead-letters names it."""

from __future__ import annotations

from services.console.main import ConsoleService
from services.console.settings import ConsoleSettings


async def test_the_console_consumes_and_dead_letters_in_its_configured_group() -> None:
    service = ConsoleService(ConsoleSettings(console_consumer_group="carddesk-console-blue"))
    assert service.runtime.group == "carddesk-console-blue"
    assert service.runtime._subscriptions == [(service.settings.review_events_topic(),
                                               "carddesk-console-blue")]
