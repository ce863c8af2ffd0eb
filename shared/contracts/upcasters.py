"""The one registry of upcasters: old `schema_version`s of an event become the current one on
read. The stored (hashed) form never changes; every `EventDecoder` is built with `UPCASTERS`.

`UPCASTERS[(type, n)]` turns version n's data into version n+1's. Never change the meaning
of an old field: a new version only adds what can be derived from the old one.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from shared.events import Upcaster


def card_collected_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v2 says who collected the card; v1 only had `by_proxy`, which stays as it was."""
    return {**data, "collected_by": "proxy" if data.get("by_proxy") else "holder"}


UPCASTERS: Mapping[tuple[str, int], Upcaster] = MappingProxyType({
    ("CardCollected", 1): card_collected_v1_to_v2,
})
