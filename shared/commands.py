"""Commands from channels: the names services and tools use, from the intake's pieces in
`shared/intake/` (authentication, checks, execution) and the stored replies
(`shared/idempotency.py`)."""

from shared.idempotency import open_reply, seal_reply
from shared.intake.messages import (
    CommandContext,
    CommandEnvelope,
    CommandHandler,
    CommandRoute,
    Refusal,
    Reply,
    reply_message,
)
from shared.intake.parse import CheckedCommand
from shared.intake.pipeline import CommandIntake

__all__ = [
    "CheckedCommand",
    "CommandContext",
    "CommandEnvelope",
    "CommandHandler",
    "CommandIntake",
    "CommandRoute",
    "Refusal",
    "Reply",
    "open_reply",
    "reply_message",
    "seal_reply",
]
