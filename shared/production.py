"""Start-up refusals: in production (`CARDDESK_ENV=production`) no process runs on a secret,
key or channels file shipped in the repository, and a key pair that does not match is refused
in every environment. Each process names the secrets it uses; the refusal names the setting.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import SecretStr

from shared.channels import DEV_CHANNELS_FILE
from shared.settings import CardDeskSettings

# The secrets a process may use; each service passes the ones it reads.
PEPPER = "citizen_ref_pepper"
MASTER_KEY = "master_key"
SESSION_SIGNING_KEY = "session_signing_key"
SESSION_PUBLIC_KEY = "session_public_key"
SEALING_KEY = "command_sealing_key"
SEALING_PUBLIC_KEY = "command_sealing_public_key"
SECRET_SETTINGS = (PEPPER, MASTER_KEY, SESSION_SIGNING_KEY, SESSION_PUBLIC_KEY, SEALING_KEY,
                   SEALING_PUBLIC_KEY)


class UnsafeConfigurationError(Exception):
    """A process was configured with a development secret in production, or keys that do not
    belong together. The message names every offending `CARDDESK_` setting."""


def setting_name(field: str) -> str:
    return f"CARDDESK_{field.upper()}"


def _plain(value: Any) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


def shipped_value(field: str) -> str:
    """The value the repository ships for a secret setting (its development default)."""
    default = CardDeskSettings.model_fields[field].default
    return _plain(default)


# SHA-256 of every secret, Kafka password and API key in config/channels.dev.json, so that an
# installed image (which carries no copy of that file) still recognises them; a unit test keeps
# this list in step with the file.
SHIPPED_CHANNEL_SECRET_DIGESTS = frozenset({
    "200b04a0f58875005117e60073b5a4f5278cf390ee48dc905c093a5e96df4ed5",
    "23b75b89e80e386fe2dbe2071af4cba0dd9389b530a2fdf4af3190d00f82118a",
    "261e30d709f44d9f8d04da1b27b4ac6701823199401826ec54bbf708c538229b",
    "2713cfd10b54683cf947b2654e771600765b198847118e8c158b459cc1487d3a",
    "2e3c637f7e7e34b0cd52087539bd18be552bf1fcf5e4cdae895c97cffdfb220b",
    "3a8c0ab7a27b92cd0e4def661d813199daf88644010b760d4f14685be614cfdd",
    "5a0b9c69ea97818e95c560f0116926c013c30ce437c8066700db387bfe3c5c5c",
    "6b55ec2620f3d1f916ca30b5fc0699aff5374610f51a1a06f77792c31243ba2a",
    "7874e1830b19336214f2a6ea5f0707ea0987a802ef15882e525c2b355bb381b5",
    "862e62ace593a6bc798833c99db53786afc966dd189f602c8541ba237af41307",
    "9c41718312f02407d9acf52e3799bf84cd2179cba5131e7c705e65c97362c841",
    "d185a996715099ae7b0ba336a8da70978f54a1b40e23cd6804ba4d81ad8489b2",
})


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def channel_secret_values(raw: object) -> dict[str, str]:
    """`"<channel> <field>"` → value, for every secret, Kafka password and API key."""
    if not isinstance(raw, dict):
        return {}
    return {f"{channel_id} {name}": str(spec[name])
            for channel_id, spec in raw.items() if isinstance(spec, dict)
            for name in ("secret", "kafka_password", "api_key") if spec.get(name) is not None}


def _dev_channel_digests() -> frozenset[str]:
    try:
        raw = json.loads(DEV_CHANNELS_FILE.read_text(encoding="utf-8"))
    except OSError:  # an installed image ships no development channels file
        return SHIPPED_CHANNEL_SECRET_DIGESTS
    return SHIPPED_CHANNEL_SECRET_DIGESTS | {
        _digest(v) for v in channel_secret_values(raw).values()}


def _channels_file_problem(path: Path) -> str | None:
    name = "CARDDESK_CHANNELS_FILE"
    try:
        if path.resolve() == DEV_CHANNELS_FILE.resolve():
            return f"{name} is the development channels file shipped in the repository"
        content = path.read_bytes()
    except OSError as error:
        return f"{name} cannot be read: {error.strerror}"
    try:
        raw = json.loads(content)
    except ValueError:
        return f"{name} is not JSON"
    shipped = _dev_channel_digests()
    for where, value in channel_secret_values(raw).items():
        if _digest(value) in shipped:
            channel_id, field = where.rsplit(" ", 1)
            return (f"{name}: channel {channel_id!r} uses a {field} shipped in the"
                    " repository's development channels file")
    return None


def _derived_public(kind: str, private_b64: str) -> str | None:
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        seed = base64.b64decode(private_b64, validate=True)
        if kind == "ed25519":
            public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(*raw)
        else:
            public = X25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(*raw)
    except (ValueError, binascii.Error):
        return None
    return base64.b64encode(public).decode()


def _pair_problem(settings: CardDeskSettings, private: str, public: str, kind: str) -> str | None:
    derived = _derived_public(kind, _plain(getattr(settings, private)))
    if derived is None:
        return f"{setting_name(private)} is not a base64 {kind} private key"
    presented = _plain(getattr(settings, public))
    try:
        matches = base64.b64decode(presented, validate=True) == base64.b64decode(derived)
    except (ValueError, binascii.Error):
        matches = False
    if not matches:
        return f"{setting_name(public)} is not the public key of {setting_name(private)}"
    return None


def configuration_problems(settings: CardDeskSettings, uses: Collection[str], *,
                           shipped_in_use: Iterable[str] = ()) -> list[str]:
    """Every reason this process must not start. `uses` are the secret settings it reads;
    `shipped_in_use` names further settings (a service's own) that the caller found holding
    a value the repository ships, refused in production like the shared ones."""
    problems: list[str] = []
    if SESSION_SIGNING_KEY in uses:
        problem = _pair_problem(settings, SESSION_SIGNING_KEY, SESSION_PUBLIC_KEY, "ed25519")
        problems += [problem] if problem else []
    if SEALING_KEY in uses:
        problem = _pair_problem(settings, SEALING_KEY, SEALING_PUBLIC_KEY, "x25519")
        problems += [problem] if problem else []
    if settings.env != "production":
        return problems
    for field in SECRET_SETTINGS:
        if field in uses and _plain(getattr(settings, field)) == shipped_value(field):
            problems.append(f"{setting_name(field)} is the development value shipped in the"
                            " repository")
    # CARDDESK_SESSION_PUBLIC_KEYS (key id -> public key, for token rotation) may not hold
    # the shipped public key either; read defensively, the setting belongs to the tokens.
    verifying = getattr(settings, "session_public_keys", None)
    if SESSION_PUBLIC_KEY in uses and isinstance(verifying, dict) and any(
            _plain(key) == shipped_value(SESSION_PUBLIC_KEY) for key in verifying.values()):
        problems.append("CARDDESK_SESSION_PUBLIC_KEYS holds the development session public key"
                        " shipped in the repository")
    retired = settings.retired_master_keys_b64().values()
    if MASTER_KEY in uses and shipped_value(MASTER_KEY) in retired:
        problems.append("CARDDESK_RETIRED_MASTER_KEYS holds the development master key shipped"
                        " in the repository")
    problems += [f"{name} holds the development value shipped in the repository"
                 for name in shipped_in_use]
    channels = _channels_file_problem(settings.channels_file)
    if channels is not None:
        problems.append(channels)
    return problems


def refuse_unsafe_configuration(settings: CardDeskSettings, uses: Collection[str], *,
                                shipped_in_use: Iterable[str] = ()) -> None:
    """Raise `UnsafeConfigurationError` naming every offending setting, if any."""
    problems = configuration_problems(settings, uses, shipped_in_use=shipped_in_use)
    if problems:
        raise UnsafeConfigurationError(
            f"refusing to start (CARDDESK_ENV={settings.env}): " + "; ".join(problems)
            + ". Generate production keys with `cardctl keys generate` (SECURITY.md).")


def exit_refused(error: UnsafeConfigurationError) -> NoReturn:
    """How a process entry point reports a refusal: one line on stderr, exit status 78
    (EX_CONFIG), so a supervisor does not mistake it for a crash worth retrying at once."""
    print(f"carddesk: {error}", file=sys.stderr)
    raise SystemExit(78)
