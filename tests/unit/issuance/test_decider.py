"""Given the card's events, when a command is decided, then these events (or this error)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from services.issuance import domain
from services.issuance.domain import (
    HandOverCard,
    IssuanceCommand,
    IssuanceEvent,
    PresentedId,
    ProxyCredentials,
    RecordImportedCard,
)
from shared.application import fold
from shared.contracts.common import SubjectErased
from shared.contracts.issuance import (
    CardCollected,
    CardIssued,
    CardProductionStarted,
    CardReadyForPickup,
    CardReissued,
)
from shared.erasure import decide_erasure
from shared.errors import DomainError

NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
HOLDER = "ref-holder"
OTHER = "ref-someone-else"
PROXY = "ref-proxy"
APP = "app-1"
BUREAU = "bureau-futian"
OLD, NEW = "S44030000000001", "S44030000000002"


def when(*commands: IssuanceCommand, given: Sequence[IssuanceEvent] = ()) -> list[IssuanceEvent]:
    return domain.decide_all(commands, fold(domain.INITIAL, domain.evolve, given))


def refused(code: str, *commands: IssuanceCommand, given: Sequence[IssuanceEvent] = ()) -> None:
    with pytest.raises(DomainError) as caught:
        when(*commands, given=given)
    assert caught.value.code == code


def start(
    app: str = APP, old: str | None = OLD, delay: timedelta = timedelta(0)
) -> IssuanceCommand:
    return domain.StartProduction(application_id=app, pickup_bureau=BUREAU, old_card_no=old,
                                  ready_by=NOW + delay)


def finish(app: str = APP, new: str = NEW) -> IssuanceCommand:
    return domain.FinishProduction(application_id=app, new_card_no=new)


def shown(ref: str | None) -> PresentedId:
    return PresentedId(valid=ref is not None, citizen_ref=ref)


def hand_over(presented: str | None = HOLDER, bureau: str = BUREAU, app: str = APP,
              proxy: ProxyCredentials | None = None,
              served: tuple[str, ...] = ()) -> IssuanceCommand:
    return HandOverCard(application_id=app, bureau_id=bureau, holder_ref=HOLDER,
                        presented=shown(presented), proxy=proxy, bureaus=served)


def proxy(ref: str | None = PROXY, authorisation: str = "letter-2025-001") -> ProxyCredentials:
    return ProxyCredentials(presented=shown(ref), authorisation_ref=authorisation,
                            id_number_enc="enc:v1:aWQ=", name_enc="enc:v1:bmFtZQ==")


IMPORTED: list[IssuanceEvent] = [CardIssued(card_no=OLD)]
PRODUCING: list[IssuanceEvent] = [
    *IMPORTED,
    CardProductionStarted(application_id=APP, pickup_bureau=BUREAU,
                          ready_by=NOW + timedelta(days=7)),
]
READY: list[IssuanceEvent] = [
    *PRODUCING,
    CardReissued(application_id=APP, new_card_no=NEW, old_card_no=OLD),
    CardReadyForPickup(application_id=APP, pickup_bureau=BUREAU, card_no=NEW),
]
COLLECTED: list[IssuanceEvent] = [
    *READY,
    CardCollected(application_id=APP, bureau_id=BUREAU, card_no=NEW, by_proxy=False,
                  collected_by="holder"),
]


# --- import --------------------------------------------------------------------------------


def test_importing_a_card_for_a_citizen_without_one_issues_it() -> None:
    assert when(RecordImportedCard(OLD)) == [CardIssued(card_no=OLD, imported=True)]


def test_importing_the_same_card_again_changes_nothing() -> None:
    assert when(RecordImportedCard(OLD), given=IMPORTED) == []


def test_importing_a_different_card_for_a_card_holder_is_refused() -> None:
    refused("card_exists", RecordImportedCard("S44030099999999"), given=IMPORTED)


def test_importing_the_old_card_after_a_reissue_is_refused() -> None:
    refused("card_exists", RecordImportedCard(OLD), given=COLLECTED)


def test_an_id_number_with_a_bad_checksum_has_no_citizen_ref() -> None:
    with pytest.raises(domain.InvalidIdNumberError):
        domain.require_valid(shown(None))


# --- approval → production → reissued → ready ----------------------------------------------


def test_an_approval_starts_production_ready_by_the_production_time() -> None:
    assert when(start(delay=timedelta(days=7)), given=IMPORTED) == [
        CardProductionStarted(application_id=APP, pickup_bureau=BUREAU,
                              ready_by=NOW + timedelta(days=7)),
    ]


def test_finishing_production_reissues_the_card_and_makes_it_ready_at_the_bureau() -> None:
    assert when(finish(), given=PRODUCING) == [
        CardReissued(application_id=APP, new_card_no=NEW, old_card_no=OLD),
        CardReadyForPickup(application_id=APP, pickup_bureau=BUREAU, card_no=NEW),
    ]


def test_with_no_production_time_approval_and_readiness_are_decided_together() -> None:
    assert [e.type for e in when(start(), finish(), given=IMPORTED)] == [
        "CardProductionStarted", "CardReissued", "CardReadyForPickup",
    ]


def test_the_same_approval_twice_starts_nothing_new() -> None:
    assert when(start(), given=PRODUCING) == []
    assert when(start(), finish(), given=READY) == []
    assert when(start(), given=COLLECTED) == []


def test_a_finished_production_does_not_fire_twice() -> None:
    assert when(finish(new="S44030000000003"), given=READY) == []


def test_a_timer_for_an_unknown_production_decides_nothing() -> None:
    assert when(finish(app="app-unknown"), given=PRODUCING) == []


def test_another_approval_while_a_card_is_in_production_is_refused() -> None:
    refused("production_in_progress", start(app="app-2"), given=PRODUCING)


def test_a_second_reissue_after_collection_starts_from_the_collected_card() -> None:
    events = when(start(app="app-2"), finish(app="app-2", new="S44030000000003"),
                  given=COLLECTED)
    assert events[1] == CardReissued(application_id="app-2", new_card_no="S44030000000003",
                                     old_card_no=NEW)


def test_an_approval_for_a_card_never_imported_adopts_the_legacy_card_first() -> None:
    events = when(start(), finish())
    assert events[0] == CardIssued(card_no=OLD, imported=True)
    assert events[2] == CardReissued(application_id=APP, new_card_no=NEW, old_card_no=OLD)


def test_an_approval_without_any_known_card_reissues_without_an_old_one() -> None:
    events = when(start(old=None), finish())
    assert events[1] == CardReissued(application_id=APP, new_card_no=NEW, old_card_no=None)


# --- collection ----------------------------------------------------------------------------


def test_the_holder_collects_the_ready_card_with_their_own_id() -> None:
    assert when(hand_over(), given=READY) == [
        CardCollected(application_id=APP, bureau_id=BUREAU, card_no=NEW, by_proxy=False,
                      collected_by="holder"),
    ]


def test_after_collection_the_citizen_holds_the_new_card() -> None:
    assert fold(domain.INITIAL, domain.evolve, COLLECTED) == domain.Active(
        card_no=NEW, done=frozenset({APP}))


def test_a_proxy_with_an_authorisation_collects_and_their_particulars_stay_encrypted() -> None:
    [collected] = when(hand_over(proxy=proxy()), given=READY)
    assert collected == CardCollected(
        application_id=APP, bureau_id=BUREAU, card_no=NEW, by_proxy=True, collected_by="proxy",
        proxy_id_number="enc:v1:aWQ=", proxy_name="enc:v1:bmFtZQ==",
        authorisation_ref="letter-2025-001",
    )


def test_a_proxy_without_an_authorisation_is_refused() -> None:
    refused("authorisation_required", hand_over(proxy=proxy(authorisation="   ")), given=READY)


def test_a_proxy_whose_id_number_fails_the_checksum_is_refused() -> None:
    refused("invalid_id_number", hand_over(proxy=proxy(ref=None)), given=READY)


def test_the_holder_cannot_be_their_own_proxy() -> None:
    refused("proxy_is_holder", hand_over(proxy=proxy(ref=HOLDER)), given=READY)


def test_a_proxy_must_still_present_the_holders_id_number() -> None:
    refused("id_mismatch", hand_over(presented=OTHER, proxy=proxy()), given=READY)


def test_someone_elses_id_number_does_not_collect_the_card() -> None:
    refused("id_mismatch", hand_over(presented=OTHER), given=READY)


def test_a_presented_id_number_with_a_bad_checksum_is_refused() -> None:
    refused("invalid_id_number", hand_over(presented=None), given=READY)


def test_collecting_at_another_bureau_is_refused() -> None:
    refused("wrong_bureau", hand_over(bureau="bureau-nanshan"), given=READY)


def test_a_channel_serving_the_bureau_hands_the_card_over() -> None:
    assert [type(e) for e in when(hand_over(served=(BUREAU, "bureau-nanshan")), given=READY)] \
        == [CardCollected]


def test_a_channel_restricted_to_another_bureau_cannot_hand_the_card_over() -> None:
    # Naming its own bureau (where the card is not) or the card's (which it does not serve).
    refused("bureau_not_served", hand_over(served=("bureau-nanshan",)), given=READY)
    refused("bureau_not_served",
            hand_over(bureau="bureau-nanshan", served=("bureau-nanshan",)), given=READY)


def test_another_bureau_learns_nothing_of_a_card_still_in_production() -> None:
    refused("bureau_not_served",
            hand_over(bureau="bureau-nanshan", served=("bureau-nanshan",)), given=PRODUCING)


def test_collecting_a_card_still_in_production_is_refused() -> None:
    refused("not_ready_for_pickup", hand_over(), given=PRODUCING)


def test_collecting_twice_is_refused() -> None:
    refused("already_collected", hand_over(), given=COLLECTED)


def test_collecting_for_an_application_the_card_does_not_know_is_refused() -> None:
    refused("unknown_application", hand_over(app="app-unknown"), given=READY)
    refused("unknown_application", hand_over(), given=IMPORTED)


# --- erasure -------------------------------------------------------------------------------


def test_nothing_is_decided_for_an_erased_citizen() -> None:
    erased: list[IssuanceEvent] = [*IMPORTED, SubjectErased(reason="citizen request")]
    refused("subject_erased", start(), given=erased)
    refused("subject_erased", RecordImportedCard(OLD), given=erased)


def test_new_card_numbers_carry_the_prefix_and_region_code() -> None:
    assert domain.format_card_no("S", "440300", 42, 8) == "S44030000000042"


def test_an_erased_citizens_ready_card_is_not_handed_over() -> None:
    erased: list[IssuanceEvent] = [*READY, SubjectErased(reason="citizen request")]
    refused("subject_erased", hand_over(), given=erased)
    refused("subject_erased", hand_over(proxy=proxy()), given=erased)


def test_erasing_a_card_stream_twice_records_subject_erased_once() -> None:
    erased: list[IssuanceEvent] = [*READY, SubjectErased(reason="citizen request")]
    before = fold(domain.INITIAL, domain.evolve, READY)
    after = fold(domain.INITIAL, domain.evolve, erased)
    assert decide_erasure(domain.is_erased(before), "r") == [SubjectErased(reason="r")]
    assert decide_erasure(domain.is_erased(after), "r") == []
