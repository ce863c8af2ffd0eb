"""`cardctl keys`: a fresh production key set as an env file (mode 0600), and re-wrapping the
per-citizen data keys under the current master key after a rotation (SECURITY.md)."""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import asyncpg
import typer
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dotenv import dotenv_values
from rich.console import Console

from shared.crypto import MasterKeys, Vault
from shared.settings import CardDeskSettings
from shared.topics import SERVICES

console = Console(stderr=True)
keys_app = typer.Typer(help="Production secrets: generate a key set, re-wrap data keys.",
                       no_args_is_help=True)

_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_PRIVATE_RAW = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption())


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _key_id(prefix: str, now: datetime) -> str:
    return f"{prefix}-{now:%Y%m%d}-{secrets.token_hex(3)}"


def generate_key_set(now: datetime, previous: Mapping[str, str | None] | None = None,
                     ) -> dict[str, str]:
    """Every secret setting a production deployment needs, freshly generated.

    With `previous` (the env file of the set in use), this is a rotation of the two keys that
    carry ids: the previous master key joins `CARDDESK_RETIRED_MASTER_KEYS` and the previous
    session public key `CARDDESK_SESSION_PUBLIC_KEYS`, so old data keys unwrap and old tokens
    verify. The pepper is kept (every citizen_ref and stream id is derived from it), and so
    are the sealing key pair (the channels seal to its public key) and the auditors' keys.
    """
    previous = previous or {}
    signing = Ed25519PrivateKey.generate()
    sealing = X25519PrivateKey.generate()
    retired: dict[str, str] = json.loads(previous.get("CARDDESK_RETIRED_MASTER_KEYS") or "{}")
    if previous.get("CARDDESK_MASTER_KEY") and previous.get("CARDDESK_MASTER_KEY_ID"):
        retired[str(previous["CARDDESK_MASTER_KEY_ID"])] = str(previous["CARDDESK_MASTER_KEY"])
    session_keys: dict[str, str] = json.loads(
        previous.get("CARDDESK_SESSION_PUBLIC_KEYS") or "{}")
    if previous.get("CARDDESK_SESSION_PUBLIC_KEY") and previous.get("CARDDESK_SESSION_KEY_ID"):
        session_keys[str(previous["CARDDESK_SESSION_KEY_ID"])] = str(
            previous["CARDDESK_SESSION_PUBLIC_KEY"])
    session_key_id = _key_id("sk", now)
    session_public = _b64(signing.public_key().public_bytes(*_RAW))
    session_keys[session_key_id] = session_public
    fresh = {
        "CARDDESK_ENV": "production",
        "CARDDESK_CITIZEN_REF_PEPPER": str(previous.get("CARDDESK_CITIZEN_REF_PEPPER")
                                           or _b64(secrets.token_bytes(32))),
        "CARDDESK_MASTER_KEY": _b64(secrets.token_bytes(32)),
        "CARDDESK_MASTER_KEY_ID": _key_id("mk", now),
        "CARDDESK_RETIRED_MASTER_KEYS": json.dumps(retired),
        "CARDDESK_SESSION_SIGNING_KEY": _b64(signing.private_bytes(*_PRIVATE_RAW)),
        "CARDDESK_SESSION_PUBLIC_KEY": session_public,
        "CARDDESK_SESSION_KEY_ID": session_key_id,
        "CARDDESK_SESSION_PUBLIC_KEYS": json.dumps(session_keys),
        "CARDDESK_COMMAND_SEALING_KEY": _b64(sealing.private_bytes(*_PRIVATE_RAW)),
        "CARDDESK_COMMAND_SEALING_PUBLIC_KEY": _b64(sealing.public_key().public_bytes(*_RAW)),
        "CARDDESK_AUDITOR_API_KEYS": json.dumps({"auditor": secrets.token_urlsafe(32)}),
    }
    for kept in ("CARDDESK_COMMAND_SEALING_KEY", "CARDDESK_COMMAND_SEALING_PUBLIC_KEY",
                 "CARDDESK_AUDITOR_API_KEYS"):
        if previous.get(kept):
            fresh[kept] = str(previous[kept])
    return fresh


def env_file_text(values: Mapping[str, str]) -> str:
    """KEY=value lines; values with JSON in single quotes (sh, dotenv, compose and systemd
    read them alike)."""
    lines = ["# Card Desk production secrets (cardctl keys generate). Keep this file 0600;",
             "# never commit it. Which service needs which key: SECURITY.md."]
    for name, value in values.items():
        lines.append(f"{name}='{value}'" if any(c in value for c in "{}\" ") else
                     f"{name}={value}")
    return "\n".join(lines) + "\n"


def write_private(path: Path, text: str, *, force: bool) -> None:
    """Write `text` to `path` readable by its owner only (created 0600, never wider)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if force and path.exists():
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        fd = os.open(temporary, flags, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
        return
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)


@keys_app.command("generate")
def generate_command(
    out: Annotated[Path, typer.Option("--out", help="env file to write (mode 0600)")],
    previous: Annotated[Path | None, typer.Option(
        "--previous", help="the env file in use: rotate (keep the pepper, retire its keys)",
    )] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing file")] = False,
    show: Annotated[bool, typer.Option("--show", help="also print the secrets to stdout")] = False,
) -> None:
    """Write a fresh production key set (pepper, master key and id, Ed25519 session key pair
    and id, X25519 sealing key pair, an auditor API key) as an env file."""
    if out.exists() and not force:
        console.print(f"[red]{out} exists[/]; pass --force to replace it")
        raise typer.Exit(2)
    before = dotenv_values(previous) if previous is not None else None
    values = generate_key_set(datetime.now(UTC), before)
    text = env_file_text(values)
    write_private(out, text, force=force)
    console.print(f"wrote {out} (mode 0600): {', '.join(values)}")
    if previous is not None:
        console.print("rotation: the pepper is kept; the previous master key is retired (run"
                      " `cardctl keys rewrap` once every service runs the new set); the sealing"
                      " keys and auditor keys are carried over")
    if show:
        print(text, end="")


async def rewrap_all(settings: CardDeskSettings, schemas: list[str], *,
                     batch: int = 1000) -> dict[str, int]:
    """Move every live data key of each schema under the current master key."""
    keys = MasterKeys.from_settings(settings)
    moved: dict[str, int] = {}
    conn = await asyncpg.connect(settings.database_url)
    try:
        for schema in schemas:
            vault, total = Vault(schema, keys), 0
            while True:
                async with conn.transaction():
                    count = await vault.rewrap(conn, limit=batch)
                total += count
                if count == 0:
                    break
            moved[schema] = total
    finally:
        await conn.close()
    return moved


@keys_app.command("rewrap")
def rewrap_command(
    schema: Annotated[list[str] | None, typer.Option(
        "--schema", help="a service schema (default: auth, loss, review, issuance)")] = None,
) -> None:
    """After a master-key rotation: wrap every data key held under a retired master key with
    the current one (CARDDESK_MASTER_KEY_ID); then the retired key can be removed."""
    settings = CardDeskSettings()
    moved = uvloop.run(rewrap_all(settings, schema or list(SERVICES)))
    for name, count in moved.items():
        console.print(f"{name}: {count} data keys re-wrapped under {settings.master_key_id}")
