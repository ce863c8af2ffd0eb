"""Erasure end to end: after `cardctl erase`, no service can read the citizen's personal data,
every hash chain still verifies, the status shows the record closed (and the auditor's replay
agrees with it), and nothing more is done for them."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from cardctl.audit import replay_log
from cardctl.citizens import SyntheticCitizen
from cardctl.journey import Journey, Session
from cardctl.main import app
from services.status.projection import ERASED
from services.status.settings import StatusSettings
from shared.crypto import PREFIX, DataKeyDestroyedError, Vault
from shared.envelope import EventEnvelope, verify_stream
from shared.settings import CardDeskSettings
from shared.topics import SERVICES
from tests.support import BUREAU_CHANNEL, CITIZEN_CHANNEL, kafka_options

pytestmark = pytest.mark.integration

STREAM_PREFIX = {"auth": "auth", "loss": "loss", "review": "review", "issuance": "card"}


async def cardctl_erase(*args: str) -> Result:
    """`cardctl erase ...` as an operator runs it (in a thread: it runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, ["erase", *args])


async def stored_events(conn: asyncpg.Connection, ref: str) -> dict[str, list[dict[str, Any]]]:
    """Every stored event body of the citizen, per schema, in stream order."""
    bodies: dict[str, list[dict[str, Any]]] = {}
    for schema in SERVICES:
        rows = await conn.fetch(f"SELECT body FROM {schema}.events WHERE citizen_ref = $1"
                                " ORDER BY stream_id, version", ref)
        bodies[schema] = [EventEnvelope.model_validate_json(r["body"]).to_json_dict()
                          for r in rows]
    return bodies


