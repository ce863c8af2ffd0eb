"""Auth's own tables besides the event store: captchas, failed logins and the population
registry adapter."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import string
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import asyncpg

from services.auth.domain import CaptchaRecord, LoginFailures, require_valid_id_number
from services.auth.settings import AuthSettings
from shared.crypto import KEY_COLUMNS, MasterKeys, Vault, data_keys_ddl
from shared.identity import citizen_ref, name_digest, normalise_name
from shared.intake.prepare import prepared

# The service's own schema; a test runs the service in one of its own.
SCHEMA = "auth"


def registry_ddl(schema: str) -> str:
    return f"""
    CREATE SCHEMA IF NOT EXISTS {schema};
    {data_keys_ddl(schema)}
    CREATE TABLE IF NOT EXISTS {schema}.registry (
        citizen_ref       text        PRIMARY KEY,
        name_digest       text        NOT NULL,
        name_enc          text        NOT NULL,
        face_template_enc text        NOT NULL,
        enrolled_at       timestamptz NOT NULL DEFAULT now()
    );
    """


def auth_ddl(schema: str) -> str:
    """What `ServiceRuntime` runs after the event store's tables: the registry, captchas
    and failed logins."""
    return registry_ddl(schema) + f"""
    CREATE TABLE IF NOT EXISTS {schema}.captchas (
        captcha_id  text        PRIMARY KEY,
        code_digest text        NOT NULL,
        expires_at  timestamptz NOT NULL,
        used_at     timestamptz
    );
    CREATE INDEX IF NOT EXISTS captchas_expires_at ON {schema}.captchas (expires_at);

    -- One row per failed login and per scope: the citizen (by citizen_ref, never the ID
    -- number) and the channel. Rows older than the window count for nothing and are purged.
    CREATE TABLE IF NOT EXISTS {schema}.login_failures (
        scope     text        NOT NULL CHECK (scope IN ('citizen', 'channel')),
        subject   text        NOT NULL,
        failed_at timestamptz NOT NULL
    );
    CREATE INDEX IF NOT EXISTS login_failures_by_subject
        ON {schema}.login_failures (scope, subject, failed_at);
    CREATE INDEX IF NOT EXISTS login_failures_by_time ON {schema}.login_failures (failed_at);
    """


# --- captchas -----------------------------------------------------------------------------


def new_captcha_code(length: int) -> str:
    return "".join(secrets.choice(string.digits) for _ in range(length))


class CaptchaStore:
    """Captchas keep only a keyed digest of their code; a code works once."""

    def __init__(self, schema: str, pepper: str) -> None:
        self.schema = schema
        self._pepper = pepper.encode()

    def digest(self, captcha_id: str, code: str) -> str:
        message = f"captcha:{captcha_id}:{code.strip()}".encode()
        return hmac.new(self._pepper, message, hashlib.sha256).hexdigest()

    async def issue(
        self, conn: asyncpg.Connection, captcha_id: str, code: str, expires_at: datetime
    ) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.captchas (captcha_id, code_digest, expires_at)"
            " VALUES ($1, $2, $3)",
            captcha_id,
            self.digest(captcha_id, code),
            expires_at,
        )

    def consuming(self, captcha_id: str, now: str) -> str:
        """The CTEs `before` (the captcha `captcha_id` locked and read as it was, before this
        attempt) and `used` (marked used at `now` if it was not, whatever the attempt's
        outcome, so a code cannot be guessed twice): a concurrent attempt waits for the lock
        and then reads it used. Parameters are SQL expressions (`begin_login`)."""
        return ("before AS (SELECT captcha_id, code_digest, expires_at, used_at"
                f" FROM {self.schema}.captchas WHERE captcha_id = {captcha_id} FOR UPDATE),"
                f" used AS (UPDATE {self.schema}.captchas c SET used_at = {now} FROM before b"
                "  WHERE c.captcha_id = b.captcha_id AND b.used_at IS NULL)")

    async def purge(self, conn: asyncpg.Connection, expired_before: datetime) -> int:
        """Delete captchas that expired before the given time; returns how many."""
        deleted = await conn.fetch(
            f"DELETE FROM {self.schema}.captchas WHERE expires_at < $1 RETURNING 1", expired_before
        )
        return len(deleted)


def captcha_of(row: asyncpg.Record | None) -> CaptchaRecord | None:
    if row is None or row["captcha_id"] is None:
        return None
    return CaptchaRecord(captcha_id=row["captcha_id"], code_digest=row["code_digest"],
                         expires_at=row["expires_at"], used_at=row["used_at"])


async def begin_login(conn: asyncpg.Connection, captchas: CaptchaStore,
                      failures: LoginFailureLog, captcha_id: str, now: datetime,
                      citizen_ref: str | None, channel: str,
                      since: datetime) -> tuple[CaptchaRecord | None, LoginFailures]:
    """A login's captcha as it was before this attempt, burnt by it (`CaptchaStore.consuming`),
    and the failures counting against it (`LoginFailureLog.counting`), in one round trip."""
    row = await conn.fetchrow(
        f"WITH {captchas.consuming('$1', '$2')},"
        f" failures AS ({failures.counting('$3', '$4', '$5')})"
        " SELECT f.citizen AS failed_citizen, f.channel AS failed_channel, b.*"
        " FROM failures f LEFT JOIN before b ON true",
        captcha_id, now, citizen_ref, channel, since)
    assert row is not None  # the aggregate's row, with the captcha's or without
    return captcha_of(row), LoginFailures(citizen=row["failed_citizen"],
                                          channel=row["failed_channel"])


# --- failed logins ------------------------------------------------------------------------


class LoginFailureLog:
    """Failed logins per citizen and per channel, in auth's schema (so they survive a restart)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    def counting(self, citizen_ref: str, channel: str, since: str) -> str:
        """Failures after `since`: the citizen's (none without a citizen_ref) and the
        channel's (columns `citizen`, `channel`). Parameters are SQL expressions
        (`begin_login`)."""
        return ("SELECT count(*) FILTER (WHERE scope = 'citizen') AS citizen,"
                " count(*) FILTER (WHERE scope = 'channel') AS channel"
                f" FROM {self.schema}.login_failures WHERE failed_at > {since}"
                f" AND ((scope = 'citizen' AND subject = {citizen_ref})"
                f" OR (scope = 'channel' AND subject = {channel}))")

    async def record(self, conn: asyncpg.Connection, citizen_ref: str | None, channel: str,
                     at: datetime) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.login_failures (scope, subject, failed_at)"
            " SELECT * FROM (VALUES ('channel', $2::text, $3::timestamptz),"
            " ('citizen', $1::text, $3::timestamptz)) AS f (scope, subject, failed_at)"
            " WHERE subject IS NOT NULL",
            citizen_ref, channel, at,
        )

    async def clear_citizen(self, conn: asyncpg.Connection, citizen_ref: str) -> None:
        """A successful login forgives the citizen's earlier failures (not the channel's)."""
        await conn.execute(
            f"DELETE FROM {self.schema}.login_failures WHERE scope = 'citizen' AND subject = $1",
            citizen_ref,
        )

    async def purge(self, conn: asyncpg.Connection, before: datetime) -> int:
        """Delete failures from before `before` (outside every window); returns how many."""
        deleted = await conn.fetch(
            f"DELETE FROM {self.schema}.login_failures WHERE failed_at < $1 RETURNING 1", before)
        return len(deleted)


