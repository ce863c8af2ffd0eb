"""Per-citizen data keys on the real PostgreSQL: fields sealed together open alone, and
nothing seals or opens once the key is destroyed; the master key rotates."""

from __future__ import annotations

import asyncio
import base64

import asyncpg
import pytest
from pydantic import SecretStr

from cardctl.keys import rewrap_all
from shared.crypto import (
    DataKeyDestroyedError,
    MasterKeys,
    UnknownMasterKeyError,
    Vault,
    data_keys_ddl,
)
from shared.settings import CardDeskSettings

pytestmark = pytest.mark.integration


async def test_fields_sealed_together_each_open_and_share_no_nonce(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    await pool.execute(data_keys_ddl(schema))
    vault = Vault(schema, settings.master_key.get_secret_value())
    async with pool.acquire() as conn:
        sealed = await vault.encrypt_all(conn, "citizen-1", ["Jiefang Rd 1", "Jiefang Rd 1", "x"])
        assert len(set(sealed)) == 3  # the same text twice, two ciphertexts
        assert [await vault.decrypt(conn, "citizen-1", s) for s in sealed] == [
            "Jiefang Rd 1", "Jiefang Rd 1", "x"]
        await vault.encrypt(conn, "citizen-2", "a key of their own")
        with pytest.raises(ValueError, match="does not decrypt"):
            await vault.decrypt(conn, "citizen-2", await vault.encrypt(conn, "citizen-1", "y"))
        await vault.destroy(conn, "citizen-1")
        with pytest.raises(DataKeyDestroyedError):
            await vault.decrypt(conn, "citizen-1", sealed[0])
        with pytest.raises(DataKeyDestroyedError):
            await vault.encrypt_all(conn, "citizen-1", ["new"])


async def test_two_transactions_sealing_a_new_citizens_first_field_at_once_share_one_key(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    await pool.execute(data_keys_ddl(schema))
    vault = Vault(schema, settings.master_key.get_secret_value())
    async with pool.acquire() as first, pool.acquire() as second:
        transaction = first.transaction()
        await transaction.start()
        sealed_first = await vault.encrypt(first, "citizen-9", "first")

        async def meanwhile() -> str:
            async with second.transaction():
                return await vault.encrypt(second, "citizen-9", "second")

        pending = asyncio.create_task(meanwhile())
        await asyncio.sleep(0.2)
        assert not pending.done()  # its insert waits for the first's key, not yet committed
        await transaction.commit()
        sealed_second = await asyncio.wait_for(pending, 10)
    async with pool.acquire() as conn:
        assert [await vault.decrypt(conn, "citizen-9", s) for s in (sealed_first, sealed_second)
                ] == ["first", "second"]
        assert await conn.fetchval(
            f"SELECT count(*) FROM {schema}.data_keys WHERE citizen_ref = 'citizen-9'") == 1


def _key(byte: int) -> str:
    return base64.b64encode(bytes([byte]) * 32).decode()


OLD = MasterKeys("mk-old", _key(1), {})
NEW = MasterKeys("mk-new", _key(2), {"mk-old": _key(1)})


async def _wrapping_ids(conn: asyncpg.Connection, schema: str) -> dict[str, str | None]:
    rows = await conn.fetch(f"SELECT citizen_ref, master_key_id FROM {schema}.data_keys")
    return {r["citizen_ref"]: r["master_key_id"] for r in rows}


async def test_after_a_master_key_rotation_old_data_stays_readable_and_new_keys_use_the_new_one(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(data_keys_ddl(schema))
    async with pool.acquire() as conn:
        before = await Vault(schema, OLD).encrypt(conn, "citizen-old", "Jiefang Rd 1")
        rotated = Vault(schema, NEW)
        assert await rotated.decrypt(conn, "citizen-old", before) == "Jiefang Rd 1"
        after = await rotated.encrypt(conn, "citizen-new", "Renmin Rd 2")
        assert await _wrapping_ids(conn, schema) == {"citizen-old": "mk-old",
                                                     "citizen-new": "mk-new"}
        # The old key alone cannot open what the new key wrapped.
        with pytest.raises(UnknownMasterKeyError, match="mk-new"):
            await Vault(schema, OLD).decrypt(conn, "citizen-new", after)
        # Re-wrapping moves the old data key to the new master key; the data is untouched.
        assert await rotated.rewrap(conn) == 1
        assert await rotated.rewrap(conn) == 0
        assert set((await _wrapping_ids(conn, schema)).values()) == {"mk-new"}
        only_new = Vault(schema, MasterKeys("mk-new", _key(2), {}))
        assert await only_new.decrypt(conn, "citizen-old", before) == "Jiefang Rd 1"


async def test_a_data_key_under_an_unknown_master_key_id_is_a_clear_error(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(data_keys_ddl(schema))
    async with pool.acquire() as conn:
        sealed = await Vault(schema, MasterKeys("mk-lost", _key(3), {})).encrypt(
            conn, "citizen-1", "x")
        with pytest.raises(UnknownMasterKeyError,
                           match="'mk-lost', which is neither CARDDESK_MASTER_KEY_ID"):
            await Vault(schema, NEW).decrypt(conn, "citizen-1", sealed)


async def test_data_keys_written_before_key_ids_existed_still_open(
    pool: asyncpg.Pool, schema: str,
) -> None:
    await pool.execute(data_keys_ddl(schema))
    async with pool.acquire() as conn:
        sealed = await Vault(schema, OLD).encrypt(conn, "citizen-1", "x")
        await conn.execute(f"UPDATE {schema}.data_keys SET master_key_id = NULL")
        assert await Vault(schema, NEW).decrypt(conn, "citizen-1", sealed) == "x"
        with pytest.raises(UnknownMasterKeyError):
            await Vault(schema, MasterKeys("mk-other", _key(4), {})).decrypt(
                conn, "citizen-1", sealed)


async def test_cardctl_keys_rewrap_moves_every_schemas_data_keys_to_the_current_key(
    pool: asyncpg.Pool, schema: str, settings: CardDeskSettings,
) -> None:
    await pool.execute(data_keys_ddl(schema))
    async with pool.acquire() as conn:
        sealed = [await Vault(schema, OLD).encrypt(conn, f"citizen-{i}", f"v{i}")
                  for i in range(5)]
    rotated = settings.model_copy(update={
        "master_key": SecretStr(_key(2)), "master_key_id": "mk-new",
        "retired_master_keys": {"mk-old": SecretStr(_key(1))}})

    assert await rewrap_all(rotated, [schema], batch=2) == {schema: 5}
    assert await rewrap_all(rotated, [schema], batch=2) == {schema: 0}
    async with pool.acquire() as conn:
        assert set((await _wrapping_ids(conn, schema)).values()) == {"mk-new"}
        only_new = Vault(schema, MasterKeys("mk-new", _key(2), {}))
        assert [await only_new.decrypt(conn, f"citizen-{i}", s)
                for i, s in enumerate(sealed)] == [f"v{i}" for i in range(5)]
