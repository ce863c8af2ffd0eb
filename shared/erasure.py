"""Crypto-shredding erasure: the one `EraseSubject` handler every service's routes table uses.

Each service owns its data keys and its streams, so each erases the citizen for itself: in
one transaction it destroys the citizen's data key in its own vault and appends
`SubjectErased` to the citizen's stream. Nothing stored is rewritten, so every hash chain
still verifies; the ciphertexts simply no longer open. Erasing again changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from shared.application import Streams
from shared.commands import CommandContext, CommandRoute
from shared.contracts.common import EraseSubject, SubjectErased
from shared.crypto import Vault
from shared.events import DomainEvent, EventMeta

log = structlog.get_logger()


def decide_erasure(already_erased: bool, reason: str) -> list[DomainEvent]:
    """Pure: the first erasure is recorded, a repeated one changes nothing."""
    return [] if already_erased else [SubjectErased(reason=reason)]


@dataclass(frozen=True, slots=True)
class Erasure:
    """How one service forgets a citizen: its streams, and the vault holding its data keys."""

    streams: Streams[Any, Any, Any, Any]
    vault: Vault
    # Service-local clean-up in the same transaction (e.g. void pending timers).
    on_erased: Callable[[asyncpg.Connection, str], Awaitable[None]] | None = None

    async def erase(
        self, conn: asyncpg.Connection, ctx: CommandContext, command: EraseSubject
    ) -> dict[str, Any]:
        ref = command.citizen_ref
        structlog.contextvars.bind_contextvars(citizen_ref=ref)
        is_erased = self.streams.decider.is_erased
        appended = await self.streams.apply(
            conn, lambda state: decide_erasure(is_erased(state), command.reason),
            EventMeta(citizen_ref=ref, occurred_at=ctx.received_at,
                      correlation_id=ctx.correlation_id, causation_id=ctx.causation_id),
        )
        if appended:
            # Same transaction as the event: a key is destroyed exactly when the log says so.
            await self.vault.destroy(conn, ref)
            if self.on_erased is not None:
                await self.on_erased(conn, ref)
        log.info("subject.erased", schema=self.vault.schema, already_erased=not appended)
        return {"citizen_ref": ref, "stream_id": self.streams.decider.stream_id(ref),
                "already_erased": not appended}


def erase_route(erasure: Erasure) -> CommandRoute:
    """The `EraseSubject` entry of a service's routes table: bureau channels only."""
    return CommandRoute(EraseSubject, erasure.erase, bureau_only=True,
                        accepted_message="personal data erased")
