"""Auth handlers on the real PostgreSQL, with the clock in the test's hands: captcha rules,
login, the electronic card and the portrait lockout over time."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from services.auth.adapters import enroll
from services.auth.domain import stream_id
from services.auth.handlers import AuthHandlers
from services.auth.settings import AuthSettings
from shared.channels import Channel
from shared.commands import CommandContext, Refusal
from shared.contracts.auth import (
    AuthorizeElectronicCard,
    IssueCaptcha,
    StartSession,
    VerifyPortrait,
)
from shared.errors import DomainError
from shared.identity import citizen_ref
from shared.service import Kit
from shared.tokens import TokenVerifier
from tests.integration.auth.citizens import (
    Citizen,
    new_citizen,
    random_face,
    with_wrong_check_char,
)

pytestmark = pytest.mark.integration

CHANNEL = Channel(channel_id="wechat-oa", secret="not-used-here")
Outcome = dict[str, Any] | Refusal | None


@pytest.fixture
def handlers(kit: Kit[AuthSettings]) -> AuthHandlers:
    return AuthHandlers(kit)


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
async def citizen(pool: asyncpg.Pool, auth_settings: AuthSettings, auth_schema: str) -> Citizen:
    person = new_citizen()
    async with pool.acquire() as conn:
        await enroll(conn, person.id_number, person.name, person.face, auth_settings,
                     schema=auth_schema)
    return person


async def run(pool: asyncpg.Pool, handler: Callable[..., Awaitable[Outcome]], command: Any,
              at: datetime, *, channel: Channel = CHANNEL) -> Outcome:
    """As the command intake runs a handler: a transaction, a savepoint, errors as refusals."""
    context = CommandContext(str(uuid.uuid4()), channel, at, at)
    async with pool.acquire() as conn, conn.transaction():
        try:
            async with conn.transaction():
                return await handler(conn, context, command)
        except DomainError as exc:
            return Refusal(exc.code, exc.message)


def accepted(outcome: Outcome) -> dict[str, Any]:
    assert isinstance(outcome, dict), outcome
    return outcome


def refused_with(outcome: Outcome) -> str:
    assert isinstance(outcome, Refusal), outcome
    return outcome.code


async def captcha(pool: asyncpg.Pool, handlers: AuthHandlers, at: datetime) -> dict[str, Any]:
    return accepted(await run(pool, handlers.issue_captcha, IssueCaptcha(), at))


async def login(pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, at: datetime,
                *, name: str | None = None, id_number: str | None = None,
                issued: dict[str, Any] | None = None, code: str | None = None,
                channel: Channel = CHANNEL) -> Outcome:
    issued = issued or await captcha(pool, handlers, at)
    return await run(pool, handlers.start_session, StartSession(
        id_number=id_number or citizen.id_number, name=name or citizen.name,
        captcha_id=issued["captcha_id"], captcha_code=code or issued["code"]), at,
        channel=channel)


async def stream_types(pool: asyncpg.Pool, schema: str, ref: str) -> list[str]:
    rows = await pool.fetch(
        f"SELECT type FROM {schema}.events WHERE stream_id = $1 ORDER BY version", stream_id(ref))
    return [r["type"] for r in rows]


# --- captchas ----------------------------------------------------------------------------


async def test_a_captcha_has_the_configured_length_and_only_its_digest_is_stored(
    pool: asyncpg.Pool, handlers: AuthHandlers, auth_settings: AuthSettings, now: datetime,
    auth_schema: str
) -> None:
    issued = await captcha(pool, handlers, now)
    assert len(issued["code"]) == auth_settings.captcha_code_length
    assert issued["code"].isdigit()
    row = await pool.fetchrow(f"SELECT * FROM {auth_schema}.captchas WHERE captcha_id = $1",
                              issued["captcha_id"])
    assert row is not None
    assert issued["code"] not in row["code_digest"]
    assert row["expires_at"] == now + auth_settings.captcha_ttl
    assert row["used_at"] is None


async def test_a_captcha_works_only_once(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime
) -> None:
    issued = await captcha(pool, handlers, now)
    accepted(await login(pool, handlers, citizen, now, issued=issued))
    assert refused_with(await login(pool, handlers, citizen, now, issued=issued)) == "captcha_used"


async def test_a_wrong_code_is_a_mismatch_and_burns_the_captcha(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime
) -> None:
    issued = await captcha(pool, handlers, now)
    wrong = issued["code"][:-1] + str((int(issued["code"][-1]) + 1) % 10)
    outcome = await login(pool, handlers, citizen, now, issued=issued, code=wrong)
    assert refused_with(outcome) == "captcha_mismatch"
    outcome = await login(pool, handlers, citizen, now, issued=issued)
    assert refused_with(outcome) == "captcha_used"


async def test_an_unknown_captcha_is_a_mismatch(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime
) -> None:
    outcome = await login(pool, handlers, citizen, now,
                          issued={"captcha_id": str(uuid.uuid4()), "code": "123456"})
    assert refused_with(outcome) == "captcha_mismatch"


async def test_an_expired_captcha_is_refused(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, auth_settings: AuthSettings,
    now: datetime
) -> None:
    issued = await captcha(pool, handlers, now)
    later = now + auth_settings.captcha_ttl + timedelta(seconds=1)
    assert refused_with(await login(pool, handlers, citizen, later, issued=issued)) \
        == "captcha_expired"


# --- login --------------------------------------------------------------------------------


async def test_a_login_starts_a_realname_session_with_a_verifiable_token(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, auth_settings: AuthSettings,
    now: datetime, auth_schema: str
) -> None:
    data = accepted(await login(pool, handlers, citizen, now))
    claims = TokenVerifier.from_settings(auth_settings).verify(
        data["session_token"], now=now, channel=CHANNEL.channel_id)
    assert claims.citizen_ref == data["citizen_ref"]
    assert claims.level == "realname"
    assert claims.expires_at == now + auth_settings.session_ttl
    assert datetime.fromisoformat(data["expires_at"]) == claims.expires_at
    assert await stream_types(pool, auth_schema, claims.citizen_ref) \
        == ["SessionStarted", "IdentityVerified"]


async def test_a_lower_case_x_check_character_logs_in_the_same_citizen(
    pool: asyncpg.Pool, handlers: AuthHandlers, auth_settings: AuthSettings, now: datetime,
    auth_schema: str
) -> None:
    person = new_citizen()
    while person.id_number[-1] != "X":
        person = new_citizen()
    async with pool.acquire() as conn:
        ref = await enroll(conn, person.id_number, person.name, person.face, auth_settings,
                           schema=auth_schema)
    data = accepted(await login(pool, handlers, person, now, id_number=person.id_number.lower()))
    assert data["citizen_ref"] == ref


async def test_a_bad_checksum_is_refused_as_an_invalid_id_number(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime
) -> None:
    outcome = await login(pool, handlers, citizen, now,
                          id_number=with_wrong_check_char(citizen.id_number))
    assert refused_with(outcome) == "invalid_id_number"


async def test_a_wrong_name_and_an_unknown_citizen_get_the_same_refusal(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime
) -> None:
    wrong_name = await login(pool, handlers, citizen, now, name=citizen.name + "甲")
    stranger = await login(pool, handlers, new_citizen(), now)
    assert isinstance(wrong_name, Refusal)
    assert wrong_name == stranger
    assert wrong_name.code == "identity_mismatch"


# --- electronic card ----------------------------------------------------------------------


async def test_a_session_authorises_the_electronic_card(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime,
    auth_schema: str
) -> None:
    data = accepted(await login(pool, handlers, citizen, now))
    outcome = await run(pool, handlers.authorize_electronic_card,
                        AuthorizeElectronicCard(session_token=data["session_token"]), now)
    assert outcome is None
    assert (await stream_types(pool, auth_schema, data["citizen_ref"]))[-1] \
        == "ElectronicCardAuthorized"


async def test_a_forged_or_expired_token_authorises_nothing(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, auth_settings: AuthSettings,
    now: datetime, auth_schema: str
) -> None:
    data = accepted(await login(pool, handlers, citizen, now))
    token = data["session_token"]
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert refused_with(await run(pool, handlers.authorize_electronic_card,
                                  AuthorizeElectronicCard(session_token=forged), now)) \
        == "invalid_session"
    later = now + auth_settings.session_ttl
    assert refused_with(await run(pool, handlers.authorize_electronic_card,
                                  AuthorizeElectronicCard(session_token=token), later)) \
        == "session_expired"
    assert await stream_types(pool, auth_schema, data["citizen_ref"]) \
        == ["SessionStarted", "IdentityVerified"]


# --- portrait -----------------------------------------------------------------------------


def portrait(token: str, face: list[float], liveness: float = 0.95) -> VerifyPortrait:
    return VerifyPortrait(session_token=token, liveness_score=liveness, face_embedding=face)


async def test_the_right_face_upgrades_the_token_and_no_embedding_is_kept(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, auth_settings: AuthSettings,
    now: datetime, auth_schema: str
) -> None:
    data = accepted(await login(pool, handlers, citizen, now))
    later = now + timedelta(minutes=1)
    upgraded = accepted(await run(pool, handlers.verify_portrait,
                                  portrait(data["session_token"], citizen.face), later))
    claims = TokenVerifier.from_settings(auth_settings).verify(
        upgraded["session_token"], now=later, channel=CHANNEL.channel_id)
    assert claims.level == "portrait"
    assert claims.portrait_verified_at == later
    assert claims.expires_at == now + auth_settings.session_ttl
    rows = await pool.fetch(f"SELECT body FROM {auth_schema}.events WHERE stream_id = $1",
                            stream_id(data["citizen_ref"]))
    last = json.loads(rows[-1]["body"])
    assert last["type"] == "IdentityVerified"
    assert last["data"]["method"] == "portrait"
    assert last["data"]["similarity"] == pytest.approx(1.0)
    every_body = " ".join(r["body"] for r in rows)
    assert all(json.dumps(x) not in every_body for x in citizen.face[:8])


async def test_an_embedding_of_another_length_is_a_face_mismatch(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime
) -> None:
    data = accepted(await login(pool, handlers, citizen, now))
    outcome = await run(pool, handlers.verify_portrait,
                        portrait(data["session_token"], [*citizen.face, 0.0]), now)
    assert refused_with(outcome) == "face_mismatch"


async def test_low_liveness_is_refused_and_recorded(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime,
    auth_schema: str
) -> None:
    data = accepted(await login(pool, handlers, citizen, now))
    outcome = await run(pool, handlers.verify_portrait,
                        portrait(data["session_token"], citizen.face, liveness=0.2), now)
    assert refused_with(outcome) == "liveness_too_low"
    assert (await stream_types(pool, auth_schema, data["citizen_ref"]))[-1] \
        == "IdentityVerificationFailed"


async def test_three_failures_lock_the_portrait_for_the_lockout_then_it_opens_again(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, auth_settings: AuthSettings,
    now: datetime, auth_schema: str
) -> None:
    codes = []
    for minute in range(3):
        at = now + timedelta(minutes=minute)
        token = accepted(await login(pool, handlers, citizen, at))["session_token"]
        codes.append(refused_with(await run(pool, handlers.verify_portrait,
                                            portrait(token, random_face()), at)))
    assert codes == ["face_mismatch", "face_mismatch", "portrait_locked"]
    locked_at = now + timedelta(minutes=2)

    token = accepted(await login(pool, handlers, citizen, locked_at))["session_token"]
    right_face = await run(pool, handlers.verify_portrait, portrait(token, citizen.face),
                           locked_at + timedelta(minutes=1))
    assert refused_with(right_face) == "portrait_locked"

    reopened = locked_at + auth_settings.portrait_lockout
    token = accepted(await login(pool, handlers, citizen, reopened))["session_token"]
    accepted(await run(pool, handlers.verify_portrait, portrait(token, citizen.face), reopened))
    ref = accepted(await login(pool, handlers, citizen, reopened))["citizen_ref"]
    portrait_events = [t for t in await stream_types(pool, auth_schema, ref)
                       if t not in ("SessionStarted", "IdentityVerified")]
    assert portrait_events == ["IdentityVerificationFailed"] * 3 + ["IdentityLocked"]


# --- hostile spellings of an ID number or a name ------------------------------------------

FULL_WIDTH_DIGITS = str.maketrans("0123456789", "０１２３４５６７８９")


async def test_a_full_width_id_number_is_refused_though_its_checksum_holds(
    pool: asyncpg.Pool, handlers: AuthHandlers, citizen: Citizen, now: datetime
) -> None:
    full_width = citizen.id_number[:17].translate(FULL_WIDTH_DIGITS) + citizen.id_number[17]
    outcome = await login(pool, handlers, citizen, now, id_number=full_width)
    assert refused_with(outcome) == "invalid_id_number"


async def test_a_decomposed_name_logs_in_the_citizen_enrolled_with_its_composed_form(
    pool: asyncpg.Pool, handlers: AuthHandlers, auth_settings: AuthSettings, now: datetime,
    auth_schema: str
) -> None:
    person = new_citizen()
    composed = person.name + "Zoë"
    async with pool.acquire() as conn:
        ref = await enroll(conn, person.id_number, composed, person.face, auth_settings,
                           schema=auth_schema)
    decomposed = person.name + "Zoe\u0308"
    data = accepted(await login(pool, handlers, person, now, name=decomposed))
    assert data["citizen_ref"] == ref
    assert refused_with(await login(pool, handlers, person, now, name=person.name + "Zoe")) \
        == "identity_mismatch"


# --- login throttling ---------------------------------------------------------------------


Throttled = Callable[..., AuthHandlers]


@pytest.fixture
def throttled_handlers(kit: Kit[AuthSettings]) -> Throttled:
    """Handlers with login limits of the test's choosing (each call a new process)."""

    def make(*, per_citizen: int = 3, per_channel: int = 1000) -> AuthHandlers:
        settings = AuthSettings(login_max_failures_per_citizen=per_citizen,
                                login_max_failures_per_channel=per_channel,
                                login_failure_window_seconds=600)
        return AuthHandlers(replace(kit, settings=settings))

    return make


