"""Per-citizen data keys on the real PostgreSQL: fields sealed together open alone, and
nothing seals or opens once the key is destroyed."""

from __future__ import annotations

import asyncpg
import pytest

from shared.crypto import DataKeyDestroyedError, Vault, data_keys_ddl
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
