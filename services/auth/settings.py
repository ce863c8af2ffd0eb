"""Auth settings (`CARDDESK_*`): captcha and session lifetimes, login throttling, portrait
thresholds, lockout."""

from __future__ import annotations

from datetime import timedelta
from typing import Self

from pydantic import Field, model_validator

from shared.settings import CardDeskSettings


class AuthSettings(CardDeskSettings):
    """Per-region configuration of the auth service; every duration is in seconds."""

    captcha_ttl_seconds: int = Field(default=300, gt=0)
    captcha_code_length: int = Field(default=6, ge=4, le=16)
    session_ttl_seconds: int = Field(default=1800, gt=0)
    # Cosine similarity between the presented embedding and the enrolled template.
    portrait_similarity_threshold: float = Field(default=0.85, ge=-1.0, le=1.0)
    portrait_liveness_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    portrait_max_failures: int = Field(default=3, ge=1)
    portrait_failure_window_seconds: int = Field(default=24 * 3600, gt=0)
    portrait_lockout_seconds: int = Field(default=24 * 3600, gt=0)
    # Failed StartSession attempts allowed within the window, per ID number (by citizen_ref)
    # and per channel; beyond them a login is refused `too_many_attempts`.
    login_max_failures_per_citizen: int = Field(default=5, ge=1)
    login_max_failures_per_channel: int = Field(default=1000, ge=1)
    login_failure_window_seconds: int = Field(default=900, gt=0)

    @model_validator(mode="after")
    def _sessions_fit_the_lifetime_cap(self) -> Self:
        if self.session_ttl_seconds > self.session_max_lifetime_seconds:
            raise ValueError("CARDDESK_SESSION_TTL_SECONDS exceeds"
                             " CARDDESK_SESSION_MAX_LIFETIME_SECONDS: every token would be refused")
        return self

    @property
    def captcha_ttl(self) -> timedelta:
        return timedelta(seconds=self.captcha_ttl_seconds)

    @property
    def session_ttl(self) -> timedelta:
        return timedelta(seconds=self.session_ttl_seconds)

    @property
    def portrait_failure_window(self) -> timedelta:
        return timedelta(seconds=self.portrait_failure_window_seconds)

    @property
    def login_failure_window(self) -> timedelta:
        return timedelta(seconds=self.login_failure_window_seconds)

    @property
    def portrait_lockout(self) -> timedelta:
        return timedelta(seconds=self.portrait_lockout_seconds)
