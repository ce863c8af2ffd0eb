"""Wiring of the bureau console: the review-queue follower, the staff directory, the
channel client and the pages, in one process.

`python -m services.console.main` serves on `CARDDESK_HTTP_HOST:CARDDESK_CONSOLE_PORT`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog
import uvloop
from starlette.applications import Starlette

from services.console.audits import AuditRunner
from services.console.channel import ConsoleChannel
from services.console.queue import QueueReader, QueueWriter, queue_ddl
from services.console.reads import StatusReader
from services.console.settings import ConsoleSettings
from services.console.staff import LockoutPolicy, Role, StaffDirectory, staff_ddl
from services.console.web import Console, create_app
from shared.channels import ChannelRegistry
from shared.consumer import BatchConsumer, EventConsumer, purge_bookkeeping_loop
from shared.contracts import KNOWN_EVENT_TYPES
from shared.logging import configure_logging
from shared.runtime import ServiceRuntime
from shared.webapp import runtime_lifespan, serve

log = structlog.get_logger()

# Development only (CARDDESK_ENV=development): one account per role, so the local stack and
# `cardctl demo` can be tried at once. Production never creates them.
DEV_STAFF: dict[str, tuple[Role, str]] = {
    "dev-reviewer": (Role.REVIEWER, "dev-console-reviewer"),
    "dev-counter": (Role.COUNTER, "dev-console-counter"),
    "dev-auditor": (Role.AUDITOR, "dev-console-auditor"),
    "dev-admin": (Role.ADMIN, "dev-console-admin"),
}


def now() -> datetime:
    return datetime.now(UTC)


def staff_directory(pool: asyncpg.Pool, settings: ConsoleSettings) -> StaffDirectory:
    return StaffDirectory(
        pool, settings.console_schema,
        LockoutPolicy(settings.console_lockout_attempts,
                      timedelta(minutes=settings.console_lockout_minutes)),
        idle=timedelta(minutes=settings.console_session_idle_minutes),
        max_age=timedelta(hours=settings.console_session_max_hours))


class ConsoleService:
    def __init__(self, settings: ConsoleSettings) -> None:
        if settings.env == "production" and not settings.console_cookie_secure:
            raise ValueError("CARDDESK_CONSOLE_COOKIE_SECURE=false is refused in production")
        channel = ChannelRegistry.from_file(settings.channels_file).get(settings.console_channel)
        if channel is None or not channel.bureau:
            raise ValueError(f"the console's channel {settings.console_channel!r} is not a "
                             "bureau channel of the channels file")
        self.settings = settings
        schema = settings.console_schema
        # Its group is the one it consumes in, so its dead letters name that group.
        self.runtime = ServiceRuntime("console", settings, schema=schema,
                                      group=settings.console_consumer_group,
                                      extra_ddl=queue_ddl(schema) + staff_ddl(schema))
        self.writer = QueueWriter(schema)
        self.consumer: EventConsumer | None = None
        self.channel = ConsoleChannel(settings, channel,
                                      reply_timeout_s=settings.console_reply_timeout_seconds)
        self.status = StatusReader(settings.status_url(), channel.api_key)
        self._staff: StaffDirectory | None = None
        self._queue: QueueReader | None = None
        self.runtime.on_ready(self._build)
        self.runtime.background(self._purge_sessions)
        self.runtime.background(self._purge_bookkeeping)
        self.runtime.subscribe(settings.review_events_topic(), self._handler,
                               title=f"{settings.review_events_topic()}:console",
                               description="Projects review.events into the review queue")
        self.console = Console(
            settings=settings, staff=self.staff, queue=self.queue, channel=lambda: self.channel,
            status=lambda: self.status,
            audits=AuditRunner(settings, settings.status_schema, now), clock=now,
            database_answers=self._database_answers)
        # Every step of stopping bounded, as the other services' (shared.runtime.stop_step).
        self.app: Starlette = create_app(self.console, lifespan=runtime_lifespan(
            self.runtime, started=self.channel.start,
            stopping=[("console channel", self.channel.stop),
                      ("status client", self.status.close)]))

    def staff(self) -> StaffDirectory:
        assert self._staff is not None, "the console has not started"
        return self._staff

    def queue(self) -> QueueReader:
        assert self._queue is not None, "the console has not started"
        return self._queue

    def _handler(self) -> BatchConsumer:
        assert self.consumer is not None, "the console has not started"
        return self.consumer

    async def _build(self) -> None:
        pool = self.runtime.pool
        self.consumer = EventConsumer(
            pool, self.settings.console_schema, self.settings.console_consumer_group,
            self.writer.handler(), self.runtime.dead_letters,
            known_types=KNOWN_EVENT_TYPES["review.events"],
            settings=self.settings, batch_handler=self.writer.batch_handler())
        self._staff = staff_directory(pool, self.settings)
        self._queue = QueueReader(pool, self.settings.console_schema)
        if self.settings.env == "development":
            for staff_id, (role, password) in DEV_STAFF.items():
                if await self._staff.ensure(staff_id, role, password, now()):
                    log.info("console.dev_staff_added", staff_id=staff_id, role=role.value)

    async def _database_answers(self) -> bool:
        try:
            value = await asyncio.wait_for(self.runtime.pool.fetchval("SELECT 1"), 3)
        except (AssertionError, TimeoutError, OSError, asyncpg.PostgresError,
                asyncpg.InterfaceError):
            return False
        return bool(value == 1)

    async def _purge_bookkeeping(self) -> None:
        await purge_bookkeeping_loop(self.runtime.pool, self.settings.console_schema,
                                     self.settings)

    async def _purge_sessions(self) -> None:
        while True:
            await self.staff().purge_expired(now())
            await asyncio.sleep(300)

    async def serve(self) -> None:
        await serve(self.app, self.settings.http_host, self.settings.console_port,
                    access_log=False)


def build(settings: ConsoleSettings | None = None) -> ConsoleService:
    return ConsoleService(settings or ConsoleSettings())


def main() -> None:
    service = build()
    configure_logging("console", service.settings.log_level)
    service.runtime.claim_process()  # a console stuck unhealthy exits for its supervisor
    uvloop.run(service.serve())


if __name__ == "__main__":
    main()
