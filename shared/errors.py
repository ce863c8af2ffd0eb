"""Domain errors carry a stable, machine-readable code; entrypoints turn them into replies."""

from __future__ import annotations


class DomainError(Exception):
    """A command refused by the rules. Subclasses set `code` (e.g. `no_formal_loss`)."""

    code = "rejected"
    default_message = "the command was refused"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class InvalidSessionError(DomainError):
    code = "invalid_session"
    default_message = "the session token is missing, forged or malformed"


class ChannelMismatchError(DomainError):
    code = "channel_mismatch"
    default_message = "the session was started by another channel"


class SessionExpiredError(DomainError):
    code = "session_expired"
    default_message = "the session has expired; log in again"


class BureauNotServedError(DomainError):
    code = "bureau_not_served"
    default_message = "this bureau channel does not serve the application's bureau"


class SubjectErasedError(DomainError):
    code = "subject_erased"
    default_message = "this citizen's data has been erased"