def own_channel() -> Channel:
    """A channel of the test's own, so other tests' failures do not count towards its limit."""
    return Channel(channel_id=f"test-{uuid.uuid4().hex[:8]}", secret="not-used-here")


async def test_failed_logins_for_one_id_number_are_throttled_at_the_limit_until_the_window_ends(
    pool: asyncpg.Pool, throttled_handlers: Throttled, citizen: Citizen, now: datetime,
    auth_schema: str
) -> None:
    handlers, channel = throttled_handlers(per_citizen=3), own_channel()
    wrong = [await login(pool, handlers, citizen, now, name=citizen.name + "甲", channel=channel)
             for _ in range(3)]
    assert [refused_with(o) for o in wrong] == ["identity_mismatch"] * 3
    # The right name no longer helps, from any channel, until the window has passed.
    assert refused_with(await login(pool, handlers, citizen, now, channel=channel)) \
        == "too_many_attempts"
    assert refused_with(await login(pool, handlers, citizen, now + timedelta(seconds=599),
                                    channel=own_channel())) == "too_many_attempts"
    # Another citizen on the same channel is not affected.
    other = new_citizen()
    async with pool.acquire() as conn:
        await enroll(conn, other.id_number, other.name, other.face, schema=auth_schema)
    accepted(await login(pool, handlers, other, now, channel=channel))
    # Refused attempts were not failures: the window counts from the third failure.
    accepted(await login(pool, handlers, citizen, now + timedelta(seconds=600), channel=channel))


