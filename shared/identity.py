"""Citizen identity: the GB 11643-1999 ID number checksum, the pseudonymous citizen_ref, and
the normal forms ID numbers and names are compared and hashed in.

An ID number is ASCII digits and `X`/`x` only: full-width or other Unicode digits would pass
a Unicode-aware checksum yet hash to another citizen_ref. Names are compared in Unicode NFC,
so a decomposed spelling of the same name matches.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK_CHARS = "10X98765432"
_SHAPE = re.compile(r"[0-9]{17}[0-9X]", re.ASCII)
_ASCII_BLANKS = " \t\r\n"


def normalise_id_number(id_number: str) -> str:
    return id_number.strip(_ASCII_BLANKS).upper()


def normalise_name(name: str) -> str:
    """A name as compared and hashed: Unicode NFC, without surrounding blanks."""
    return unicodedata.normalize("NFC", name).strip()


def check_char(first17: str) -> str:
    """ISO 7064 MOD 11-2 check character of the first 17 digits."""
    total = sum(int(d) * w for d, w in zip(first17, _WEIGHTS, strict=True))
    return _CHECK_CHARS[total % 11]


def is_valid_id_number(id_number: str) -> bool:
    value = normalise_id_number(id_number)
    return _SHAPE.fullmatch(value) is not None and check_char(value[:17]) == value[17]


def citizen_ref(pepper: str, id_number: str) -> str:
    """Keyed hash of the normalised ID number: stable per citizen, useless without the pepper."""
    value = normalise_id_number(id_number).encode()
    return hmac.new(pepper.encode(), value, hashlib.sha256).hexdigest()


def name_digest(pepper: str, name: str) -> str:
    """Keyed hash of a name, so the registry can match names without keeping them readable."""
    value = normalise_name(name).encode()
    return hmac.new(pepper.encode(), b"name:" + value, hashlib.sha256).hexdigest()
