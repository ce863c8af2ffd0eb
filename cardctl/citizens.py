"""Synthetic citizens with valid GB 11643-1999 ID numbers, for seeding and load."""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from datetime import date, timedelta

from shared.identity import check_char

# Region codes (first six digits) of a few real prefectures, so numbers look plausible.
_REGIONS = ("110105", "310104", "440106", "330106", "510107", "420106", "320102", "370102")
_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林罗高"
_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰"
EMBEDDING_DIM = 128


@dataclass(frozen=True, slots=True)
class SyntheticCitizen:
    id_number: str
    name: str
    face_embedding: list[float]
    card_no: str

    # The details re-recorded on a reissue application, derived so each citizen's differ.
    @property
    def _digest(self) -> str:
        return hashlib.sha256(f"synthetic:{self.id_number}".encode()).hexdigest()

    @property
    def address(self) -> str:
        return f"幸福路{int(self._digest[:4], 16) % 900 + 100}号{self._digest[4:10]}室"

    @property
    def phone(self) -> str:
        return f"13{int(self._digest[10:20], 16) % 10**9:09d}"

    @property
    def photo_ref(self) -> str:
        return f"photo://registry/{self._digest[20:36]}"

    def as_json(self) -> dict[str, object]:
        return {"id_number": self.id_number, "name": self.name,
                "face_embedding": self.face_embedding, "card_no": self.card_no}


def id_number(rng: random.Random) -> str:
    born = date(1950, 1, 1) + timedelta(days=rng.randrange(0, 365 * 55))
    first17 = f"{rng.choice(_REGIONS)}{born:%Y%m%d}{rng.randrange(0, 1000):03d}"
    return first17 + check_char(first17)


def face_embedding(rng: random.Random, dim: int = EMBEDDING_DIM) -> list[float]:
    raw = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw))
    return [round(x / norm, 6) for x in raw]


def generate(count: int, seed: int | None = None) -> list[SyntheticCitizen]:
    """`count` citizens with distinct ID numbers and card numbers."""
    rng = random.Random(seed)
    seen: set[str] = set()
    citizens: list[SyntheticCitizen] = []
    while len(citizens) < count:
        number = id_number(rng)
        if number in seen:
            continue
        seen.add(number)
        name = rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.randint(1, 2)))
        card_no = f"L{len(citizens):06d}{rng.randrange(10**9):09d}"
        citizens.append(SyntheticCitizen(number, name, face_embedding(rng), card_no))
    return citizens