async def test_the_counts_live_in_the_auth_schema_by_citizen_ref_and_survive_a_restart(
    pool: asyncpg.Pool, throttled_handlers: Throttled, citizen: Citizen,
    auth_settings: AuthSettings, now: datetime, auth_schema: str
) -> None:
    channel = own_channel()
    before_restart = throttled_handlers(per_citizen=2)
    for _ in range(2):
        await login(pool, before_restart, citizen, now, name=citizen.name + "甲", channel=channel)
    after_restart = throttled_handlers(per_citizen=2)  # a new process: nothing in memory
    assert refused_with(await login(pool, after_restart, citizen, now, channel=channel)) \
        == "too_many_attempts"
    rows = await pool.fetch(f"SELECT scope, subject FROM {auth_schema}.login_failures"
                            " WHERE subject = ANY($1::text[])",
                            [citizen_ref_of(citizen, auth_settings), channel.channel_id])
    assert sorted((r["scope"], r["subject"]) for r in rows) == sorted(
        [("citizen", citizen_ref_of(citizen, auth_settings))] * 2
        + [("channel", channel.channel_id)] * 2)
    dump = str(await pool.fetch(f"SELECT * FROM {auth_schema}.login_failures"))
    assert citizen.id_number not in dump and citizen.id_number[:17] not in dump


