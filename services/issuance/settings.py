"""Issuance settings (`CARDDESK_ISSUANCE_*`): production time, card numbers, timers."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field

from shared.settings import CardDeskSettings


class IssuanceSettings(CardDeskSettings):
    # How long the card factory takes; 0 makes the card ready in the approval's transaction.
    issuance_production_seconds: float = Field(default=0.0, ge=0.0)
    # New card numbers: prefix + region code + zero-padded sequence number.
    issuance_card_no_prefix: str = "S"
    issuance_region_code: str = "440300"
    issuance_card_no_digits: int = Field(default=8, ge=4, le=16)
    # The durable production timer: how often it looks for due cards, and how long a timer
    # whose completion failed waits before it is tried again.
    issuance_timer_scan_seconds: float = Field(default=1.0, gt=0.0)
    issuance_timer_retry_seconds: float = Field(default=30.0, gt=0.0)

    @property
    def production_time(self) -> timedelta:
        return timedelta(seconds=self.issuance_production_seconds)

    @property
    def timer_retry_delay(self) -> timedelta:
        return timedelta(seconds=self.issuance_timer_retry_seconds)
