"""The auth process: routes `auth.commands` to its handlers. `python -m services.auth.main`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog

from services.auth.adapters import (
    AUTH_DDL,
    SCHEMA,
    CaptchaStore,
    LoginFailureLog,
    postgres_registry,
)
from services.auth.handlers import AuthHandlers
from services.auth.settings import AuthSettings
from shared.channels import ChannelRegistry
from shared.commands import CommandIntake, CommandRoute
from shared.consumer import BatchConsumer
from shared.contracts.auth import (
    AuthorizeElectronicCard,
    IssueCaptcha,
    StartSession,
    VerifyPortrait,
)
from shared.erasure import erase_route
from shared.production import (
    MASTER_KEY,
    PEPPER,
    SEALING_KEY,
    SESSION_PUBLIC_KEY,
    SESSION_SIGNING_KEY,
)
from shared.runtime import ServiceRuntime, run_service

log = structlog.get_logger()

COMMANDS_TOPIC = "auth.commands"


# The secret settings this service reads; production refuses their shipped values.
SECRETS = (PEPPER, MASTER_KEY, SESSION_SIGNING_KEY, SESSION_PUBLIC_KEY, SEALING_KEY)

def utc_now() -> datetime:
    return datetime.now(UTC)


def routes(handlers: AuthHandlers) -> dict[str, CommandRoute]:
    return {
        "IssueCaptcha": CommandRoute(IssueCaptcha, handlers.issue_captcha,
                                     accepted_message="captcha issued"),
        "StartSession": CommandRoute(StartSession, handlers.start_session,
                                     accepted_message="session started"),
        "AuthorizeElectronicCard": CommandRoute(
            AuthorizeElectronicCard, handlers.authorize_electronic_card,
            accepted_message="electronic card authorised"),
        "VerifyPortrait": CommandRoute(VerifyPortrait, handlers.verify_portrait,
                                       accepted_message="portrait verified"),
        "EraseSubject": erase_route(handlers.erasure),
    }


def build(settings: AuthSettings | None = None) -> ServiceRuntime:
    """The auth service, unstarted: `run_service` runs it, tests start it in-process."""
    settings = settings or AuthSettings()
    runtime = ServiceRuntime(SCHEMA, settings, extra_ddl=AUTH_DDL, secrets=SECRETS)
    wiring: dict[str, CommandIntake] = {}

    async def wire() -> None:
        handlers = AuthHandlers(
            settings, registry_for=lambda conn: postgres_registry(conn, settings))
        wiring["intake"] = CommandIntake(
            runtime.pool, SCHEMA, ChannelRegistry.from_file(settings.channels_file),
            routes(handlers), runtime.dead_letters, utc_now, settings=settings,
        )

    def intake() -> BatchConsumer:
        return wiring["intake"]

    async def purge_captchas() -> None:
        """Expired captchas and failed logins outside the window serve no purpose; keep the
        tables small."""
        captchas = CaptchaStore(settings.citizen_ref_pepper.get_secret_value())
        failures = LoginFailureLog()
        while True:
            async with runtime.pool.acquire() as conn:
                purged = await captchas.purge(conn, utc_now() - settings.captcha_ttl)
                forgotten = await failures.purge(conn, utc_now() - settings.login_failure_window)
            if purged:
                log.info("auth.captchas_purged", count=purged)
            if forgotten:
                log.info("auth.login_failures_purged", count=forgotten)
            await asyncio.sleep(min(settings.captcha_ttl_seconds,
                                    settings.login_failure_window_seconds))

    runtime.on_ready(wire)
    runtime.subscribe(COMMANDS_TOPIC, intake, title="auth.commands:auth",
                      description="IssueCaptcha, StartSession, AuthorizeElectronicCard, "
                                  "VerifyPortrait from the channels; EraseSubject (bureau)")
    runtime.background(purge_captchas)

    async def purge_stored_replies() -> None:
        await wiring["intake"].purge_loop()

    runtime.background(purge_stored_replies)
    return runtime


if __name__ == "__main__":
    run_service(build(), default_health_port=8081)