async def test_a_successful_login_forgives_the_citizens_earlier_failures(
    pool: asyncpg.Pool, throttled_handlers: Throttled, citizen: Citizen, now: datetime
) -> None:
    handlers, channel = throttled_handlers(per_citizen=3), own_channel()
    for _ in range(2):
        await login(pool, handlers, citizen, now, name=citizen.name + "甲", channel=channel)
    accepted(await login(pool, handlers, citizen, now, channel=channel))
    for _ in range(2):
        await login(pool, handlers, citizen, now, name=citizen.name + "甲", channel=channel)
    accepted(await login(pool, handlers, citizen, now, channel=channel))


async def test_failed_logins_on_one_channel_are_throttled_for_that_channel_only(
    pool: asyncpg.Pool, throttled_handlers: Throttled, citizen: Citizen, now: datetime
) -> None:
    handlers, noisy, quiet = throttled_handlers(per_channel=4), own_channel(), own_channel()
    # Malformed ID numbers name no citizen but still count against the channel, as do
    # wrong codes.
    for _ in range(3):
        assert refused_with(await login(
            pool, handlers, citizen, now, channel=noisy,
            id_number=with_wrong_check_char(citizen.id_number))) == "invalid_id_number"
    assert refused_with(await login(pool, handlers, new_citizen(), now, channel=noisy,
                                    code="x")) == "captcha_mismatch"
    assert refused_with(await login(pool, handlers, citizen, now, channel=noisy)) \
        == "too_many_attempts"
    accepted(await login(pool, handlers, citizen, now, channel=quiet))
    accepted(await login(pool, handlers, citizen, now + timedelta(seconds=600), channel=noisy))


