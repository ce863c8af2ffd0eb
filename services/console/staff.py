"""Staff accounts, roles, sign-in with lockout, and server-side sessions (console schema).

Passwords are Argon2id hashes (argon2-cffi), computed one at a time (`PasswordWork`); a
session is a random token in an HttpOnly cookie, kept here only as its SHA-256, with its own
CSRF token.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal, TypeVar

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

STAFF_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 256
# How long a sign-in waits for its turn at the password hasher before it is refused as busy.
PASSWORD_WAIT_S = 5.0
# Argon2id's cost: OWASP's first recommended setting (Password Storage Cheat Sheet: 19 MiB,
# 2 passes, 1 lane). argon2-cffi's default (RFC 9106's low-memory profile: 64 MiB, 3 passes,
# 4 lanes) held 64 MiB for each hash, which took the console from 82 MB at rest to a peak of
# 145-148 MB, within 5 MB of issue 12's 150 MB bound (README, Performance).
PASSWORD_MEMORY_KIB = 19 * 1024
PASSWORD_TIME_COST = 2
PASSWORD_PARALLELISM = 1


def password_hasher() -> PasswordHasher:
    """Argon2id at the console's cost; a hash stored at another cost still verifies, and is
    made again at this one on its next good sign-in (`StaffDirectory.sign_in`)."""
    return PasswordHasher(time_cost=PASSWORD_TIME_COST, memory_cost=PASSWORD_MEMORY_KIB,
                          parallelism=PASSWORD_PARALLELISM)

T = TypeVar("T")


class Role(StrEnum):
    REVIEWER = "reviewer"
    COUNTER = "counter"
    AUDITOR = "auditor"
    ADMIN = "admin"


class Area(StrEnum):
    """A part of the console; each role may use some of them."""

    REVIEW = "review"
    COUNTER = "counter"
    AUDIT = "audit"
    LOOKUP = "lookup"


AREAS: dict[Role, frozenset[Area]] = {
    Role.REVIEWER: frozenset({Area.REVIEW, Area.LOOKUP}),
    Role.COUNTER: frozenset({Area.COUNTER, Area.LOOKUP}),
    Role.AUDITOR: frozenset({Area.AUDIT, Area.LOOKUP}),
    Role.ADMIN: frozenset(Area),
}


def may_use(role: Role, area: Area) -> bool:
    return area in AREAS[role]


class StaffError(ValueError):
    """A staff account operation that cannot be done (bad id, weak password, unknown id)."""


@dataclass(frozen=True)
class LockoutPolicy:
    attempts: int
    duration: timedelta


@dataclass(frozen=True)
class Attempts:
    """An account's failure count and lock, as stored."""

    failed: int
    locked_until: datetime | None


def is_locked(attempts: Attempts, now: datetime) -> bool:
    return attempts.locked_until is not None and now < attempts.locked_until


def after_failure(attempts: Attempts, now: datetime, policy: LockoutPolicy) -> Attempts:
    """One more wrong password: the count grows, and reaching the limit locks the account
    (the count starts again once the lock is over)."""
    failed = 1 if attempts.locked_until is not None and not is_locked(attempts, now) \
        else attempts.failed + 1
    if failed >= policy.attempts:
        return Attempts(0, now + policy.duration)
    return Attempts(failed, None)


@dataclass(frozen=True)
class StaffMember:
    staff_id: str
    role: Role
    disabled: bool
    created_at: datetime


@dataclass(frozen=True)
class StaffSession:
    staff_id: str
    role: Role
    csrf_token: str
    created_at: datetime


SignInOutcome = Literal["ok", "invalid", "locked", "busy"]


@dataclass(frozen=True)
class SignIn:
    outcome: SignInOutcome
    session_token: str | None = None
    session: StaffSession | None = None


