"""Crypto-shredding: personal data is encrypted with a per-citizen data key (AES-256-GCM),
wrapped by the master key. Destroying the data key erases the person; hashes still verify."""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX = "enc:v1:"


class DataKeyDestroyedError(Exception):
    """The citizen was erased: their data key no longer exists."""


def data_keys_ddl(schema: str) -> str:
    return f"""
    CREATE TABLE IF NOT EXISTS {schema}.data_keys (
        citizen_ref  text PRIMARY KEY,
        wrapped_key  bytea,
        destroyed_at timestamptz
    );
    """


class Vault:
    """Per-citizen data keys of one service schema."""

    def __init__(self, schema: str, master_key_b64: str) -> None:
        self.schema = schema
        self._master = AESGCM(base64.b64decode(master_key_b64))

    async def _key(self, conn: asyncpg.Connection, citizen_ref: str, *, create: bool) -> AESGCM:
        row = await conn.fetchrow(
            f"SELECT wrapped_key, destroyed_at FROM {self.schema}.data_keys WHERE citizen_ref = $1",
            citizen_ref,
        )
        if row is not None and row["destroyed_at"] is not None:
            raise DataKeyDestroyedError(citizen_ref)
        if row is None:
            if not create:
                raise DataKeyDestroyedError(citizen_ref)
            raw = AESGCM.generate_key(bit_length=256)
            nonce = os.urandom(12)
            wrapped = nonce + self._master.encrypt(nonce, raw, citizen_ref.encode())
            inserted = await conn.fetchval(
                f"INSERT INTO {self.schema}.data_keys (citizen_ref, wrapped_key) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING true",
                citizen_ref,
                wrapped,
            )
            if inserted:
                return AESGCM(raw)
            return await self._key(conn, citizen_ref, create=False)
        wrapped = bytes(row["wrapped_key"])
        return AESGCM(self._master.decrypt(wrapped[:12], wrapped[12:], citizen_ref.encode()))

    async def encrypt(self, conn: asyncpg.Connection, citizen_ref: str, plaintext: str) -> str:
        [sealed] = await self.encrypt_all(conn, citizen_ref, [plaintext])
        return sealed

    async def encrypt_all(self, conn: asyncpg.Connection, citizen_ref: str,
                          plaintexts: Sequence[str]) -> list[str]:
        """Several fields of one citizen under one key lookup, each with its own nonce."""
        key = await self._key(conn, citizen_ref, create=True)
        sealed = []
        for plaintext in plaintexts:
            nonce = os.urandom(12)
            ciphertext = nonce + key.encrypt(nonce, plaintext.encode(), citizen_ref.encode())
            sealed.append(PREFIX + base64.b64encode(ciphertext).decode())
        return sealed

    async def decrypt(self, conn: asyncpg.Connection, citizen_ref: str, ciphertext: str) -> str:
        if not ciphertext.startswith(PREFIX):
            raise ValueError("not an encrypted field")
        key = await self._key(conn, citizen_ref, create=False)
        sealed = base64.b64decode(ciphertext[len(PREFIX):])
        try:
            return key.decrypt(sealed[:12], sealed[12:], citizen_ref.encode()).decode()
        except InvalidTag as exc:
            raise ValueError("ciphertext does not decrypt under this citizen's key") from exc

    async def destroy(self, conn: asyncpg.Connection, citizen_ref: str) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.data_keys (citizen_ref, destroyed_at) VALUES ($1, now())"
            " ON CONFLICT (citizen_ref) DO UPDATE SET wrapped_key = NULL, destroyed_at = now()",
            citizen_ref,
        )