def citizen_ref_of(citizen: Citizen, settings: AuthSettings) -> str:
    return citizen_ref(settings.citizen_ref_pepper.get_secret_value(), citizen.id_number)


# --- the purge loop ------------------------------------------------------------------------


async def test_the_purge_forgets_expired_captchas_and_failures_outside_the_window_only(
    pool: asyncpg.Pool, kit: Kit[AuthSettings], citizen: Citizen, now: datetime,
    auth_schema: str
) -> None:
    settings = AuthSettings(captcha_ttl_seconds=60, login_failure_window_seconds=600)
    later = now + settings.login_failure_window + timedelta(seconds=1)
    handlers = AuthHandlers(replace(kit, settings=settings, clock=lambda: later))
    channel = own_channel()
    expired = await captcha(pool, handlers, now)
    await login(pool, handlers, citizen, now, name=citizen.name + "甲", channel=channel)
    current = await captcha(pool, handlers, later)
    await login(pool, handlers, citizen, later, name=citizen.name + "甲", channel=channel)

    purged, forgotten = await handlers.purge(pool)

    assert purged >= 2 and forgotten >= 2  # this test's; other tests' leftovers may go too
    kept = await pool.fetch(
        f"SELECT captcha_id FROM {auth_schema}.captchas WHERE captcha_id = ANY($1::text[])",
        [expired["captcha_id"], current["captcha_id"]])
    assert [r["captcha_id"] for r in kept] == [current["captcha_id"]]
    failed_at = await pool.fetch(
        f"SELECT failed_at FROM {auth_schema}.login_failures WHERE subject = $1",
        channel.channel_id)
    assert [r["failed_at"] for r in failed_at] == [later]
