"""Auth's commands in a batch read their citizens once: their streams in one statement and
their registry entries in one more (`AuthHandlers.prepare`), instead of a read per command;
a citizen erased within the batch has their entry read afresh. A login's own reads, its
captcha and its failures, go in one round trip."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from services.auth.adapters import enroll, postgres_registry
from services.auth.handlers import AuthHandlers
from services.auth.settings import AuthSettings
from shared.channels import Channel
from shared.commands import CommandContext
from shared.contracts.auth import IssueCaptcha, StartSession, VerifyPortrait
from shared.contracts.common import EraseSubject
from shared.crypto import DataKeyDestroyedError
from shared.identity import citizen_ref
from shared.intake.prepare import preparing
from shared.service import Kit
from tests.integration.auth.citizens import Citizen, new_citizen
from tests.support import statements_sent

pytestmark = pytest.mark.integration

CHANNEL = Channel(channel_id="wechat-oa", secret="not-used-here", bureau=True)


def context() -> CommandContext:
    now = datetime.now(UTC)
    return CommandContext(str(uuid.uuid4()), CHANNEL, now, now)


async def enrolled(pool: asyncpg.Pool, settings: AuthSettings, schema: str,
                   count: int) -> list[Citizen]:
    people = [new_citizen() for _ in range(count)]
    async with pool.acquire() as conn:
        for person in people:
            await enroll(conn, person.id_number, person.name, person.face, settings,
                         schema=schema)
    return people


async def test_a_batch_of_logins_and_portraits_reads_each_citizens_entry_once_for_all(
    pool: asyncpg.Pool, kit: Kit[AuthSettings], auth_settings: AuthSettings, auth_schema: str,
) -> None:
    handlers = AuthHandlers(kit)
    people = await enrolled(pool, auth_settings, auth_schema, 3)
    pepper = auth_settings.citizen_ref_pepper.get_secret_value()
    refs = [citizen_ref(pepper, person.id_number) for person in people]
    async with pool.acquire() as conn, conn.transaction():
        captchas = [await handlers.issue_captcha(conn, context(), IssueCaptcha())
                    for _ in people]

    async with pool.acquire() as conn, conn.transaction():
        with statements_sent(conn) as sent, preparing(conn, await handlers.prepare(conn, refs)):
            sessions = [await handlers.start_session(conn, context(), StartSession(
                id_number=person.id_number, name=person.name,
                captcha_id=issued["captcha_id"], captcha_code=issued["code"]))
                for person, issued in zip(people, captchas, strict=True)]
            upgraded = [await handlers.verify_portrait(conn, context(), VerifyPortrait(
                session_token=session["session_token"], liveness_score=0.95,  # type: ignore[index]
                face_embedding=person.face))
                for person, session in zip(people, sessions, strict=True)]

    assert [session["citizen_ref"] for session in sessions] == refs  # type: ignore[index]
    assert all(isinstance(outcome, dict) and "session_token" in outcome for outcome in upgraded)
    assert len([query for query in sent if f"{auth_schema}.registry r" in query]) == 1, sent
    assert len([query for query in sent if f"{auth_schema}.events WHERE" in query]) == 1, sent


async def test_a_citizen_erased_in_the_batch_has_their_entry_read_afresh(
    pool: asyncpg.Pool, kit: Kit[AuthSettings], auth_settings: AuthSettings, auth_schema: str,
) -> None:
    handlers = AuthHandlers(kit)
    [person] = await enrolled(pool, auth_settings, auth_schema, 1)
    ref = citizen_ref(auth_settings.citizen_ref_pepper.get_secret_value(), person.id_number)
    async with pool.acquire() as conn, conn.transaction():
        with preparing(conn, await handlers.prepare(conn, [ref])):
            registry = postgres_registry(conn, auth_settings, auth_schema)
            assert await registry.face_template(ref) is not None
            await handlers.erasure.erase(conn, context(),
                                         EraseSubject(citizen_ref=ref, reason="requested"))
            with pytest.raises(DataKeyDestroyedError):
                await postgres_registry(conn, auth_settings, auth_schema).face_template(ref)


async def test_a_login_burns_its_captcha_and_counts_its_failures_in_one_round_trip(
    pool: asyncpg.Pool, kit: Kit[AuthSettings], auth_settings: AuthSettings, auth_schema: str,
) -> None:
    handlers = AuthHandlers(kit)
    [person] = await enrolled(pool, auth_settings, auth_schema, 1)
    async with pool.acquire() as conn, conn.transaction():
        issued = await handlers.issue_captcha(conn, context(), IssueCaptcha())
        with statements_sent(conn) as sent:
            session = await handlers.start_session(conn, context(), StartSession(
                id_number=person.id_number, name=person.name,
                captcha_id=issued["captcha_id"], captcha_code=issued["code"]))
        used = await conn.fetchval(f"SELECT used_at FROM {auth_schema}.captchas"
                                   " WHERE captcha_id = $1", issued["captcha_id"])

    assert isinstance(session, dict) and "session_token" in session
    assert used is not None
    [read] = [query for query in sent if ".captchas" in query or ".login_failures" in query]
    assert ".captchas" in read and ".login_failures" in read
