"""Journeys through the real Kafka, every service a process of its own, each ending with the
status API showing the right row."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from cardctl.channel import ChannelSimulator
from cardctl.citizens import SyntheticCitizen, face_embedding
from cardctl.journey import Journey, Session
from cardctl.operations import seed
from shared.commands import Reply
from shared.masking import mask_card_no
from shared.settings import CardDeskSettings
from shared.tokens import SessionClaims, TokenSigner
from shared.topics import SERVICES
from tests.support import BUREAU_CHANNEL, CITIZEN_CHANNEL

pytestmark = pytest.mark.integration


async def refused(sim: ChannelSimulator, service: str, command: str, payload: dict[str, object],
                  *, channel: str = CITIZEN_CHANNEL) -> Reply:
    reply = await sim.send(service, command, payload, channel_id=channel)
    assert reply.status == "rejected", reply
    return reply


async def test_the_whole_happy_path_ends_active_with_a_new_card_and_the_old_one_invalid(
    journey: Journey, citizen: SyntheticCitizen,
) -> None:
    session = Session(citizen)
    await journey.whole(session)

    timeline = await journey.wait_for_timeline(
        session.citizen_ref, "CardIssued", "SessionStarted", "ElectronicCardAuthorized",
        "LossReported", "ReissueApplied", "ReviewApproved", "CardProductionStarted",
        "CardReissued", "CardReadyForPickup", "CardCollected", "LossClosed")
    row = await journey.wait_for_status(session.citizen_ref, "ACTIVE")
    assert row["e_card_status"] == "ACTIVE"
    assert row["card_no_masked"] != mask_card_no(citizen.card_no)
    reissued = next(e for e in timeline if e["type"] == "CardReissued")
    assert mask_card_no(citizen.card_no)[-4:] in reissued["description"]  # the old card named
    assert [e["seq"] for e in timeline] == list(range(1, len(timeline) + 1))


async def test_a_temporary_loss_expires_by_itself_and_the_card_is_active_again(
    journey: Journey, logged_in: Session,
) -> None:
    await journey.report_loss(logged_in, "temporary")
    row = await journey.wait_for_status(logged_in.citizen_ref, "TEMP_LOST")
    assert row["loss_kind"] == "temporary"
    assert row["loss_expires_at"] is not None

    await journey.wait_for_timeline(logged_in.citizen_ref, "TemporaryLossExpired")
    row = await journey.wait_for_status(logged_in.citizen_ref, "ACTIVE", timeout_s=30)
    assert row["loss_kind"] is None


async def test_a_temporary_loss_made_formal_is_lost_and_no_longer_expires(
    journey: Journey, logged_in: Session,
) -> None:
    await journey.report_loss(logged_in, "temporary")
    await journey.wait_for_status(logged_in.citizen_ref, "TEMP_LOST")
    await journey.verify_portrait(logged_in)
    await journey.report_loss(logged_in, "formal")
    row = await journey.wait_for_status(logged_in.citizen_ref, "LOST")
    assert row["e_card_status"] == "UNAVAILABLE"

    await asyncio.sleep(6)  # past the temporary period of this test region
    assert (await journey.card(logged_in.citizen_ref) or {})["status"] == "LOST"


async def test_cancelling_before_applying_succeeds(journey: Journey, logged_in: Session) -> None:
    await journey.verify_portrait(logged_in)
    await journey.report_loss(logged_in, "formal")
    await journey.wait_for_status(logged_in.citizen_ref, "LOST")
    await journey.sim.expect_accepted("loss", "CancelLoss", {"session_token": logged_in.token},
                                      channel_id=CITIZEN_CHANNEL)
    row = await journey.wait_for_status(logged_in.citizen_ref, "ACTIVE")
    assert row["loss_kind"] is None


async def test_cancelling_after_applying_is_refused_and_nothing_changes(
    journey: Journey, logged_in: Session,
) -> None:
    await journey.verify_portrait(logged_in)
    await journey.report_loss(logged_in, "formal")
    await journey.apply_for_reissue(logged_in)
    await journey.wait_for_status(logged_in.citizen_ref, "REISSUE_APPLIED")

    async def cancel_refused() -> Reply:
        reply = await journey.sim.send("loss", "CancelLoss", {"session_token": logged_in.token},
                                       channel_id=CITIZEN_CHANNEL)
        assert reply.status == "rejected"
        return reply

    reply = await cancel_refused()
    for _ in range(50):  # loss learns of the application from review.events
        if reply.code == "reissue_in_progress":
            break
        await asyncio.sleep(0.2)
        reply = await cancel_refused()
    assert reply.code == "reissue_in_progress"
    row = await journey.card(logged_in.citizen_ref)
    assert row is not None
    assert row["status"] == "REISSUE_APPLIED"


async def test_a_rejected_application_is_resubmitted_and_approved(
    journey: Journey, logged_in: Session,
) -> None:
    await journey.verify_portrait(logged_in)
    await journey.report_loss(logged_in, "formal")
    await journey.apply_for_reissue(logged_in)
    first = logged_in.application_id
    await journey.sim.expect_accepted("review", "DecideReview", {
        "application_id": first, "reviewer_id": "reviewer-1", "decision": "reject",
        "reason": "photo unclear"}, channel_id=BUREAU_CHANNEL,
        retry_codes=frozenset({"unknown_application"}))
    row = await journey.wait_for_status(logged_in.citizen_ref, "REISSUE_REJECTED")
    assert row["application_status"] == "rejected"

    await journey.apply_for_reissue(logged_in)
    assert logged_in.application_id != first
    await journey.approve(logged_in)
    row = await journey.wait_for_status(logged_in.citizen_ref, "READY_FOR_PICKUP")
    assert row["application_id"] == logged_in.application_id


async def test_three_wrong_faces_lock_portrait_and_a_fourth_try_is_refused_with_the_right_face(
    journey: Journey, logged_in: Session,
) -> None:
    stranger = face_embedding(random.Random(99))
    codes = []
    for _ in range(3):
        reply = await journey.sim.send("auth", "VerifyPortrait", {
            "session_token": logged_in.token, "liveness_score": 0.99,
            "face_embedding": stranger}, channel_id=CITIZEN_CHANNEL)
        codes.append(reply.code)
    assert codes == ["face_mismatch", "face_mismatch", "portrait_locked"]
    reply = await journey.sim.send("auth", "VerifyPortrait", {
        "session_token": logged_in.token, "liveness_score": 0.99,
        "face_embedding": logged_in.citizen.face_embedding}, channel_id=CITIZEN_CHANNEL)
    assert (reply.status, reply.code) == ("rejected", "portrait_locked")
    # Without a portrait verification a formal loss cannot be reported.
    reply = await journey.sim.send("loss", "ReportLoss", {
        "session_token": logged_in.token, "kind": "formal"}, channel_id=CITIZEN_CHANNEL)
    assert reply.code == "portrait_required"
    assert (await journey.card(logged_in.citizen_ref) or {})["status"] == "ACTIVE"


def _forge_citizen(token: str, other_ref: str) -> str:
    body, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["citizen_ref"] = other_ref
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{forged}.{signature}"


async def test_forged_unknown_unauthorised_expired_and_invalid_requests_are_refused_with_their_code(
    journey: Journey, logged_in: Session, other_citizen: SyntheticCitizen,
    settings: CardDeskSettings,
) -> None:
    sim = journey.sim
    other = Session(other_citizen)
    await journey.log_in(other)
    await journey.wait_for_status(other.citizen_ref, "ACTIVE")
    timeline_before = await journey.timeline(other.citizen_ref)

    payload = {"session_token": logged_in.token, "kind": "temporary"}
    request_id = str(uuid.uuid4())
    value = sim.envelope(CITIZEN_CHANNEL, "ReportLoss", payload, request_id)
    # Failing authentication earns no reply (only a DLQ entry): its sender is unknown.
    with pytest.raises(TimeoutError):
        await sim.send_raw("loss.commands", value, channel_id=CITIZEN_CHANNEL, key=b"k",
                           signature="ab" * 32, request_id=request_id, timeout_s=3.0)

    request_id = str(uuid.uuid4())
    value = sim.envelope("pirate-channel", "ReportLoss", payload, request_id)
    with pytest.raises(TimeoutError):
        await sim.send_raw("loss.commands", value, channel_id="pirate-channel", key=b"k",
                           request_id=request_id, timeout_s=3.0)

    not_bureau = await refused(sim, "review", "DecideReview", {
        "application_id": str(uuid.uuid4()), "reviewer_id": "r", "decision": "approve",
        "reason": ""})
    assert not_bureau.code == "bureau_only"

    a_on_b = await refused(sim, "loss", "ReportLoss", {
        "session_token": _forge_citizen(logged_in.token, other.citizen_ref), "kind": "temporary"})
    assert a_on_b.code == "invalid_session"

    now = datetime.now(UTC)
    expired_token = TokenSigner.from_settings(settings).sign(
        SessionClaims(kid="", session_id="s", citizen_ref=other.citizen_ref,
                      channel=CITIZEN_CHANNEL, level="portrait",
                      portrait_verified_at=now - timedelta(hours=2),
                      issued_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1)))
    expired = await refused(sim, "loss", "ReportLoss",
                            {"session_token": expired_token, "kind": "temporary"})
    assert expired.code == "session_expired"

    captcha = (await sim.expect_accepted("auth", "IssueCaptcha", {},
                                         channel_id=CITIZEN_CHANNEL)).data
    bad_id = other_citizen.id_number[:17] + ("0" if other_citizen.id_number[17] != "0" else "1")
    bad_checksum = await refused(sim, "auth", "StartSession", {
        "id_number": bad_id, "name": other_citizen.name,
        "captcha_id": captcha["captcha_id"], "captcha_code": captcha["code"]})
    assert bad_checksum.code == "invalid_id_number"

    captcha = (await sim.expect_accepted("auth", "IssueCaptcha", {},
                                         channel_id=CITIZEN_CHANNEL)).data
    login = {"id_number": other_citizen.id_number, "name": other_citizen.name,
             "captcha_id": captcha["captcha_id"], "captcha_code": captcha["code"]}
    await sim.expect_accepted("auth", "StartSession", login, channel_id=CITIZEN_CHANNEL)
    reused = await refused(sim, "auth", "StartSession", login)
    assert reused.code == "captcha_used"

    await asyncio.sleep(1.0)  # anything wrongly accepted would have reached the projection
    after = await journey.timeline(other.citizen_ref)
    assert [e["type"] for e in after] == [e["type"] for e in timeline_before] + [
        "SessionStarted", "IdentityVerified"]  # only the one legitimate login
    assert (await journey.card(other.citizen_ref) or {})["status"] == "ACTIVE"
    assert (await journey.card(logged_in.citizen_ref) or {})["status"] == "ACTIVE"


async def test_the_same_request_sent_twice_has_one_effect_and_identical_replies(
    journey: Journey, logged_in: Session,
) -> None:
    request_id = str(uuid.uuid4())
    payload = {"session_token": logged_in.token, "kind": "temporary"}
    first = await journey.sim.send("loss", "ReportLoss", payload, channel_id=CITIZEN_CHANNEL,
                                   request_id=request_id, session_key=logged_in.key)
    second = await journey.sim.send("loss", "ReportLoss", payload, channel_id=CITIZEN_CHANNEL,
                                    request_id=request_id, session_key=logged_in.key)
    assert first.status == "accepted"
    assert first == second
    await journey.wait_for_status(logged_in.citizen_ref, "TEMP_LOST")
    await asyncio.sleep(1.0)
    types = [e["type"] for e in await journey.timeline(logged_in.citizen_ref)]
    assert types.count("LossReported") == 1


async def _ready_for_pickup(journey: Journey, session: Session) -> None:
    await journey.log_in(session)
    await journey.verify_portrait(session)
    await journey.report_loss(session, "formal")
    await journey.apply_for_reissue(session)
    await journey.approve(session)
    await journey.wait_for_status(session.citizen_ref, "READY_FOR_PICKUP")


async def test_a_proxy_collects_only_with_a_valid_authorisation(
    journey: Journey, citizen: SyntheticCitizen, other_citizen: SyntheticCitizen,
) -> None:
    session = Session(citizen)
    await _ready_for_pickup(journey, session)
    base = {"application_id": session.application_id, "bureau_id": "bureau-001",
            "presented_id_number": citizen.id_number}
    proxy = {"id_number": other_citizen.id_number, "name": other_citizen.name}

    without = await refused(journey.sim, "issuance", "CollectCard",
                            {**base, "proxy": {**proxy, "authorisation_ref": "   "}},
                            channel=BUREAU_CHANNEL)
    assert without.code == "authorisation_required"
    wrong_holder = await refused(journey.sim, "issuance", "CollectCard",
                                 {**base, "presented_id_number": other_citizen.id_number,
                                  "proxy": {**proxy, "authorisation_ref": "letter-1"}},
                                 channel=BUREAU_CHANNEL)
    assert wrong_holder.code == "id_mismatch"
    assert (await journey.card(session.citizen_ref) or {})["status"] == "READY_FOR_PICKUP"

    await journey.sim.expect_accepted("issuance", "CollectCard",
                                      {**base, "proxy": {**proxy, "authorisation_ref": "letter-1"}},
                                      channel_id=BUREAU_CHANNEL)
    row = await journey.wait_for_status(session.citizen_ref, "ACTIVE")
    assert row["e_card_status"] == "ACTIVE"


async def test_two_hundred_citizens_go_through_the_journey_concurrently_and_all_end_active(
    journey: Journey, settings: CardDeskSettings, tmp_path: Path,
) -> None:
    citizens = await seed(settings, 200, tmp_path / "many.jsonl", report=lambda _: None)
    sessions = [Session(c) for c in citizens]
    gate = asyncio.Semaphore(50)

    async def one(session: Session) -> None:
        async with gate:
            await journey.whole(session)

    outcomes = await asyncio.gather(*(one(s) for s in sessions), return_exceptions=True)
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert failures == [], failures[:3]
    conn = await asyncpg.connect(settings.database_url)
    try:
        for session in sessions:
            row = await journey.wait_for_status(session.citizen_ref, "ACTIVE", timeout_s=120)
            assert row["card_no_masked"] != mask_card_no(session.citizen.card_no)
            # Each topic's last event of the journey: the rest of a topic came before it.
            timeline = await journey.wait_for_timeline(
                session.citizen_ref, "IdentityVerified", "IdentityVerified", "ReviewApproved",
                "LossClosed", "CardCollected")
            assert [e["seq"] for e in timeline] == list(range(1, len(timeline) + 1))
            # Gapless: every event the services stored for this citizen is in the timeline,
            # and every stream's versions run 1..n.
            stored = await conn.fetch(
                " UNION ALL ".join(
                    f"SELECT stream_id, version, event_id FROM {schema}.events"
                    " WHERE citizen_ref = $1" for schema in SERVICES),
                session.citizen_ref)
            assert sorted(str(r["event_id"]) for r in stored) == sorted(
                e["event_id"] for e in timeline)
            versions: dict[str, list[int]] = {}
            for r in sorted(stored, key=lambda r: (r["stream_id"], r["version"])):
                versions.setdefault(r["stream_id"], []).append(r["version"])
            assert all(v == list(range(1, len(v) + 1)) for v in versions.values())
    finally:
        await conn.close()
