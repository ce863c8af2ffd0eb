"""Synthetic citizens for the auth tests: valid ID numbers, names and face embeddings."""

from __future__ import annotations

import random
import secrets
import uuid
from dataclasses import dataclass

from shared.identity import check_char


def random_id_number() -> str:
    first17 = f"{secrets.randbelow(10**17):017d}"
    return first17 + check_char(first17)


def with_wrong_check_char(id_number: str) -> str:
    wrong = next(c for c in "0123456789X" if c != id_number[17])
    return id_number[:17] + wrong


def random_face(dimension: int = 128) -> list[float]:
    rng = random.Random(secrets.randbits(64))
    return [rng.gauss(0.0, 1.0) for _ in range(dimension)]


@dataclass(frozen=True)
class Citizen:
    id_number: str
    name: str
    face: list[float]


def new_citizen() -> Citizen:
    return Citizen(random_id_number(), f"测试{uuid.uuid4().hex[:6]}", random_face())
