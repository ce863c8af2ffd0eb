"""Old schema versions are upcast on read: a v1 CardCollected is read as v2, its stored form
(and so its hash) untouched, and every reader gives the same result for either form."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from services.issuance.domain import decode as decode_issuance
from services.status.projection import project
from services.status.timeline import timeline_entry
from shared.contracts.issuance import ISSUANCE_EVENTS, CardCollected
from shared.contracts.upcasters import UPCASTERS
from shared.envelope import GENESIS_HASH, EventEnvelope, PendingEvent, hash_is_intact
from shared.events import EventDecoder
from tests.builders import sealed

REF = "c" * 64
AT = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
V1_DATA: dict[str, Any] = {"application_id": "app-1", "bureau_id": "bureau-001",
                           "card_no": "B76543210", "proxy_id_number": None,
                           "proxy_name": None, "authorisation_ref": None}


def stored_v1(*, by_proxy: bool) -> EventEnvelope:
    """A CardCollected as issuance stored it before v2: schema_version 1, no collected_by."""
    pending = PendingEvent(event_id=uuid.uuid4(), type="CardCollected", schema_version=1,
                           citizen_ref=REF, occurred_at=AT, correlation_id="c",
                           causation_id="c", data={**V1_DATA, "by_proxy": by_proxy})
    return EventEnvelope.seal(pending, f"card-{REF}", 1, GENESIS_HASH)


def stored_v2(*, by_proxy: bool, event_id: uuid.UUID) -> EventEnvelope:
    event = CardCollected(**{**V1_DATA, "by_proxy": by_proxy,
                             "collected_by": "proxy" if by_proxy else "holder"})
    return sealed(f"card-{REF}", REF, event, at=AT, event_id=event_id)


@pytest.mark.parametrize(("by_proxy", "collected_by"), [(False, "holder"), (True, "proxy")])
def test_a_stored_v1_card_collected_is_read_as_v2_with_who_collected_it(
    by_proxy: bool, collected_by: str,
) -> None:
    envelope = stored_v1(by_proxy=by_proxy)

    event = decode_issuance(envelope)

    assert isinstance(event, CardCollected)
    assert event.collected_by == collected_by
    assert event.by_proxy is by_proxy  # the old field keeps its meaning


def test_upcasting_happens_on_read_so_the_stored_form_and_its_hash_never_change() -> None:
    envelope = stored_v1(by_proxy=True)
    before = envelope.to_json_dict()

    decode_issuance(envelope)

    assert envelope.to_json_dict() == before
    assert envelope.schema_version == 1
    assert "collected_by" not in envelope.data
    assert hash_is_intact(before)


def test_without_the_upcaster_a_v1_event_does_not_read_as_v2() -> None:
    with pytest.raises(ValueError, match="collected_by"):
        EventDecoder(ISSUANCE_EVENTS)(stored_v1(by_proxy=False))


def test_issuance_writes_card_collected_as_v2_and_it_passes_through_unchanged() -> None:
    envelope = stored_v2(by_proxy=True, event_id=uuid.uuid4())

    assert envelope.schema_version == CardCollected.schema_version == 2
    assert UPCASTERS.get(("CardCollected", 2)) is None
    assert decode_issuance(envelope) == CardCollected(**{**V1_DATA, "by_proxy": True,
                                                         "collected_by": "proxy"})


def test_by_proxy_and_collected_by_may_not_disagree() -> None:
    with pytest.raises(ValueError, match="disagree"):
        CardCollected(**{**V1_DATA, "by_proxy": False, "collected_by": "proxy"})


@pytest.mark.parametrize("by_proxy", [False, True])
def test_the_status_projection_gives_the_same_row_and_timeline_for_v1_and_v2(
    by_proxy: bool,
) -> None:
    v1 = stored_v1(by_proxy=by_proxy)
    v2 = stored_v2(by_proxy=by_proxy, event_id=v1.event_id)

    assert project(None, v1) == project(None, v2)
    assert timeline_entry(v1, "issuance.events") == timeline_entry(v2, "issuance.events")
