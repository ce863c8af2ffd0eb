"""`cardctl erase REF`: crypto-shred a citizen in every service that holds their data.

Each service owns its data keys and streams, so the erasure is one `EraseSubject` command
per command topic, sent from a bureau channel (`--channel`, default the channels file's
first); each service destroys the citizen's key in
its own vault and records `SubjectErased`. Repeating it is harmless.
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

import typer
import uvloop
from rich.console import Console
from rich.table import Table

from cardctl.channel import ChannelChoiceError, ChannelSimulator, pick_channel
from shared.channels import ChannelRegistry
from shared.commands import Reply
from shared.contracts.common import CITIZEN_REF_PATTERN
from shared.identity import citizen_ref, is_valid_id_number
from shared.settings import CardDeskSettings
from shared.topics import SERVICES

console = Console()

DEFAULT_REASON = "data subject request"


async def erase(settings: CardDeskSettings, ref: str, reason: str, *,
                timeout_s: float = 30.0, channel: str | None = None) -> dict[str, Reply | None]:
    """Each service's reply to `EraseSubject` (None when it did not answer in time)."""
    payload = {"citizen_ref": ref, "reason": reason}
    bureau = pick_channel(ChannelRegistry.from_file(settings.channels_file), channel,
                          bureau=True).channel_id
    async with ChannelSimulator.for_settings(settings) as sim:

        async def one(service: str) -> Reply | None:
            try:
                return await sim.send(service, "EraseSubject", payload,
                                      channel_id=bureau, timeout_s=timeout_s)
            except TimeoutError:
                return None

        replies = await asyncio.gather(*(one(service) for service in SERVICES))
    return dict(zip(SERVICES, replies, strict=True))


def _ref_of(citizen: str, settings: CardDeskSettings) -> str:
    """A citizen_ref as given, or computed from an ID number (never printed back)."""
    if is_valid_id_number(citizen):
        return citizen_ref(settings.citizen_ref_pepper.get_secret_value(), citizen)
    return citizen.strip().lower()


def _outcome(reply: Reply | None) -> tuple[str, str]:
    if reply is None:
        return "[red]no reply[/]", "the service did not answer in time"
    if reply.status == "rejected":
        return f"[red]{reply.code}[/]", reply.message
    if reply.data.get("already_erased"):
        return "[green]erased[/]", "already erased before; nothing changed"
    return "[green]erased[/]", "data key destroyed, SubjectErased recorded"


def erase_command(
    citizen: Annotated[str, typer.Argument(help="citizen_ref, or an ID number")],
    reason: Annotated[str, typer.Option("--reason", help="Recorded in SubjectErased.")] = (
        DEFAULT_REASON),
    channel: Annotated[str | None, typer.Option(
        "--channel", help="The bureau channel to act as (default: the first in the file).",
    )] = None,
) -> None:
    """Erase a citizen (crypto-shredding): every service destroys their data key."""
    settings = CardDeskSettings()
    ref = _ref_of(citizen, settings)
    if not re.fullmatch(CITIZEN_REF_PATTERN, ref):
        console.print("[red]not a citizen_ref (64 hex digits) nor a valid ID number[/]")
        raise typer.Exit(2)
    try:
        replies = uvloop.run(erase(settings, ref, reason.strip() or DEFAULT_REASON,
                                   channel=channel))
    except ChannelChoiceError as error:
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2) from error
    table = Table("service", "outcome", "detail", title=f"erasure of {ref[:12]}…")
    for service, reply in replies.items():
        table.add_row(service, *_outcome(reply))
    console.print(table)
    if any(reply is None or reply.status != "accepted" for reply in replies.values()):
        console.print("[red]the erasure is incomplete; run it again once every service answers[/]")
        raise typer.Exit(1)
    console.print("erased in every service")