def staff_ddl(schema: str) -> str:
    return f"""
    CREATE SCHEMA IF NOT EXISTS {schema};
    CREATE TABLE IF NOT EXISTS {schema}.staff (
        staff_id        text PRIMARY KEY,
        role            text        NOT NULL,
        password_hash   text        NOT NULL,
        disabled        boolean     NOT NULL DEFAULT false,
        failed_attempts integer     NOT NULL DEFAULT 0,
        locked_until    timestamptz,
        created_at      timestamptz NOT NULL
    );
    CREATE TABLE IF NOT EXISTS {schema}.staff_sessions (
        token_hash   text PRIMARY KEY,
        staff_id     text        NOT NULL REFERENCES {schema}.staff (staff_id),
        csrf_token   text        NOT NULL,
        created_at   timestamptz NOT NULL,
        last_seen_at timestamptz NOT NULL
    );
    CREATE INDEX IF NOT EXISTS staff_sessions_of ON {schema}.staff_sessions (staff_id);
    """


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_staff_id(staff_id: str) -> str:
    if not STAFF_ID.fullmatch(staff_id):
        raise StaffError("a staff id is 2-64 characters: a-z, 0-9, '.', '_', '-'")
    return staff_id


def check_password(password: str) -> str:
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise StaffError(f"a password has {MIN_PASSWORD_LENGTH}-{MAX_PASSWORD_LENGTH} characters")
    return password


class PasswordWorkBusyError(Exception):
    """No turn at the password hasher within the wait."""