# --- population registry ------------------------------------------------------------------


class PopulationRegistry(Protocol):
    """The population registry as auth sees it: names are matched, never read back."""

    async def enroll(self, citizen_ref: str, name: str, face_template: Sequence[float]) -> None:
        ...

    async def name_matches(self, citizen_ref: str, name: str) -> bool:
        """False for an unknown citizen and for a different name alike."""
        ...

    async def face_template(self, citizen_ref: str) -> list[float] | None:
        """The enrolled template, or None for an unknown citizen. Raises
        `shared.crypto.DataKeyDestroyedError` when the citizen was erased."""
        ...


@dataclass(slots=True)
class RegistryEntries:
    """Some citizens' registry entries (the name's digest, the sealed template) with their
    data keys, in one statement: a command batch's at once (`AuthHandlers.prepare`). A
    citizen erased in the batch is forgotten, so that a later command reads their
    (destroyed) key afresh."""

    entries: dict[str, asyncpg.Record]
    covered: set[str]

    @classmethod
    async def read(cls, conn: asyncpg.Connection, schema: str,
                   citizen_refs: Collection[str]) -> RegistryEntries:
        refs = sorted(set(citizen_refs))
        rows = await conn.fetch(
            "SELECT r.citizen_ref, r.name_digest, r.face_template_enc, "
            + ", ".join(f"k.{column}" for column in KEY_COLUMNS)
            + f" FROM {schema}.registry r"
            f" LEFT JOIN {schema}.data_keys k ON k.citizen_ref = r.citizen_ref"
            " WHERE r.citizen_ref = ANY($1::text[])", refs)
        return cls({row["citizen_ref"]: row for row in rows}, set(refs))

    def covers(self, citizen_ref: str) -> bool:
        return citizen_ref in self.covered

    def forget(self, citizen_ref: str) -> None:
        self.covered.discard(citizen_ref)


