"""What `cardctl seed` and `cardctl demo` do, as plain async functions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from cardctl.channel import ChannelSimulator, pick_channel
from cardctl.citizens import SyntheticCitizen, generate
from cardctl.journey import Journey, Session
from services.auth.adapters import enroll_all, enrolled
from services.auth.settings import AuthSettings
from shared.channels import ChannelRegistry
from shared.settings import CardDeskSettings

Report = Callable[[str], None]


def status_url(settings: CardDeskSettings) -> str:
    return f"http://{settings.http_host}:{settings.http_port}"


async def seed(
    settings: CardDeskSettings, count: int, out: Path, *, seed_value: int | None = None,
    concurrency: int = 50, report: Report = print, channel: str | None = None,
) -> list[SyntheticCitizen]:
    """Enrol `count` synthetic citizens in the registry, import their first cards through
    `issuance.commands` as the bureau `channel` (default: the channels file's first), and
    write them to `out` as JSON lines for a channel simulator."""
    bureau = pick_channel(ChannelRegistry.from_file(settings.channels_file), channel,
                          bureau=True).channel_id
    auth_settings = AuthSettings()
    conn = await asyncpg.connect(settings.database_url)
    try:
        # An ID number drawn before (on an earlier seed of this stack) belongs to a citizen
        # who already holds a card: enrolling again would overwrite them, and importing a
        # new card for them is refused. Draw more and keep the first `count` new ones.
        drawn = generate(2 * count + 16, seed_value)
        taken = await enrolled(conn, [c.id_number for c in drawn], auth_settings)
        citizens = [c for c in drawn if c.id_number not in taken][:count]
        if len(citizens) < count:
            raise RuntimeError(f"only {len(citizens)} of {count} drawn ID numbers are new")
        async with conn.transaction():
            await enroll_all(conn, [(c.id_number, c.name, c.face_embedding) for c in citizens],
                             auth_settings)
    finally:
        await conn.close()
    report(f"registry: {count} citizens enrolled with a face template")

    gate = asyncio.Semaphore(concurrency)
    async with ChannelSimulator.for_settings(settings) as sim:

        async def import_card(citizen: SyntheticCitizen) -> None:
            async with gate:
                await sim.expect_accepted(
                    "issuance", "ImportCard",
                    {"id_number": citizen.id_number, "card_no": citizen.card_no},
                    channel_id=bureau,
                )

        await asyncio.gather(*(import_card(c) for c in citizens))
    report(f"issuance: {count} initial cards imported (CardIssued)")

    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for citizen in citizens:
            handle.write(json.dumps(citizen.as_json(), ensure_ascii=False) + "\n")
    report(f"wrote {out}")
    return citizens


def load_citizens(path: Path) -> list[SyntheticCitizen]:
    citizens = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            raw = json.loads(line)
            citizens.append(SyntheticCitizen(raw["id_number"], raw["name"],
                                             raw["face_embedding"], raw["card_no"]))
    return citizens


async def demo(settings: CardDeskSettings, citizen: SyntheticCitizen, report: Report = print,
               *, channel: str | None = None, bureau_channel: str | None = None,
               ) -> tuple[Session, dict[str, Any], list[dict[str, Any]]]:
    """One citizen from captcha to a collected new card, as a channel drives it (and a
    bureau channel reviews and hands over the card)."""
    channels = ChannelRegistry.from_file(settings.channels_file)
    citizen_channel = pick_channel(channels, channel, bureau=False).channel_id
    bureau = pick_channel(channels, bureau_channel, bureau=True).channel_id
    async with ChannelSimulator.for_settings(settings) as sim:
        journey = Journey(sim, status_url(settings), citizen_channel=citizen_channel,
                          bureau_channel=bureau)
        session = Session(citizen)
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("captcha + login (real name)", lambda: journey.log_in(session)),
            ("authorise the electronic card", lambda: journey.authorize_e_card(session)),
            ("portrait verification", lambda: journey.verify_portrait(session)),
            ("formal loss report", lambda: journey.report_loss(session, "formal")),
            ("reissue application", lambda: journey.apply_for_reissue(session)),
            ("bureau review: approve", lambda: journey.approve(session)),
        ]
        for label, step in steps:
            await step()
            report(f"✔ {label}")
        await journey.wait_for_status(session.citizen_ref, "READY_FOR_PICKUP")
        report("✔ card produced, new number assigned, ready for pickup")
        await journey.collect(session)
        row = await journey.wait_for_status(session.citizen_ref, "ACTIVE")
        report("✔ collected at the bureau with the ID card")
        # The status service follows four topics; wait until each has delivered its last
        # event of the journey (a topic's events arrive in order, so the rest came before).
        timeline = await journey.wait_for_timeline(
            session.citizen_ref, "IdentityVerified", "IdentityVerified", "LossClosed",
            "ReviewApproved", "CardCollected")
        return session, await journey.card(session.citizen_ref) or row, timeline