def encrypted_fields(bodies: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """(schema, field, ciphertext) of every encrypted value in the citizen's events."""
    return [(schema, f"{body['type']}.{name}", value)
            for schema, events in bodies.items() for body in events
            for name, value in body["data"].items()
            if isinstance(value, str) and value.startswith(PREFIX)]


async def registry_fields(conn: asyncpg.Connection, ref: str) -> list[tuple[str, str, str]]:
    row = await conn.fetchrow("SELECT name_enc, face_template_enc FROM auth.registry"
                              " WHERE citizen_ref = $1", ref)
    assert row is not None
    return [("auth", "registry.name", row["name_enc"]),
            ("auth", "registry.face_template", row["face_template_enc"])]


async def readable(conn: asyncpg.Connection, settings: CardDeskSettings, ref: str,
                   fields: list[tuple[str, str, str]]) -> dict[str, bool]:
    """For each field, whether its service's vault still decrypts it."""
    master = settings.master_key.get_secret_value()
    outcome: dict[str, bool] = {}
    for schema, name, ciphertext in fields:
        try:
            await Vault(schema, master).decrypt(conn, ref, ciphertext)
            outcome[f"{schema}:{name}"] = True
        except DataKeyDestroyedError:
            outcome[f"{schema}:{name}"] = False
    return outcome


def chain_breaks(bodies: dict[str, list[dict[str, Any]]]) -> list[object]:
    streams: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for events in bodies.values():
        for body in events:
            streams[body["stream_id"]].append(body)
    return [b for stream_id, events in streams.items() for b in verify_stream(stream_id, events)]


async def collected_by_proxy(journey: Journey, session: Session, proxy: SyntheticCitizen) -> None:
    await journey.log_in(session)
    await journey.verify_portrait(session)
    await journey.report_loss(session, "formal")
    await journey.apply_for_reissue(session)
    await journey.approve(session)
    await journey.wait_for_status(session.citizen_ref, "READY_FOR_PICKUP")
    await journey.sim.expect_accepted("issuance", "CollectCard", {
        "application_id": session.application_id, "bureau_id": "bureau-001",
        "presented_id_number": session.citizen.id_number,
        "proxy": {"id_number": proxy.id_number, "name": proxy.name,
                  "authorisation_ref": "letter-erasure-1"},
    }, channel_id=BUREAU_CHANNEL)
    await journey.wait_for_timeline(session.citizen_ref, "CardCollected", "LossClosed")
    await journey.wait_for_status(session.citizen_ref, "ACTIVE")


async def test_an_erased_citizen_is_unreadable_everywhere_yet_every_chain_still_verifies(
    journey: Journey, citizen: SyntheticCitizen, other_citizen: SyntheticCitizen,
    settings: CardDeskSettings,
) -> None:
    session = Session(citizen)
    await collected_by_proxy(journey, session, other_citizen)
    ref = session.citizen_ref
    conn = await asyncpg.connect(settings.database_url)
    try:
        before = await stored_events(conn, ref)
        fields = encrypted_fields(before) + await registry_fields(conn, ref)
        assert {name for _, name, _ in fields} >= {
            "ReissueApplied.address", "ReissueApplied.phone", "ReissueApplied.photo_ref",
            "CardCollected.proxy_id_number", "CardCollected.proxy_name"}
        assert all((await readable(conn, settings, ref, fields)).values())

        result = await cardctl_erase(ref, "--reason", "citizen asked to be forgotten")
        assert result.exit_code == 0, result.output
        assert citizen.id_number not in result.output

        after = await stored_events(conn, ref)
        # Nothing stored was rewritten: each stream only gained its SubjectErased.
        for schema in SERVICES:
            assert after[schema][: len(before[schema])] == before[schema]
            erasures = [b for b in after[schema] if b["type"] == "SubjectErased"]
            assert [b["stream_id"] for b in erasures] == [f"{STREAM_PREFIX[schema]}-{ref}"]
            assert erasures[0]["data"] == {"reason": "citizen asked to be forgotten"}
        assert chain_breaks(after) == []
        assert not any((await readable(conn, settings, ref, fields)).values())

        row = await journey.wait_for_status(ref, "CANCELLED")
        assert (row["card_no_masked"], row["pickup_bureau"]) == (ERASED, ERASED)
        timeline = await journey.wait_for_timeline(ref, "SubjectErased")
        lines = {e["type"]: e["description"] for e in timeline}
        assert "erased" in lines["ReissueApplied"]
        assert "erased" in lines["CardCollected"]
        assert "proxy" not in lines["CardCollected"]

        # The auditor's replay of the log lists the erased timeline exactly as the live API.
        await journey.wait_for_timeline(ref, *["SubjectErased"] * len(SERVICES))
        status_settings = StatusSettings()
        report = await replay_log(status_settings.kafka_bootstrap, settings.database_url,
                                  schema=status_settings.status_schema, citizen=ref,
                                  security=kafka_options())
        assert report.agreed == [ref], [d.describe() for d in report.differences]

        again = await cardctl_erase(ref)
        assert again.exit_code == 0, again.output
        assert "already erased" in again.output
        assert await stored_events(conn, ref) == after
    finally:
        await conn.close()


async def test_after_erasure_every_service_refuses_the_citizen_with_subject_erased(
    journey: Journey, logged_in: Session,
) -> None:
    await journey.verify_portrait(logged_in)
    assert (await cardctl_erase(logged_in.citizen_ref)).exit_code == 0
    sim, token = journey.sim, logged_in.token

    captcha = (await sim.expect_accepted("auth", "IssueCaptcha", {},
                                         channel_id=CITIZEN_CHANNEL)).data
    login = await sim.send("auth", "StartSession", {
        "id_number": logged_in.citizen.id_number, "name": logged_in.citizen.name,
        "captcha_id": captcha["captcha_id"], "captcha_code": captcha["code"],
    }, channel_id=CITIZEN_CHANNEL)
    loss = await sim.send("loss", "ReportLoss", {"session_token": token, "kind": "formal"},
                          channel_id=CITIZEN_CHANNEL)
    reissue = await sim.send("review", "SubmitReissueApplication", {
        "session_token": token, "address": logged_in.citizen.address,
        "phone": logged_in.citizen.phone, "photo_ref": logged_in.citizen.photo_ref,
        "pickup_bureau": "bureau-001"}, channel_id=CITIZEN_CHANNEL)
    portrait = await sim.send("auth", "VerifyPortrait", {
        "session_token": token, "liveness_score": 0.99,
        "face_embedding": logged_in.citizen.face_embedding}, channel_id=CITIZEN_CHANNEL)

    assert [(r.status, r.code) for r in (login, loss, reissue, portrait)] == [
        ("rejected", "subject_erased")] * 4
    await journey.wait_for_status(logged_in.citizen_ref, "CANCELLED")


async def test_only_a_bureau_channel_may_erase(journey: Journey, logged_in: Session) -> None:
    reply = await journey.sim.send("auth", "EraseSubject", {
        "citizen_ref": logged_in.citizen_ref, "reason": "not allowed"},
        channel_id=CITIZEN_CHANNEL)
    assert (reply.status, reply.code) == ("rejected", "bureau_only")
    row = await journey.card(logged_in.citizen_ref)
    assert row is not None
    assert row["status"] == "ACTIVE"
