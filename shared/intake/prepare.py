"""A command batch's reads, done once for the batch: before a partition's commands run, the
service reads what they will decide on (their citizens' streams, the facts kept under their
locks) in a round trip or two, instead of one or two per command.

A route tells whose stream its command decides on (`CommandRoute.citizen`), when that can be
told before the command runs; the service's `Wiring.prepare` reads for those citizens. What
it returns is the batch's, for the handlers to find (`prepared`) while that transaction's
pass runs, and for no other: a pass rolled back and run again prepares afresh.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import asyncpg

from shared.intake.messages import CommandContext
from shared.tokens import TokenVerifier

# Reads for a batch's citizens, inside its transaction; what it returns is `prepared`.
BatchPrepare = Callable[[asyncpg.Connection, Collection[str]], Awaitable[object]]

_prepared: ContextVar[tuple[asyncpg.Connection, object] | None] = ContextVar(
    "carddesk_prepared", default=None)


@contextmanager
def preparing(conn: asyncpg.Connection, value: object) -> Iterator[None]:
    """`value` is what `prepared(conn)` gives while the block runs."""
    token = _prepared.set((conn, value))
    try:
        yield
    finally:
        _prepared.reset(token)


def prepared(conn: asyncpg.Connection) -> object | None:
    """What the running batch prepared on `conn`; None outside a batch (a follower, a
    timer) or on another connection."""
    entry = _prepared.get()
    return entry[1] if entry is not None and entry[0] is conn else None


def session_citizen(verifier: TokenVerifier) -> Callable[[CommandContext, Any], str]:
    """A route's `citizen` for a command that carries a session token: the citizen the token
    names, verified as its handler verifies it (the verifier remembers the token, so the
    handler does not check its signature again); a bad token raises its `DomainError`."""
    def citizen(ctx: CommandContext, payload: Any) -> str:
        return verifier.verify(payload.session_token, now=ctx.received_at,
                               channel=ctx.channel.channel_id).citizen_ref
    return citizen