class PasswordWork:
    """Argon2id hashing and verification, one at a time, each wait for a turn bounded.

    One hash holds its memory cost while it runs (`PASSWORD_MEMORY_KIB`; 64 MiB at
    argon2-cffi's default). Sign-in attempts come before any authentication: at that default,
    run side by side in asyncio's thread pool (six threads on two cores), twelve took the
    console's memory to 467 MB. One at a time it stays within one hash's worth, and a flood
    waits its turn instead, for at most `wait_s`, then is refused."""

    def __init__(self, hasher: PasswordHasher, wait_s: float = PASSWORD_WAIT_S) -> None:
        self.hasher = hasher
        self.wait_s = wait_s
        self._lock = asyncio.Lock()

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold the hasher; `PasswordWorkBusyError` when it is not free within `wait_s`."""
        try:
            async with asyncio.timeout(self.wait_s):
                await self._lock.acquire()
        except TimeoutError:
            raise PasswordWorkBusyError() from None
        try:
            yield
        finally:
            self._lock.release()

    async def run(self, work: Callable[..., T], *args: str) -> T:
        """`work(*args)` off the event loop; the caller holds the turn."""
        assert self._lock.locked(), "password work runs only in its turn"
        return await asyncio.to_thread(work, *args)

    async def hash(self, password: str) -> str:
        async with self.turn():
            return await self.run(self.hasher.hash, password)


class StaffDirectory:
    """Accounts and sessions in the console's schema."""

    def __init__(self, pool: asyncpg.Pool, schema: str, policy: LockoutPolicy, *,
                 idle: timedelta, max_age: timedelta,
                 hasher: PasswordHasher | None = None) -> None:
        self.pool = pool
        self.schema = schema
        self.policy = policy
        self.idle = idle
        self.max_age = max_age
        self.hasher = hasher or password_hasher()
        self.passwords = PasswordWork(self.hasher)
        # Verified against when the id is unknown, so timing does not tell which ids exist.
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))

    async def migrate(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.schema)
            await conn.execute(staff_ddl(self.schema))

    async def add(self, staff_id: str, role: Role, password: str, now: datetime) -> None:
        check_staff_id(staff_id)
        digest = await self.passwords.hash(check_password(password))
        inserted = await self.pool.fetchval(
            f"INSERT INTO {self.schema}.staff (staff_id, role, password_hash, created_at)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (staff_id) DO NOTHING RETURNING staff_id",
            staff_id, role.value, digest, now)
        if inserted is None:
            raise StaffError(f"staff id {staff_id!r} exists already")

    async def ensure(self, staff_id: str, role: Role, password: str, now: datetime) -> bool:
        """Add the account unless it exists; whether it was added."""
        try:
            await self.add(staff_id, role, password, now)
        except StaffError:
            return False
        return True

    async def disable(self, staff_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                f"UPDATE {self.schema}.staff SET disabled = true WHERE staff_id = $1"
                " RETURNING staff_id", staff_id)
            if found is None:
                raise StaffError(f"no staff id {staff_id!r}")
            await conn.execute(f"DELETE FROM {self.schema}.staff_sessions WHERE staff_id = $1",
                               staff_id)

    async def members(self) -> list[StaffMember]:
        rows = await self.pool.fetch(
            f"SELECT staff_id, role, disabled, created_at FROM {self.schema}.staff"
            " ORDER BY staff_id")
        return [StaffMember(r["staff_id"], Role(r["role"]), r["disabled"], r["created_at"])
                for r in rows]

    async def sign_in(self, staff_id: str, password: str, now: datetime) -> SignIn:
        """Check the password; a locked, disabled or unknown account fails alike to the
        caller except for `locked`, which staff must be told to wait out, and `busy`: the
        hasher was not free in time. The turn is taken before a connection, so that a flood
        of attempts waits without holding the pool."""
        password = password[:MAX_PASSWORD_LENGTH]
        try:
            async with self.passwords.turn():
                return await self._sign_in(staff_id, password, now)
        except PasswordWorkBusyError:
            return SignIn("busy")

    async def _sign_in(self, staff_id: str, password: str, now: datetime) -> SignIn:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT * FROM {self.schema}.staff WHERE staff_id = $1 FOR UPDATE", staff_id)
            if row is None:
                await self.passwords.run(self._verify, self._dummy_hash, password)
                return SignIn("invalid")
            attempts = Attempts(row["failed_attempts"], row["locked_until"])
            if is_locked(attempts, now):
                return SignIn("locked")
            good = await self.passwords.run(self._verify, row["password_hash"], password)
            if not good or row["disabled"]:
                attempts = after_failure(attempts, now, self.policy) if not row["disabled"] \
                    else attempts
                await conn.execute(
                    f"UPDATE {self.schema}.staff SET failed_attempts = $2, locked_until = $3"
                    " WHERE staff_id = $1", staff_id, attempts.failed, attempts.locked_until)
                return SignIn("locked" if is_locked(attempts, now) else "invalid")
            # A hash stored at another cost is made again at this one, in the same turn.
            rehashed = (await self.passwords.run(self.hasher.hash, password)
                        if self.hasher.check_needs_rehash(row["password_hash"]) else None)
            await conn.execute(
                f"UPDATE {self.schema}.staff SET failed_attempts = 0, locked_until = NULL,"
                " password_hash = coalesce($2, password_hash) WHERE staff_id = $1",
                staff_id, rehashed)
            token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
            await conn.execute(
                f"INSERT INTO {self.schema}.staff_sessions"
                " (token_hash, staff_id, csrf_token, created_at, last_seen_at)"
                " VALUES ($1, $2, $3, $4, $4)", _token_hash(token), staff_id, csrf, now)
            return SignIn("ok", token, StaffSession(staff_id, Role(row["role"]), csrf, now))

    def _verify(self, digest: str, password: str) -> bool:
        try:
            return self.hasher.verify(digest, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def session(self, token: str, now: datetime) -> StaffSession | None:
        """The live session of a cookie's token (touched), or None: unknown, idle too long,
        too old, or its account disabled."""
        if not token or len(token) > 128:
            return None
        row = await self.pool.fetchrow(
            f"UPDATE {self.schema}.staff_sessions AS s SET last_seen_at = $2"
            f" FROM {self.schema}.staff AS a"
            " WHERE s.token_hash = $1 AND a.staff_id = s.staff_id AND NOT a.disabled"
            " AND s.last_seen_at > $3 AND s.created_at > $4"
            " RETURNING s.staff_id, a.role, s.csrf_token, s.created_at",
            _token_hash(token), now, now - self.idle, now - self.max_age)
        if row is None:
            return None
        return StaffSession(row["staff_id"], Role(row["role"]), row["csrf_token"],
                            row["created_at"])

    async def sign_out(self, token: str) -> None:
        await self.pool.execute(
            f"DELETE FROM {self.schema}.staff_sessions WHERE token_hash = $1", _token_hash(token))

    async def purge_expired(self, now: datetime) -> int:
        result: str = await self.pool.execute(
            f"DELETE FROM {self.schema}.staff_sessions"
            " WHERE last_seen_at <= $1 OR created_at <= $2", now - self.idle, now - self.max_age)
        return int(result.split()[-1])
