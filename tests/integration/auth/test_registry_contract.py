"""One contract for the population registry, run against the in-memory and PostgreSQL ones."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from services.auth.adapters import (
    InMemoryRegistry,
    PopulationRegistry,
    enroll,
    enroll_all,
    enrolled,
    postgres_registry,
)
from services.auth.domain import InvalidIdNumberError
from services.auth.settings import AuthSettings
from shared.crypto import DataKeyDestroyedError, Vault
from shared.identity import citizen_ref
from tests.integration.auth.citizens import new_citizen, with_wrong_check_char

pytestmark = pytest.mark.integration


@pytest.fixture(params=["in-memory", "postgres"])
async def registry(
    request: pytest.FixtureRequest, pool: asyncpg.Pool, auth_settings: AuthSettings,
    auth_schema: str,
) -> AsyncIterator[PopulationRegistry]:
    if request.param == "in-memory":
        yield InMemoryRegistry(auth_settings.citizen_ref_pepper.get_secret_value())
        return
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            yield postgres_registry(conn, auth_settings, auth_schema)
        finally:
            await transaction.rollback()


def ref_of(settings: AuthSettings, id_number: str) -> str:
    return citizen_ref(settings.citizen_ref_pepper.get_secret_value(), id_number)


async def test_an_enrolled_name_matches_and_another_does_not(
    registry: PopulationRegistry, auth_settings: AuthSettings
) -> None:
    citizen = new_citizen()
    ref = ref_of(auth_settings, citizen.id_number)
    await registry.enroll(ref, citizen.name, citizen.face)
    assert await registry.name_matches(ref, citizen.name)
    assert await registry.name_matches(ref, f" {citizen.name} ")
    assert not await registry.name_matches(ref, citizen.name + "甲")


async def test_an_unknown_citizen_matches_no_name_and_has_no_template(
    registry: PopulationRegistry, auth_settings: AuthSettings
) -> None:
    citizen = new_citizen()
    ref = ref_of(auth_settings, citizen.id_number)
    assert not await registry.name_matches(ref, citizen.name)
    assert await registry.face_template(ref) is None


async def test_the_enrolled_face_template_comes_back_exactly(
    registry: PopulationRegistry, auth_settings: AuthSettings
) -> None:
    citizen = new_citizen()
    ref = ref_of(auth_settings, citizen.id_number)
    await registry.enroll(ref, citizen.name, citizen.face)
    assert await registry.face_template(ref) == citizen.face


async def test_enrolling_again_replaces_the_name_and_template(
    registry: PopulationRegistry, auth_settings: AuthSettings
) -> None:
    first, second = new_citizen(), new_citizen()
    ref = ref_of(auth_settings, first.id_number)
    await registry.enroll(ref, first.name, first.face)
    await registry.enroll(ref, second.name, second.face)
    assert await registry.name_matches(ref, second.name)
    assert not await registry.name_matches(ref, first.name)
    assert await registry.face_template(ref) == second.face


# --- the PostgreSQL registry's storage ------------------------------------------------------


async def test_the_registry_keeps_neither_name_nor_template_readable(
    pool: asyncpg.Pool, auth_settings: AuthSettings, auth_schema: str
) -> None:
    citizen = new_citizen()
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            ref = await enroll(conn, citizen.id_number.lower(), citizen.name, citizen.face,
                               auth_settings, schema=auth_schema)
            row = await conn.fetchrow(
                f"SELECT * FROM {auth_schema}.registry WHERE citizen_ref = $1", ref)
        finally:
            await transaction.rollback()  # nothing of this test stays
    assert row is not None
    stored = json.dumps(dict(row), default=str, ensure_ascii=False)
    assert citizen.name not in stored
    assert citizen.id_number not in stored
    assert json.dumps(citizen.face[0]) not in stored
    assert row["name_enc"].startswith("enc:v1:")
    assert row["face_template_enc"].startswith("enc:v1:")


async def test_enrolled_names_the_id_numbers_the_registry_holds_and_no_other(
    pool: asyncpg.Pool, auth_settings: AuthSettings, auth_schema: str
) -> None:
    """What `cardctl seed` checks before it enrols: a number drawn twice is not enrolled
    over the citizen who has it."""
    held, new = new_citizen(), new_citizen()
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await enroll(conn, held.id_number, held.name, held.face, auth_settings,
                         schema=auth_schema)
            found = await enrolled(conn, [held.id_number.lower(), new.id_number],
                                   auth_settings, schema=auth_schema)
        finally:
            await transaction.rollback()
    assert found == {held.id_number.lower()}


async def test_enrolment_refuses_an_id_number_that_fails_the_checksum(
    pool: asyncpg.Pool, auth_settings: AuthSettings, auth_schema: str
) -> None:
    citizen = new_citizen()
    async with pool.acquire() as conn:
        with pytest.raises(InvalidIdNumberError):
            await enroll(conn, with_wrong_check_char(citizen.id_number), citizen.name,
                         citizen.face, auth_settings, schema=auth_schema)


async def test_an_erased_citizens_template_can_no_longer_be_read(
    pool: asyncpg.Pool, auth_settings: AuthSettings, auth_schema: str
) -> None:
    citizen = new_citizen()
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            ref = await enroll(conn, citizen.id_number, citizen.name, citizen.face,
                               auth_settings, schema=auth_schema)
            vault = Vault(auth_schema, auth_settings.master_key.get_secret_value())
            await vault.destroy(conn, ref)
            with pytest.raises(DataKeyDestroyedError):
                await postgres_registry(conn, auth_settings, auth_schema).face_template(ref)
        finally:
            await transaction.rollback()


class CountingDdl:
    """A connection that counts the statements creating the registry's tables."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.ddl = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    async def execute(self, query: str, *args: Any) -> str:
        self.ddl += "CREATE TABLE IF NOT EXISTS" in query
        status: str = await self.conn.execute(query, *args)
        return status


async def test_enrolling_many_makes_the_tables_once_and_enrols_each_in_order(
    pool: asyncpg.Pool, auth_settings: AuthSettings, auth_schema: str
) -> None:
    """`cardctl seed` enrols thousands at a time: the registry's DDL runs once for them."""
    people = [new_citizen() for _ in range(3)]
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            counting = CountingDdl(conn)
            refs = await enroll_all(counting, [(p.id_number, p.name, p.face) for p in people],
                                    auth_settings, schema=auth_schema)
            registry = postgres_registry(conn, auth_settings, auth_schema)
            matches = [await registry.name_matches(ref, p.name) for ref, p in zip(
                refs, people, strict=True)]
        finally:
            await transaction.rollback()
    assert counting.ddl == 1
    assert refs == [ref_of(auth_settings, p.id_number) for p in people]
    assert matches == [True, True, True]
