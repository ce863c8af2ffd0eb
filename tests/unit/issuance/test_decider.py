"""The issuance decider: given the card's events, when a command arrives, then these events or
a refusal."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.issuance.domain import (
    DECIDER,
    Active,
    AlreadyCollectedError,
    AuthorisationRequiredError,
    CardExistsError,
    CardState,
    DecisionContext,
    FinishProduction,
    HandOverCard,
    IdMismatchError,
    InvalidIdNumberError,
    IssuanceCommand,
    NotReadyForPickupError,
    PresentedId,
    ProductionInProgressError,
    ProxyCredentials,
    ProxyIsHolderError,
    RecordImportedCard,
    StartProduction,
    UnknownApplicationError,
    WrongBureauError,
    decide_all,
    format_card_no,
    require_valid,
)
from shared.contracts.common import SubjectErased
from shared.contracts.issuance import (
    CardCollected,
    CardIssued,
    CardProductionStarted,
    CardReadyForPickup,
    CardReissued,
    IssuanceEvent,
)
from shared.erasure import decide_erasure
from shared.errors import BureauNotServedError, SubjectErasedError
from tests.deciders import Given
from tests.deciders import given as spec

NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
WEEK = timedelta(days=7)
HOLDER = "ref-holder"
OTHER = "ref-someone-else"
PROXY = "ref-proxy"
APP = "app-1"
BUREAU = "bureau-futian"
OLD, NEW = "S44030000000001", "S44030000000002"
# No production time: the card is ready in the approval's transaction (the default setting).
CONTEXT = DecisionContext(now=NOW, production_time=timedelta(0))


def given(*history: IssuanceEvent) -> Given[IssuanceCommand, CardState, IssuanceEvent,
                                            DecisionContext]:
    return spec(DECIDER, *history, context=CONTEXT)


def start(app: str = APP, old: str | None = OLD) -> StartProduction:
    return StartProduction(application_id=app, pickup_bureau=BUREAU, old_card_no=old)


def started(app: str = APP, ready_by: datetime = NOW) -> CardProductionStarted:
    return CardProductionStarted(application_id=app, pickup_bureau=BUREAU, ready_by=ready_by)


def finish(app: str = APP, new: str = NEW) -> FinishProduction:
    return FinishProduction(application_id=app, new_card_no=new)


def reissued(app: str = APP, new: str = NEW, old: str | None = OLD) -> list[IssuanceEvent]:
    return [CardReissued(application_id=app, new_card_no=new, old_card_no=old),
            CardReadyForPickup(application_id=app, pickup_bureau=BUREAU, card_no=new)]


def shown(ref: str | None) -> PresentedId:
    return PresentedId(valid=ref is not None, citizen_ref=ref)


def hand_over(presented: str | None = HOLDER, bureau: str = BUREAU, app: str = APP,
              proxy: ProxyCredentials | None = None,
              served: tuple[str, ...] = ()) -> HandOverCard:
    return HandOverCard(application_id=app, bureau_id=bureau, holder_ref=HOLDER,
                        presented=shown(presented), proxy=proxy, bureaus=served)


def proxy(ref: str | None = PROXY, authorisation: str = "letter-2025-001") -> ProxyCredentials:
    return ProxyCredentials(presented=shown(ref), authorisation_ref=authorisation,
                            id_number_enc="enc:v1:aWQ=", name_enc="enc:v1:bmFtZQ==")


BY_HOLDER = CardCollected(application_id=APP, bureau_id=BUREAU, card_no=NEW, by_proxy=False,
                          collected_by="holder")
IMPORTED: list[IssuanceEvent] = [CardIssued(card_no=OLD)]
PRODUCING: list[IssuanceEvent] = [*IMPORTED, started(ready_by=NOW + WEEK)]
READY: list[IssuanceEvent] = [*PRODUCING, *reissued()]
COLLECTED: list[IssuanceEvent] = [*READY, BY_HOLDER]
ERASED = SubjectErased(reason="citizen request")


# --- import --------------------------------------------------------------------------------


def test_importing_a_card_for_a_citizen_without_one_issues_it() -> None:
    given().when(RecordImportedCard(OLD)).then(CardIssued(card_no=OLD, imported=True))


def test_importing_the_same_card_again_changes_nothing() -> None:
    given(*IMPORTED).when(RecordImportedCard(OLD)).then()


def test_importing_a_different_card_for_a_card_holder_is_refused() -> None:
    given(*IMPORTED).when(RecordImportedCard("S44030099999999")).then_refused(CardExistsError)


def test_importing_the_old_card_after_a_reissue_is_refused() -> None:
    given(*COLLECTED).when(RecordImportedCard(OLD)).then_refused(CardExistsError)


def test_an_id_number_with_a_bad_checksum_has_no_citizen_ref() -> None:
    with pytest.raises(InvalidIdNumberError):
        require_valid(shown(None))


# --- approval → production → reissued → ready ----------------------------------------------


def test_an_approval_starts_production_ready_by_the_production_time() -> None:
    given(*IMPORTED).when(start(), replace(CONTEXT, production_time=WEEK)).then(
        started(ready_by=NOW + WEEK))


def test_finishing_production_reissues_the_card_and_makes_it_ready_at_the_bureau() -> None:
    given(*PRODUCING).when(finish()).then(*reissued())


def test_with_no_production_time_approval_and_readiness_are_decided_together() -> None:
    # What the handler does when the region's production time is zero: both, in turn.
    assert decide_all([start(), finish()], given(*IMPORTED).state, CONTEXT) == [
        started(), *reissued()]


def test_the_same_approval_twice_starts_nothing_new() -> None:
    given(*PRODUCING).when(start()).then()
    given(*READY).when(start()).then()
    given(*COLLECTED).when(start()).then()


def test_a_finished_production_does_not_fire_twice() -> None:
    given(*READY).when(finish(new="S44030000000003")).then()


def test_a_timer_for_an_unknown_production_decides_nothing() -> None:
    given(*PRODUCING).when(finish(app="app-unknown")).then()


def test_another_approval_while_a_card_is_in_production_is_refused() -> None:
    given(*PRODUCING).when(start(app="app-2")).then_refused(ProductionInProgressError)


def test_a_second_reissue_after_collection_starts_from_the_collected_card() -> None:
    given(*COLLECTED, started(app="app-2")).when(finish(app="app-2", new="S44030000000003")) \
        .then(*reissued(app="app-2", new="S44030000000003", old=NEW))


def test_an_approval_for_a_card_never_imported_adopts_the_legacy_card_first() -> None:
    given().when(start()).then(CardIssued(card_no=OLD, imported=True), started())
    given(CardIssued(card_no=OLD), started()).when(finish()).then(*reissued(old=OLD))


def test_an_approval_without_any_known_card_reissues_without_an_old_one() -> None:
    given().when(start(old=None)).then(started())
    given(started()).when(finish()).then(*reissued(old=None))


# --- collection ----------------------------------------------------------------------------


def test_the_holder_collects_the_ready_card_with_their_own_id() -> None:
    given(*READY).when(hand_over()).then(BY_HOLDER)


def test_after_collection_the_citizen_holds_the_new_card() -> None:
    assert given(*COLLECTED).state == Active(card_no=NEW, done=frozenset({APP}))


def test_a_proxy_with_an_authorisation_collects_and_their_particulars_stay_encrypted() -> None:
    given(*READY).when(hand_over(proxy=proxy())).then(CardCollected(
        application_id=APP, bureau_id=BUREAU, card_no=NEW, by_proxy=True, collected_by="proxy",
        proxy_id_number="enc:v1:aWQ=", proxy_name="enc:v1:bmFtZQ==",
        authorisation_ref="letter-2025-001",
    ))


def test_a_proxy_without_an_authorisation_is_refused() -> None:
    given(*READY).when(hand_over(proxy=proxy(authorisation="   "))).then_refused(
        AuthorisationRequiredError)


def test_a_proxy_whose_id_number_fails_the_checksum_is_refused() -> None:
    given(*READY).when(hand_over(proxy=proxy(ref=None))).then_refused(InvalidIdNumberError)


def test_the_holder_cannot_be_their_own_proxy() -> None:
    given(*READY).when(hand_over(proxy=proxy(ref=HOLDER))).then_refused(ProxyIsHolderError)


def test_a_proxy_must_still_present_the_holders_id_number() -> None:
    given(*READY).when(hand_over(presented=OTHER, proxy=proxy())).then_refused(IdMismatchError)


def test_someone_elses_id_number_does_not_collect_the_card() -> None:
    given(*READY).when(hand_over(presented=OTHER)).then_refused(IdMismatchError)


def test_a_presented_id_number_with_a_bad_checksum_is_refused() -> None:
    given(*READY).when(hand_over(presented=None)).then_refused(InvalidIdNumberError)


def test_collecting_at_another_bureau_is_refused() -> None:
    given(*READY).when(hand_over(bureau="bureau-nanshan")).then_refused(WrongBureauError)


def test_a_channel_serving_the_bureau_hands_the_card_over() -> None:
    given(*READY).when(hand_over(served=(BUREAU, "bureau-nanshan"))).then(BY_HOLDER)


def test_a_channel_restricted_to_another_bureau_cannot_hand_the_card_over() -> None:
    # Naming its own bureau (where the card is not) or the card's (which it does not serve).
    given(*READY).when(hand_over(served=("bureau-nanshan",))).then_refused(BureauNotServedError)
    given(*READY).when(hand_over(bureau="bureau-nanshan", served=("bureau-nanshan",))) \
        .then_refused(BureauNotServedError)


def test_another_bureau_learns_nothing_of_a_card_still_in_production() -> None:
    given(*PRODUCING).when(hand_over(bureau="bureau-nanshan", served=("bureau-nanshan",))) \
        .then_refused(BureauNotServedError)


def test_collecting_a_card_still_in_production_is_refused() -> None:
    given(*PRODUCING).when(hand_over()).then_refused(NotReadyForPickupError)


def test_collecting_twice_is_refused() -> None:
    given(*COLLECTED).when(hand_over()).then_refused(AlreadyCollectedError)


def test_collecting_for_an_application_the_card_does_not_know_is_refused() -> None:
    given(*READY).when(hand_over(app="app-unknown")).then_refused(UnknownApplicationError)
    given(*IMPORTED).when(hand_over()).then_refused(UnknownApplicationError)


# --- erasure -------------------------------------------------------------------------------


def test_nothing_is_decided_for_an_erased_citizen() -> None:
    given(*IMPORTED, ERASED).when(start()).then_refused(SubjectErasedError)
    given(*IMPORTED, ERASED).when(RecordImportedCard(OLD)).then_refused(SubjectErasedError)


def test_an_erased_citizens_ready_card_is_not_handed_over() -> None:
    given(*READY, ERASED).when(hand_over()).then_refused(SubjectErasedError)
    given(*READY, ERASED).when(hand_over(proxy=proxy())).then_refused(SubjectErasedError)


def test_erasing_a_card_stream_twice_records_subject_erased_once() -> None:
    assert decide_erasure(DECIDER.is_erased(given(*READY).state), "r") == [
        SubjectErased(reason="r")]
    assert decide_erasure(DECIDER.is_erased(given(*READY, ERASED).state), "r") == []


# --- card numbers --------------------------------------------------------------------------


def test_new_card_numbers_carry_the_prefix_and_region_code() -> None:
    assert format_card_no("S", "440300", 42, 8) == "S44030000000042"
