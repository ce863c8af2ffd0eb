"""Crypto-shredding: personal data is encrypted with a per-citizen data key (AES-256-GCM),
wrapped by the master key. Destroying the data key erases the person; hashes still verify.

Each wrapped data key records the id of the master key that wrapped it, so the master key can
be rotated: new data keys are wrapped by the current key, and retired keys still unwrap the
ones they wrapped (until `Vault.rewrap` has moved those to the current key).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from shared.settings import CardDeskSettings

PREFIX = "enc:v1:"


class DataKeyDestroyedError(Exception):
    """The citizen was erased: their data key no longer exists."""


class UnknownMasterKeyError(Exception):
    """A data key was wrapped by a master key this process does not hold."""


def data_keys_ddl(schema: str) -> str:
    # master_key_id is NULL on rows written before keys had ids: any held key may open them.
    return f"""
    CREATE TABLE IF NOT EXISTS {schema}.data_keys (
        citizen_ref  text PRIMARY KEY,
        wrapped_key  bytea,
        destroyed_at timestamptz
    );
    ALTER TABLE {schema}.data_keys ADD COLUMN IF NOT EXISTS master_key_id text;
    """


@dataclass(frozen=True)
class MasterKeys:
    """The current master key (wraps new data keys) and the retired ones (unwrap only)."""

    current_id: str
    current_b64: str
    retired_b64: Mapping[str, str]

    @classmethod
    def from_settings(cls, settings: CardDeskSettings) -> MasterKeys:
        return cls(settings.master_key_id, settings.master_key.get_secret_value(),
                   settings.retired_master_keys_b64())

    def ids(self) -> list[str]:
        return [self.current_id, *(k for k in self.retired_b64 if k != self.current_id)]

    def cipher(self, key_id: str) -> AESGCM:
        if key_id == self.current_id:
            return AESGCM(base64.b64decode(self.current_b64))
        if key_id in self.retired_b64:
            return AESGCM(base64.b64decode(self.retired_b64[key_id]))
        raise UnknownMasterKeyError(
            f"a data key is wrapped by master key {key_id!r}, which is neither"
            f" CARDDESK_MASTER_KEY_ID ({self.current_id!r}) nor in CARDDESK_RETIRED_MASTER_KEYS")


# A `data_keys` row as `Vault.decrypt_with` reads it.
KEY_COLUMNS = ("wrapped_key", "destroyed_at", "master_key_id")


class Vault:
    """Per-citizen data keys of one service schema."""

    def __init__(self, schema: str, master_keys: MasterKeys | str) -> None:
        self.schema = schema
        if isinstance(master_keys, str):  # one key, no rotation: tools and tests
            master_keys = MasterKeys("dev", master_keys, {})
        self.master_keys = master_keys
        self._ciphers = {key_id: master_keys.cipher(key_id) for key_id in master_keys.ids()}

    def _wrap(self, citizen_ref: str, raw: bytes) -> bytes:
        nonce = os.urandom(12)
        master = self._ciphers[self.master_keys.current_id]
        return nonce + master.encrypt(nonce, raw, citizen_ref.encode())

    def _unwrap(self, citizen_ref: str, wrapped: bytes, key_id: str | None) -> bytes:
        if key_id is not None and key_id not in self._ciphers:
            self.master_keys.cipher(key_id)  # raises UnknownMasterKeyError with the names
        candidates = [key_id] if key_id is not None else list(self._ciphers)
        for candidate in candidates:
            try:
                return self._ciphers[candidate].decrypt(wrapped[:12], wrapped[12:],
                                                        citizen_ref.encode())
            except InvalidTag:
                continue
        raise UnknownMasterKeyError(
            f"a data key does not unwrap under master key(s) {candidates}: the key with that"
            " id is not the one that wrapped it")

    async def _key(self, conn: asyncpg.Connection, citizen_ref: str, *, create: bool) -> AESGCM:
        """The citizen's data key; with `create`, a new one if they have none, in the same
        statement that reads theirs (one round trip either way)."""
        columns = ", ".join(KEY_COLUMNS)
        if not create:
            return self._key_of(citizen_ref, await conn.fetchrow(
                f"SELECT {columns} FROM {self.schema}.data_keys WHERE citizen_ref = $1",
                citizen_ref))
        raw = AESGCM.generate_key(bit_length=256)
        row = await conn.fetchrow(
            f"WITH inserted AS (INSERT INTO {self.schema}.data_keys"
            " (citizen_ref, wrapped_key, master_key_id) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING true AS new)"
            " SELECT NULL AS wrapped_key, NULL AS destroyed_at, NULL AS master_key_id, new"
            f" FROM inserted UNION ALL SELECT {columns}, false"
            f" FROM {self.schema}.data_keys WHERE citizen_ref = $1 LIMIT 1",
            citizen_ref,
            self._wrap(citizen_ref, raw),
            self.master_keys.current_id,
        )
        if row is None:  # another transaction's key committed while this one ran
            return await self._key(conn, citizen_ref, create=False)
        return AESGCM(raw) if row["new"] else self._key_of(citizen_ref, row)

    def _key_of(self, citizen_ref: str, row: asyncpg.Record | None) -> AESGCM:
        """The key a `data_keys` row holds (`KEY_COLUMNS`; all NULL or None: no key)."""
        if row is None or row["wrapped_key"] is None or row["destroyed_at"] is not None:
            raise DataKeyDestroyedError(citizen_ref)
        return AESGCM(self._unwrap(citizen_ref, bytes(row["wrapped_key"]), row["master_key_id"]))

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
        sealed = _sealed(ciphertext)
        return _open(citizen_ref, await self._key(conn, citizen_ref, create=False), sealed)

    def decrypt_with(self, citizen_ref: str, key_row: asyncpg.Record | None,
                     ciphertext: str) -> str:
        """`decrypt` with the citizen's `data_keys` row read by the caller (its
        `KEY_COLUMNS`, say joined to the row that holds the ciphertext: one round trip)."""
        sealed = _sealed(ciphertext)
        return _open(citizen_ref, self._key_of(citizen_ref, key_row), sealed)

    async def rewrap(self, conn: asyncpg.Connection, *, limit: int = 1000) -> int:
        """Wrap up to `limit` live data keys held under another master key with the current
        one (the data they encrypt is untouched); how many were moved. Run until 0, then the
        retired key may be dropped from CARDDESK_RETIRED_MASTER_KEYS."""
        current = self.master_keys.current_id
        rows = await conn.fetch(
            f"SELECT citizen_ref, wrapped_key, master_key_id FROM {self.schema}.data_keys"
            " WHERE destroyed_at IS NULL AND master_key_id IS DISTINCT FROM $1"
            " ORDER BY citizen_ref LIMIT $2 FOR UPDATE SKIP LOCKED",
            current, limit,
        )
        for row in rows:
            raw = self._unwrap(row["citizen_ref"], bytes(row["wrapped_key"]),
                               row["master_key_id"])
            await conn.execute(
                f"UPDATE {self.schema}.data_keys SET wrapped_key = $2, master_key_id = $3"
                " WHERE citizen_ref = $1",
                row["citizen_ref"], self._wrap(row["citizen_ref"], raw), current,
            )
        return len(rows)

    async def destroy(self, conn: asyncpg.Connection, citizen_ref: str) -> None:
        await conn.execute(
            f"INSERT INTO {self.schema}.data_keys (citizen_ref, destroyed_at) VALUES ($1, now())"
            " ON CONFLICT (citizen_ref) DO UPDATE SET wrapped_key = NULL, destroyed_at = now()",
            citizen_ref,
        )


def _sealed(ciphertext: str) -> bytes:
    if not ciphertext.startswith(PREFIX):
        raise ValueError("not an encrypted field")
    return base64.b64decode(ciphertext[len(PREFIX):])


def _open(citizen_ref: str, key: AESGCM, sealed: bytes) -> str:
    try:
        return key.decrypt(sealed[:12], sealed[12:], citizen_ref.encode()).decode()
    except InvalidTag as exc:
        raise ValueError("ciphertext does not decrypt under this citizen's key") from exc
