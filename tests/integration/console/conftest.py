"""The console's pages in-process (httpx over ASGI) on the real PostgreSQL, in a throwaway
schema, with a recording fake of its channel and of the status API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from services.console.audits import AuditRunner
from services.console.channel import ReplyTimeoutError
from services.console.main import staff_directory
from services.console.queue import QueueReader, queue_ddl
from services.console.settings import ConsoleSettings
from services.console.staff import Role, StaffDirectory
from services.console.web import Console, create_app
from shared.commands import Reply
from tests.support import unique

PASSWORD = "correct horse battery"


@dataclass
class FakeChannel:
    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    code: str = "accepted"

    async def send_until_decided(self, service: str, command_type: str,
                                 payload: Mapping[str, Any], *, issued_at: datetime,
                                 attempts: int = 5) -> Reply:
        self.sent.append((service, command_type, dict(payload)))
        if self.code == "timeout":
            raise ReplyTimeoutError("r-1")
        status = "accepted" if self.code == "accepted" else "rejected"
        return Reply(request_id="r-1", status=status, code=self.code, message=self.code,
                     data={})


@dataclass
class FakeStatus:
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def card(self, citizen_ref: str) -> dict[str, Any] | None:
        return self.cards.get(citizen_ref)

    async def timeline(self, citizen_ref: str) -> list[dict[str, Any]]:
        return []


@dataclass
class Clock:
    at: datetime = field(default_factory=lambda: datetime(2026, 1, 5, 9, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.at

    def advance(self, **delta: float) -> None:
        self.at += timedelta(**delta)


@dataclass
class Desk:
    """The console under test and what it did."""

    http: httpx.AsyncClient
    staff: StaffDirectory
    channel: FakeChannel
    status: FakeStatus
    clock: Clock
    pool: asyncpg.Pool
    schema: str

    async def add(self, role: Role, staff_id: str | None = None) -> str:
        staff_id = staff_id or unique(role.value).replace("_", "-")
        await self.staff.add(staff_id, role, PASSWORD, self.clock())
        return staff_id

    async def sign_in_form(self) -> str:
        page = await self.http.get("/sign-in")
        assert page.status_code == 200
        return csrf_of(page.text)

    async def sign_in(self, staff_id: str, password: str = PASSWORD,
                      headers: Mapping[str, str] | None = None) -> httpx.Response:
        token = await self.sign_in_form()
        return await self.http.post("/sign-in", headers=headers, data={
            "csrf_token": token, "staff_id": staff_id, "password": password})

    async def signed_in(self, role: Role) -> tuple[str, str]:
        """A new account of `role`, signed in; (staff id, the session's CSRF token)."""
        staff_id = await self.add(role)
        response = await self.sign_in(staff_id)
        assert response.status_code == 303, response.text
        page = await self.http.get("/lookup")
        assert page.status_code == 200
        return staff_id, csrf_of(page.text)


def csrf_of(page: str) -> str:
    marker = 'name="csrf_token" value="'
    start = page.index(marker) + len(marker)
    return page[start:page.index('"', start)]


@pytest.fixture
async def desk(stack: object, request: pytest.FixtureRequest) -> AsyncIterator[Desk]:
    """The console with a lockout after three wrong passwords, and any other settings a test
    gives as its indirect parameter."""
    overrides: dict[str, Any] = getattr(request, "param", {})
    settings = ConsoleSettings(console_schema=unique("console"), console_lockout_attempts=3,
                               **overrides)
    schema = settings.console_schema
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=4)
    clock = Clock()
    staff = staff_directory(pool, settings)
    await staff.migrate()
    await pool.execute(queue_ddl(schema))
    channel, status = FakeChannel(), FakeStatus()
    console = Console(settings=settings, staff=lambda: staff,
                      queue=lambda: QueueReader(pool, schema), channel=lambda: channel,
                      status=lambda: status, audits=AuditRunner(settings, "status", clock),
                      clock=clock, database_answers=_yes)
    transport = httpx.ASGITransport(app=create_app(console))
    async with httpx.AsyncClient(transport=transport, base_url="https://console.test") as http:
        yield Desk(http, staff, channel, status, clock, pool, schema)
    await pool.execute(f"DROP SCHEMA {schema} CASCADE")
    await pool.close()


async def _yes() -> bool:
    return True