class PostgresRegistry:
    """`auth.registry` on one connection: the name as a keyed digest (to match) and, like the
    face template, encrypted under the citizen's data key (erasable by crypto-shredding).
    With `read`, the entries it covers come from there instead of a statement each."""

    def __init__(self, conn: asyncpg.Connection, vault: Vault, pepper: str,
                 read: RegistryEntries | None = None) -> None:
        self.conn = conn
        self.vault = vault
        self.schema = vault.schema  # the registry lives beside the data keys that seal it
        self.pepper = pepper
        self.read = read

    async def enroll(self, citizen_ref: str, name: str, face_template: Sequence[float]) -> None:
        name_enc = await self.vault.encrypt(self.conn, citizen_ref, normalise_name(name))
        template_enc = await self.vault.encrypt(
            self.conn, citizen_ref, json.dumps([float(x) for x in face_template])
        )
        await self.conn.execute(
            f"INSERT INTO {self.schema}.registry"
            " (citizen_ref, name_digest, name_enc, face_template_enc) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (citizen_ref) DO UPDATE SET name_digest = EXCLUDED.name_digest,"
            " name_enc = EXCLUDED.name_enc, face_template_enc = EXCLUDED.face_template_enc,"
            " enrolled_at = now()",
            citizen_ref,
            name_digest(self.pepper, name),
            name_enc,
            template_enc,
        )

    async def name_matches(self, citizen_ref: str, name: str) -> bool:
        row = await self._entry(citizen_ref)
        return _digest_matches(row["name_digest"] if row else None,
                               name_digest(self.pepper, name))

    async def face_template(self, citizen_ref: str) -> list[float] | None:
        row = await self._entry(citizen_ref)
        if row is None or row["face_template_enc"] is None:
            return None
        return _template(self.vault.decrypt_with(citizen_ref, row, row["face_template_enc"]))

    async def _entry(self, citizen_ref: str) -> asyncpg.Record | None:
        """The citizen's entry and data key, in one statement unless read with the batch."""
        read = self.read
        if read is None or not read.covers(citizen_ref):
            read = await RegistryEntries.read(self.conn, self.schema, [citizen_ref])
        return read.entries.get(citizen_ref)


@dataclass
class _Entry:
    name_digest: str
    face_template: tuple[float, ...]


