"""Citizen identity: the GB 11643-1999 ID number checksum and the pseudonymous citizen_ref."""

from __future__ import annotations

import hashlib
import hmac
import re

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_CHARS = "10X98765432"
_SHAPE = re.compile(r"^\d{17}[\dX]$")


def normalise_id_number(id_number: str) -> str:
    return id_number.strip().upper()


def check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK_CHARS[total % 11]


def is_valid_id_number(id_number: str) -> bool:
    value = normalise_id_number(id_number)
    return bool(_SHAPE.match(value)) and check_char(value[:17]) == value[17]


def citizen_ref(pepper: str, id_number: str) -> str:
    """Keyed hash of the normalised ID number: stable per citizen, useless without the pepper."""
    value = normalise_id_number(id_number).encode()
    return hmac.new(pepper.encode(), value, hashlib.sha256).hexdigest()


def name_digest(pepper: str, name: str) -> str:
    """Keyed hash of a name, so the registry can match names without keeping them readable."""
    return hmac.new(pepper.encode(), b"name:" + name.strip().encode(), hashlib.sha256).hexdigest()