class InMemoryRegistry:
    """The registry contract without a database, for unit tests and local fakes."""

    def __init__(self, pepper: str) -> None:
        self.pepper = pepper
        self._entries: dict[str, _Entry] = {}

    async def enroll(self, citizen_ref: str, name: str, face_template: Sequence[float]) -> None:
        self._entries[citizen_ref] = _Entry(
            name_digest(self.pepper, name), tuple(float(x) for x in face_template)
        )

    async def name_matches(self, citizen_ref: str, name: str) -> bool:
        entry = self._entries.get(citizen_ref)
        return _digest_matches(entry.name_digest if entry else None,
                               name_digest(self.pepper, name))

    async def face_template(self, citizen_ref: str) -> list[float] | None:
        entry = self._entries.get(citizen_ref)
        return list(entry.face_template) if entry else None


def _digest_matches(stored: str | None, presented: str) -> bool:
    # Compare even when the citizen is unknown, so timing does not tell the two apart.
    return hmac.compare_digest(stored or "0" * len(presented), presented) and stored is not None


def _template(raw: str) -> list[float]:
    values = json.loads(raw)
    if not isinstance(values, list):
        raise ValueError("a face template is a list of numbers")
    return [float(v) for v in values]


def postgres_registry(conn: asyncpg.Connection, settings: AuthSettings,
                      schema: str = SCHEMA) -> PostgresRegistry:
    """The registry on `conn`, with the entries its command batch read (if it runs in one)."""
    read = prepared(conn)
    return PostgresRegistry(
        conn,
        Vault(schema, MasterKeys.from_settings(settings)),
        settings.citizen_ref_pepper.get_secret_value(),
        read if isinstance(read, RegistryEntries) else None,
    )


async def ensure_registry_tables(conn: asyncpg.Connection, schema: str = SCHEMA) -> None:
    """Create the registry's tables if the auth service has never run (`cardctl seed`)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
        await conn.execute(registry_ddl(schema))


async def enrolled(conn: asyncpg.Connection, id_numbers: Sequence[str],
                   settings: AuthSettings | None = None, *, schema: str = SCHEMA) -> set[str]:
    """Which of `id_numbers` the registry already holds (`cardctl seed` draws others)."""
    settings = settings or AuthSettings()
    pepper = settings.citizen_ref_pepper.get_secret_value()
    refs = {citizen_ref(pepper, require_valid_id_number(n)): n for n in id_numbers}
    await ensure_registry_tables(conn, schema)
    found = await conn.fetch(
        f"SELECT citizen_ref FROM {schema}.registry WHERE citizen_ref = ANY($1::text[])",
        list(refs))
    return {refs[row["citizen_ref"]] for row in found}


async def enroll(
    conn: asyncpg.Connection,
    id_number: str,
    name: str,
    face_embedding: Sequence[float],
    settings: AuthSettings | None = None,
    *,
    schema: str = SCHEMA,
) -> str:
    """Load one citizen into the registry and return their citizen_ref."""
    [ref] = await enroll_all(conn, [(id_number, name, face_embedding)], settings, schema=schema)
    return ref


async def enroll_all(
    conn: asyncpg.Connection,
    people: Iterable[tuple[str, str, Sequence[float]]],
    settings: AuthSettings | None = None,
    *,
    schema: str = SCHEMA,
) -> list[str]:
    """Load citizens (ID number, name, face embedding) into the registry and return their
    citizen_refs, in order; the tables are made (if need be) once, not per citizen.

    `cardctl seed` calls this directly: it stands in for the external population registry.
    """
    settings = settings or AuthSettings()
    pepper = settings.citizen_ref_pepper.get_secret_value()
    await ensure_registry_tables(conn, schema)
    registry = postgres_registry(conn, settings, schema)
    refs = []
    for id_number, name, face_embedding in people:
        ref = citizen_ref(pepper, require_valid_id_number(id_number))
        await registry.enroll(ref, name, face_embedding)
        refs.append(ref)
    return refs
